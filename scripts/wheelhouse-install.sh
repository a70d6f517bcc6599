#!/usr/bin/env bash
# Installs ltm from a wheelhouse (`make wheelhouse`) with no network: every pip call is `--no-index --find-links W`,
# with pip's configuration files and index variables set aside so that nothing but W is seen. Needs bash, coreutils
# and a Python with pip; not make or the checkout.
#
#   bash W/install.sh W                               # into python3's environment (a venv's: --python .venv/bin/python)
#   bash W/install.sh W --python .venv/bin/python     # as `make install` does, in the order it does
#   bash W/install.sh W --target DIR                  # every wheel, without dependency checks, into DIR; then
#                                                     # export PYTHONPATH=DIR (for a Python that brings its own torch)
#   bash W/install.sh W --verify                      # join pieces and check checksums only
#   options: --dali auto|cuda120|cuda130 (auto: the build W holds), --editable CHECKOUT (ltm from a checkout, not
#   its wheel)
#
# W holds a wheelhouse, or the parts p1 ... pN of a split one: the part folders themselves or all their files copied
# together. Before anything is installed, the parts' checksum lists are checked against PARTS (in p1), every piece
# (NAME.piece-000, -001, ...) against its part's SHA256SUMS.pK, the pieces are joined into NAME, and every file is
# checked against SHA256SUMS; a missing or damaged file is named and nothing is installed.
set -euo pipefail

die() { echo "install.sh: $*" >&2; exit 1; }
usage="usage: bash install.sh WHEELHOUSE [--python PY | --target DIR] [--dali auto|cuda120|cuda130]"
usage+=" [--editable CHECKOUT] [--verify]"
[ $# -ge 1 ] || die "$usage"
W=$(cd "$1" && pwd) || die "no folder $1"
shift
PY=python3 TARGET= DALI=auto EDITABLE= VERIFY_ONLY=
while [ $# -gt 0 ]; do
  case $1 in
    --python) PY=${2:?--python needs a value}; shift 2 ;;
    --target) TARGET=${2:?--target needs a value}; shift 2 ;;
    --dali) DALI=${2:?--dali needs a value}; shift 2 ;;
    --editable) EDITABLE=$(cd "${2:?--editable needs a value}" && pwd); shift 2 ;;
    --verify) VERIFY_ONLY=1; shift ;;
    *) die "unknown option $1; $usage" ;;
  esac
done
case $PY in */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;; esac  # relative paths: before the cd
[ -z "$TARGET" ] || { mkdir -p "$TARGET" && TARGET=$(cd "$TARGET" && pwd); }
cd "$W"

# parts copied as folders: gather their files
for part in p[0-9]*; do
  [ -d "$part" ] || continue
  find "$part" -mindepth 1 -maxdepth 1 -exec mv -f {} . \;
  rmdir "$part"
done
[ -f SHA256SUMS ] || die "$W/SHA256SUMS is missing: not a wheelhouse, or part p1 was not copied into $W"

part_of() {  # the part whose checksum list names $1, for messages
  local list
  for list in SHA256SUMS.p*; do
    [ -e "$list" ] && awk -v n="$1" '$2 == n {found = 1} END {exit !found}' "$list" \
      && { echo " (part ${list#SHA256SUMS.})"; return; }
  done
  echo ""
}
check() {  # check SUM FILE
  [ -e "$2" ] || die "$2 is missing$(part_of "$2"): copy the files of every part into $W"
  [ "$(sha256sum "$2" | cut -d' ' -f1)" = "$1" ] || die "checksum mismatch: $W/$2$(part_of "$2")"
}

# every part's list present and intact (PARTS, in p1, lists them)
if [ -f PARTS ]; then
  while read -r sum name; do
    [ -e "$name" ] || die "part ${name#SHA256SUMS.} is missing (no $name in $W): copy the files of every part into $W"
    [ "$(sha256sum "$name" | cut -d' ' -f1)" = "$sum" ] || die "checksum mismatch: $W/$name"
  done < PARTS
