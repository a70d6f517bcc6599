"""`ltm prep {ffpp,celebdf,wdf,folder,sample,merge}`: datasets into WebDataset shards of face crops.

    ltm prep sample --out sample                                   # build the offline sample dataset (FF++ layout)
    ltm prep ffpp --root sample --splits sample/splits --out sample/shards
    ltm prep ffpp --root /data/FaceForensics++ --splits splits/ --out shards --compression c23 --workers 8
    ltm prep celebdf --root /data/Celeb-DF-v2 --out shards
    ltm prep wdf --root /data/WildDeepfake --out shards
    ltm prep folder --root my_videos --out shards --split test      # <root>/{real,fake}/... or --csv list.csv
    ltm prep ffpp ... --part 3/8                                    # SLURM array task 3 of 8, then:
    ltm prep merge --out shards --dataset ffpp_c23
    ltm prep synth --root photos/ --out shards --identity-regex '^[^_]+'   # cross-manipulation benchmark (5 families)
    ltm prep dfdc --root /data/DFDC --out shards --part $SLURM_ARRAY_TASK_ID/50     # then prep merge --dataset dfdc
    ltm prep {dfdcp,faceshifter,dfd,deeperforensics,celebdf1,uadfv,df40,forgerynet} --root ... --out ...
                                                        # the cross-dataset benchmarks (docs/datasets.md)
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def _frames(text: str) -> int | None:
    if text == "all":
        return None
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError("--frames must be >= 1 or 'all'")
    return n


def _common(p: argparse.ArgumentParser, detector_default: str = "mtcnn") -> None:
    p.add_argument("--out", required=True, help="shard root: writes <out>/<dataset>/<split>/<method>/*.tar")
    p.add_argument("--frames", type=_frames, default=32, help="frames per video, evenly spaced, or 'all' (32)")
    p.add_argument("--size", type=int, default=224, help="face crop side in pixels (224)")
    p.add_argument("--scale", type=float, default=1.3, help="face box enlargement (1.3, the FF++ protocol)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality (95)")
    p.add_argument("--detector", choices=["mtcnn", "yunet", "none"], default=detector_default,
                   help=f"face detector ({detector_default}); yunet needs --detector-model")
    p.add_argument("--detector-model", help="YuNet ONNX file (face_detection_yunet_2023mar.onnx)")
    p.add_argument("--detect-side", type=int, default=320,
                   help="detect on frames scaled to this short side at most (320; 0 = full size)")
    p.add_argument("--min-face", type=int, default=32,
                   help="smallest face side in detection pixels (32: a tenth of the scaled short side)")
    p.add_argument("--threshold", type=float, default=0.9, help="face score threshold (0.9)")
    p.add_argument("--shard-samples", type=int, default=2000, help="samples per shard at most (2000)")
    p.add_argument("--shard-mb", type=float, default=512, help="shard size in MB at most (512)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed (0)")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes over videos (1)")
    p.add_argument("--device", default="auto", help="detector device: auto | cpu | cuda[:N] (auto)")
    p.add_argument("--batch-size", type=int, default=32, help="frames per detector call (32)")
    p.add_argument("--part", default="0/1", help="i/N: process the i-th of N shares (0-based), then `prep merge`")
    p.add_argument("--keep-work", action="store_true", help="keep <out>/.prep (per-video crops) after finishing")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--top-up", type=int, default=0, metavar="K",
                   help="a sampled frame without a face is replaced by the nearest frame with one, at most K frames "
                   "away (0: off; the manifest lists every video with fewer face frames than --frames either way)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="source", metavar="source", required=True)

    p = sub.add_parser("ffpp", help="FaceForensics++ (original_sequences / manipulated_sequences)")
    p.add_argument("--root", required=True, help="FF++ root folder")
    p.add_argument("--splits", required=True, help="folder with the official train.json / val.json / test.json "
                   "(github.com/ondyari/FaceForensics, dataset/splits)")
    p.add_argument("--compression", default="c23", choices=["raw", "c23", "c40"], help="(c23)")
    p.add_argument("--methods", nargs="+", help="manipulations (default: every one present)")
    p.add_argument("--only-splits", nargs="+", choices=["train", "val", "test"], help="prep only these splits")
    p.add_argument("--regions", choices=["auto", "none"], default="auto",
                   help="auto: each fake sample gets its manipulated region (region.png) from the method's "
                   "masks/videos, else from the difference to its original video, where present; none: no regions "
                   "(auto)")
    _common(p)

    p = sub.add_parser("celebdf", help="Celeb-DF v2 (Celeb-real, YouTube-real, Celeb-synthesis)")
    p.add_argument("--root", required=True,
                   help="Celeb-DF v2 root (Celeb-real/, YouTube-real/, Celeb-synthesis/, List_of_testing_videos.txt)")
    _common(p)

    p = sub.add_parser("wdf", help="WildDeepfake (real/fake x train/test, frame folders or .tar.gz)")
    p.add_argument("--root", required=True, help="WildDeepfake root ({real,fake}_{train,test}/ or their .tar.gz)")
    _common(p, detector_default="none")

    p = sub.add_parser("folder", help="a <real|fake>/... tree of videos and images, or a CSV list")
    p.add_argument("--root", help="folder with real/ and fake/ (or the base of the CSV's relative paths)")
    p.add_argument("--csv", help="CSV with columns path,label[,method,split,video]")
    p.add_argument("--split", default="test", help="split name for inputs that do not name one (test)")
    p.add_argument("--name", help="dataset name in the shard root (default: the folder or CSV name)")
    _common(p)

    _add_benchmarks(sub)

    p = sub.add_parser("sample", help="build the offline sample dataset (FF++ layout, SelfBlend + FaceSwap fakes)")
    p.add_argument("--out", required=True, help="where to write the sample dataset")
    p.add_argument("--identities", type=int, default=48,
                   help="identities = real videos: an even number >= 6 (48)")
    p.add_argument("--length", type=int, default=32, help="frames per video (32)")
    p.add_argument("--frame-size", type=int, default=192, help="video frame side (192)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", help="also prep it into this shard root (as `ltm prep ffpp` would)")
    p.add_argument("--frames", type=_frames, default=16, help="with --shards: frames per video (16)")
    p.add_argument("--size", type=int, default=224, help="with --shards: crop side (224)")
    p.add_argument("--workers", type=int, default=1, help="with --shards: worker processes (1)")

    p = sub.add_parser("synth", help="real faces (photos/videos) -> real + five synthetic fake families, as shards")
    p.add_argument("--root", required=True, help="folder of real face photos and/or videos (searched recursively)")
    p.add_argument("--out", required=True, help="shard root: writes <out>/<name>/<split>/<method>/*.tar")
    p.add_argument("--name", default="synth", help="dataset name in the shard root (synth)")
    p.add_argument("--frames", type=int, default=4,
                   help="views per face: jittered crops of a photo, frames of a video (4)")
    p.add_argument("--size", type=int, default=224, help="face crop side in pixels (224)")
    p.add_argument("--families", nargs="+", help="fake families (default: all five)")
    p.add_argument("--strength", nargs="+", default=[], metavar="[FAMILY=]X",
                   help="artefact strength, one number for every family and/or FAMILY=X (1.0)")
    p.add_argument("--identity-regex", help="identity of a file = first match on its relative path (default: the "
                   "file itself); files of one identity stay in one split")
    p.add_argument("--split", default="0.6,0.2,0.2", help="train,val,test fractions of the faces (0.6,0.2,0.2)")
    p.add_argument("--min-face", type=int, default=64, help="smallest face box side in source pixels (64)")
    p.add_argument("--max-faces", type=int, default=4, help="faces per photo or frame, the largest first (4)")
    p.add_argument("--threshold", type=float, default=0.95, help="MTCNN face probability (0.95)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shortcut", default="none", metavar="{none,patch}",
                   help="plant a local artefact in every TRAIN fake (patch: a faint checkerboard with a colour shift "
                   "on one cheek, ~1/8 of the crop; its square is the fake's region.png); val/test fakes stay clean "
                   "and get stamped copies in <Family>Stamped folders, to measure how much a model leans on it "
                   "(none)")

    p = sub.add_parser("merge", help="after --part runs: write shards and manifests from all parts")
    p.add_argument("--out", required=True, help="the shard root the --part runs wrote into")
    p.add_argument("--dataset", required=True, help="dataset name under --out, e.g. ffpp_c23")
    p.add_argument("--keep-work", action="store_true")


def _add_benchmarks(sub) -> None:
    """The cross-dataset benchmarks (data_prep.adapters), each from its own download layout."""

    def regions(p: argparse.ArgumentParser, source: str) -> None:
        p.add_argument("--regions", choices=["auto", "none"], default="auto",
                       help=f"auto: fakes get region.png from {source} where present and aligned with the fake; "
                       "none: no regions (auto)")
    p = sub.add_parser("dfdc", help="DFDC: dfdc_train_part_N/metadata.json + the public test set's labels.csv")
    p.add_argument("--root", required=True, help="folder holding every dfdc_train_part_N/ (and test/labels.csv)")
    p.add_argument("--test-labels", help="the public test set's labels.csv (filename,label; 1 = fake), videos beside "
                   "it or in its videos/ folder (default: <root>/test/labels.csv when present)")
    regions(p, "the difference to their `original` video")
    _common(p)

    p = sub.add_parser("dfdcp", help="DFDC-Preview: dataset.json over method_A/, method_B/, original_videos/")
    p.add_argument("--root", required=True, help="DFDC-Preview root (dataset.json beside the three folders)")
    _common(p)

    p = sub.add_parser("faceshifter", help="FaceShifter in the FF++ layout and splits")
    p.add_argument("--root", required=True, help="FF++ root with manipulated_sequences/FaceShifter/<c>/videos")
    p.add_argument("--splits", required=True, help="folder with FF++'s official train.json / val.json / test.json")
    p.add_argument("--compression", default="c23", choices=["raw", "c23", "c40"], help="(c23)")
    regions(p, "the difference to their FF++ original")
    _common(p)

    p = sub.add_parser("dfd", help="DeepFakeDetection (FF++ layout: original_sequences/actors, "
                       "manipulated_sequences/DeepFakeDetection); the forged face picked by its mask")
    p.add_argument("--root", required=True, help="FF++ root holding the DeepFakeDetection folders")
    p.add_argument("--compression", default="c23", choices=["raw", "c23", "c40"], help="(c23)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"],
                   help="DFD has no official split: every video goes here (test)")
    regions(p, "the DeepFakeDetection mask videos")
    _common(p)

    p = sub.add_parser("deeperforensics", help="DeeperForensics-1.0: manipulated_videos/<variant>, lists/splits")
    p.add_argument("--root", required=True, help="DeeperForensics-1.0 root (manipulated_videos/, lists/)")
    p.add_argument("--real", choices=["ffpp", "source_videos"], default="ffpp",
                   help="real class: FF++'s c23 youtube videos of the targets (ffpp, the field's protocol; needs "
                   "--ffpp-root) or the dataset's source_videos/ of the source actors (ffpp)")
    p.add_argument("--ffpp-root", help="FF++ root for --real ffpp")
    p.add_argument("--compression", default="c23", choices=["raw", "c23", "c40"],
                   help="FF++ compression of the real videos (c23)")
    _common(p)

    p = sub.add_parser("celebdf1", help="Celeb-DF v1 (Celeb-real, YouTube-real, Celeb-synthesis)")
    p.add_argument("--root", required=True, help="Celeb-DF v1 root (the three folders, List_of_testing_videos.txt)")
    _common(p)

    p = sub.add_parser("uadfv", help="UADFV: real/ and fake/ (no official split)")
    p.add_argument("--root", required=True, help="UADFV root (real/NNNN.mp4, fake/NNNN_fake.mp4)")
    p.add_argument("--split-rule", choices=["test", "hash"], default="test",
                   help="test: every video in test (the cross-dataset protocol); hash: train/val/test 70/15/15 by "
                   "sha1 of the pair id, a real and its fake together (test)")
    _common(p)

    p = sub.add_parser("df40", help="DF40: per-method frame folders <method>/{ff,cdf} and per-method JSON lists")
    p.add_argument("--root", required=True, help="DF40 root (the method folders)")
    p.add_argument("--lists", help="folder of the per-method .json lists (default: <root>/lists, else <root>)")
    p.add_argument("--keep-crops", action="store_true",
                   help="use DF40's frames as the face crops (no detection; same as --detector none)")
    _common(p)

    p = sub.add_parser("forgerynet", help="ForgeryNet: Training/ and Validation/ image_list.txt, video_list.txt")
    p.add_argument("--root", required=True, help="ForgeryNet root (Training/, Validation/)")
    _common(p)


def list_benchmark(args: argparse.Namespace) -> tuple[str, list, list[dict]]:
    """(dataset, items, skipped) for one of the cross-dataset benchmark sources."""
    from data_prep import adapters

    s = args.source
    if s == "dfdc":
        return adapters.dfdc(args.root, args.test_labels)
    if s == "dfdcp":
        return adapters.dfdc_preview(args.root)
    if s == "faceshifter":
        return adapters.faceshifter(args.root, args.splits, args.compression)
    if s == "dfd":
        return adapters.dfd(args.root, args.compression, args.split)
    if s == "deeperforensics":
        return adapters.deeperforensics(args.root, args.real, args.ffpp_root, args.compression)
    if s == "celebdf1":
        return adapters.celebdf_v1(args.root)
    if s == "uadfv":
        return adapters.uadfv(args.root, args.split_rule)
    if s == "df40":
        return adapters.df40(args.root, args.lists)
    if s == "forgerynet":
        return adapters.forgerynet(args.root)
    raise ValueError(f"unknown prep source {s!r}")


def settings_from(args: argparse.Namespace):
    from data_prep.pipeline import Runtime, Settings, parse_part

    settings = Settings(frames=args.frames, size=args.size, scale=args.scale, quality=args.quality,
                        detector=args.detector,
                        detector_model=str(Path(args.detector_model).resolve()) if args.detector_model else None,
                        detect_side=args.detect_side, min_face=args.min_face, threshold=args.threshold,
                        shard_samples=args.shard_samples, shard_bytes=int(args.shard_mb * 1024 * 1024), seed=args.seed,
                        regions=getattr(args, "regions", "auto"), top_up=args.top_up)
    if getattr(args, "keep_crops", False):
        settings.detector = "none"
    runtime = Runtime(workers=args.workers, device=args.device, batch_size=args.batch_size,
                      part=parse_part(args.part), keep_work=args.keep_work, progress=not args.no_progress)
    return settings, runtime


def _report(result: dict) -> int:
    n = result.get("samples", 0)
    if n == 0:
        log.error("no usable samples: every input was skipped (see the log and the manifests' skipped lists)")
        return 1
    log.info("%s: %d samples written", result.get("dataset"), n)
    for split, manifest in sorted((result.get("splits") or {}).items()):
        # pipeline.run gives each split's manifest; ltm prep synth gives sample counts (photos, no frame protocol)
        frames = manifest.get("frames") if isinstance(manifest, dict) else None
        if frames:  # how many face frames each video really has, against the protocol
            counts = ", ".join(f"{k} frames: {v} videos" for k, v in frames["videos_by_frames"].items())
            log.info("%s/%s: %s; %s; %d short of it (manifest frames.short)", result.get("dataset"), split,
                     frames["protocol"], counts, frames["videos_short"])
    return 0


def build_synth_from_args(args: argparse.Namespace) -> dict:
    from data_prep.synth import FAMILIES, SynthError, SynthSettings, build_synth

    families = list(args.families or FAMILIES)
    strength = {f: 1.0 for f in families}
    for item in args.strength:
        name, _, value = item.rpartition("=")
        try:
            x = float(value)
        except ValueError:
            raise SynthError(f"--strength {item!r}: expected a number or FAMILY=number") from None
        if name and name not in families:
            raise SynthError(f"--strength {item!r}: {name!r} is not among the families {families}")
        for f in [name] if name else families:
            strength[f] = x
    try:
        fractions = tuple(float(x) for x in args.split.split(","))
    except ValueError:
        raise SynthError(f"--split {args.split!r}: expected three comma-separated fractions") from None
    settings = SynthSettings(frames=args.frames, size=args.size, families=families, strength=strength,
                             split_fractions=fractions, identity_regex=args.identity_regex, min_face=args.min_face,
                             max_faces=args.max_faces, threshold=args.threshold, seed=args.seed,
                             shortcut=args.shortcut)
    return build_synth(args.root, args.out, args.name, settings)


def run(args: argparse.Namespace) -> int:
    from data_prep import datasets, pipeline

    if args.source == "sample":
        from data_prep.sample import build_sample

        build_sample(args.out, args.identities, args.length, args.frame_size, args.seed)
        if args.shards:
            settings = pipeline.Settings(frames=args.frames, size=args.size, seed=args.seed)
            runtime = pipeline.Runtime(workers=args.workers)
            name, items, skipped = datasets.ffpp(args.out, Path(args.out) / "splits", "c23")
            return _report(pipeline.run(name, items, skipped, args.shards, settings, runtime))
        return 0
    if args.source == "synth":
        return _report(build_synth_from_args(args))
    if args.source == "merge":
        return _report(pipeline.merge(args.out, args.dataset, pipeline.Runtime(keep_work=args.keep_work)))
    settings, runtime = settings_from(args)
    from data_prep.adapters import ADAPTERS

    if args.source in ADAPTERS:
        name, items, skipped = list_benchmark(args)
    elif args.source == "ffpp":
        name, items, skipped = datasets.ffpp(args.root, args.splits, args.compression, args.methods, args.only_splits)
    elif args.source == "celebdf":
        name, items, skipped = datasets.celebdf(args.root)
    elif args.source == "wdf":
        name, items, skipped = datasets.wdf(args.root, pipeline.work_dir(Path(args.out), "wdf"))
    else:
        if args.csv:
            name, items, skipped = datasets.csv_list(args.csv, args.root, args.split, args.name)
        elif args.root:
            name, items, skipped = datasets.folder(args.root, args.split, args.name)
        else:
            raise ValueError("prep folder needs --root DIR or --csv FILE")
    log.info("%s: %d inputs, %d skipped while listing", name, len(items), len(skipped))
    if not items and not skipped:
        where = f"CSV {args.csv}" if getattr(args, "csv", None) else f"--root {args.root}"
        raise ValueError(f"{name}: no inputs: {where} lists no videos, frame folders or images")
    return _report(pipeline.run(name, items, skipped, args.out, settings, runtime))
