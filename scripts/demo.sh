#!/usr/bin/env bash
# `make demo`: the offline sample dataset -> face-crop shards -> tiny-cpu training on 2 local ranks -> evaluation.
# Every step keeps finished work: the sample videos and shard splits are not rebuilt, an interrupted training run
# resumes from its last checkpoint (a finished one is kept), and the evaluation is rerun (it takes seconds).
# The last line printed is the path of the evaluation's report.json.
#   DEMO_IDENTITIES=48           identities in the sample dataset (at most 102: the packaged photos)
#   DEMO_NPROC=2                 local ranks for training
#   DEMO_CONFIG=tiny-cpu         the packaged config trained (vit-tiny-cpu: the foundation-ViT path, docs/foundation.md)
#   DEMO_TRAIN_OVERRIDES="..."   `key=value` overrides for `ltm train` (default: none, the config as is: 100 steps)
#   DEMO_FRESH=1                 delete runs/demo first and train from scratch
# The whole output is also kept in runs/demo.log; `scripts/demo_readme.py runs/demo.log` puts its end into the
# README, so the figures there are the ones a demo printed.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs
exec > >(tee runs/demo.log) 2>&1
LTM="${VENV:-.venv}/bin/ltm"
SAMPLE=sample
CONFIG="${DEMO_CONFIG:-tiny-cpu}"
RUN=runs/demo
if [[ "$CONFIG" != tiny-cpu ]]; then RUN="runs/demo-$CONFIG"; fi
NPROC="${DEMO_NPROC:-2}"
IDENTITIES="${DEMO_IDENTITIES:-48}"
read -r -a TRAIN_OVERRIDES <<< "${DEMO_TRAIN_OVERRIDES:-}"
start=$(date +%s)
say() { echo "== [$(( $(date +%s) - start ))s] $*"; }

say "1/4 sample dataset ($IDENTITIES identities; real, SelfBlend and FaceSwap videos) -> $SAMPLE/"
"$LTM" prep sample --out "$SAMPLE" --identities "$IDENTITIES"

say "2/4 faces (MTCNN) -> 112 px crops, 16 frames per video -> shards in $SAMPLE/shards/ffpp_c23/{train,val,test}"
"$LTM" prep ffpp --root "$SAMPLE" --splits "$SAMPLE/splits" --out "$SAMPLE/shards" --frames 16 --size 112 \
    --workers 2 --no-progress
# the data's digests: equal on every machine for these settings (docs/determinism.md), so two demos can be compared
"${VENV:-.venv}/bin/python" - "$SAMPLE" <<'EOF'
import json
import sys
from pathlib import Path

root = Path(sys.argv[1])
print(f"digest: sample videos {json.loads((root / 'SOURCES.json').read_text())['digest']}")
for manifest in sorted((root / "shards" / "ffpp_c23").glob("*/manifest.json")):
    digest = json.loads(manifest.read_text()).get("digest", "none (written before manifests had one)")
    print(f"digest: shards {manifest.parent.name} {digest}")
EOF

if [[ "${DEMO_FRESH:-0}" == 1 ]]; then rm -rf "$RUN"; fi
if [[ "$CONFIG" == tiny-cpu ]]; then
    say "3/4 train tiny-cpu (ImageNet EfficientNet-Lite0 teacher + student, 2-block ViT) with DeepSpeed on $NPROC local ranks -> $RUN/"
else
    say "3/4 train $CONFIG with DeepSpeed on $NPROC local ranks -> $RUN/"
fi
"$LTM" train --config "$CONFIG" --nproc "$NPROC" "train.run_dir=$RUN" "${TRAIN_OVERRIDES[@]}"

say "4/4 evaluate the last checkpoint on the sample's test split (teacher ViT head, then the paper's student head)"
# The paper infers with the student; the teacher's ViT head is scored too, for comparison (same weights,
# `model.inference_head` only picks the head that scores).
"$LTM" eval --run "$RUN" --data ffpp_c23/test --out "$RUN/eval-teacher_vit" model.inference_head=teacher_vit \
    eval.attention_samples=0 | sed '$d' | sed '$d'
out="$("$LTM" eval --run "$RUN" --data ffpp_c23/test)"
echo "$out" | sed '$d'
report_json="$(echo "$out" | tail -n 1)"
folder="$(dirname "$report_json")"
echo "pictures: $folder/roc.png and $(find "$folder/attention" -name '*.png' | wc -l) attention maps in $folder/attention/"
echo "page: $folder/report.html (open it in a browser: tables, ROC, attention and the most confident mistakes)"
say "done"
echo "$report_json"