fi
# pieces: check each against its part's list (a piece already joined is skipped), then join
for list in SHA256SUMS.p*; do
  [ -e "$list" ] || continue
  while read -r sum name; do
    case $name in
      *.piece-[0-9][0-9][0-9]) [ -e "$name" ] || [ ! -e "${name%.piece-*}" ] || continue; check "$sum" "$name" ;;
    esac
  done < "$list"
done
for first in *.piece-000; do
  [ -e "$first" ] || continue
  name=${first%.piece-000}
  cat "$name".piece-[0-9][0-9][0-9] > "$name.joining"
  mv -f "$name.joining" "$name"
  rm -f "$name".piece-[0-9][0-9][0-9]
done
while read -r sum name; do check "$sum" "$name"; done < SHA256SUMS
echo "install.sh: $W: every file present and checked ($(grep -c . SHA256SUMS) files)"
[ -z "$VERIFY_ONLY" ] || exit 0

# nothing but the wheelhouse: no pip configuration files, no index or find-links from the environment
export PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
unset PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_CONSTRAINT PIP_REQUIREMENT PIP_TARGET PIP_PREFIX
"$PY" -m pip --version > /dev/null 2>&1 || die "$PY has no pip (python3 -m venv makes one with it; --python PY)"
offline() {
  "$PY" -m pip install -q --no-index --find-links "$W" "$@" \
    || die "pip could not install from the wheelhouse $W alone (no index; its message above): pip install $*"
}
one() {  # the wheel matching a glob, or nothing
  local matches=($1)
  [ -e "${matches[0]}" ] && echo "${matches[0]}"
  return 0
}
need() {  # the wheel matching a glob, or stop naming the wheelhouse
  local found
  found=$(one "$1")
  [ -n "$found" ] || die "$W holds no $1"
  echo "$W/$found"
}

if [ -n "$TARGET" ]; then
  wheels=()
  for wheel in *.whl; do
    case $wheel in pip-*|setuptools-*|wheel-*) ;; *) wheels+=("$W/$wheel") ;; esac
  done
  offline --no-deps --no-compile --upgrade --target "$TARGET" "${wheels[@]}"
  echo "install.sh: ${#wheels[@]} wheels installed into $TARGET; use them with:"
  echo "export PYTHONPATH=$TARGET\${PYTHONPATH:+:\$PYTHONPATH}"
  exit 0
fi

# the order `make install` uses: pip, torch, the pinned rest, the DALI build, DeepSpeed, facenet-pytorch without
# its dependencies (its own pins would replace torch), ltm
held=$(need "nvidia_dali_cuda*.whl")
held=${held##*/nvidia_dali_}; held=${held%%-*}
[ "$DALI" = auto ] && DALI=$held
[ "$DALI" = "$held" ] || die "$W holds nvidia-dali-$held, not nvidia-dali-$DALI: build a wheelhouse with DALI=$DALI"
[ -z "$(one "pip-*.whl")" ] || offline --upgrade pip
if [ -n "$(one "torch-*.whl")" ]; then
  offline -c constraints.txt torch torchvision
else
  "$PY" -c "import torch" 2> /dev/null \
    || die "$W has no torch (built with TORCH=no) and $PY brings none: install into a Python that has torch" \
           "(a venv made with --system-site-packages) or use --target"
fi
for other in nvidia-dali-cuda120 nvidia-dali-cuda130; do
  [ "$other" = "nvidia-dali-$DALI" ] || "$PY" -m pip uninstall -q -y "$other" 2> /dev/null || true
done
offline -c constraints.txt -r requirements.txt
offline -c constraints.txt "nvidia-dali-$DALI"
offline -c constraints.txt deepspeed
facenet=$(need "facenet_pytorch-*.whl")
offline --no-deps "$facenet"
if [ -n "$EDITABLE" ]; then
  "$PY" -c "import setuptools" 2> /dev/null || offline setuptools
  offline --no-deps --no-build-isolation -e "$EDITABLE"
else
  ltm=$(need "ltm-*.whl")
  offline --no-deps --force-reinstall "$ltm"
fi
echo "install.sh: installed from $W into $("$PY" -c 'import sys; print(sys.prefix)')"
