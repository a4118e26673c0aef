#!/usr/bin/env bash
# Create (or update) the project's virtualenv with the verified OpenMMLab 2.x stack.
#
#   bash tools/setup_env.sh [--find-links DIR] [--venv DIR]
#
# Idempotent: a second run only checks versions and exits in seconds.
#
# Order matters:
#   1. torch/torchvision first, pinned, so no later dependency can pull a different
#      (multi-GB) torch build;
#   2. mmcv 2.1.0 *with compiled ops*: from a wheel if --find-links offers one, otherwise built
#      from the PyPI sdist. mmcv 2.1.0 hard-codes `-std=c++17`, but torch >= 2.14 headers need
#      C++20, so the sdist is patched before building (the build needs pkg_resources, hence
#      setuptools >=77,<81 and --no-build-isolation);
#   3. mmengine / mmdet / mmseg / mmpretrain and test tools, with torch already satisfied;
#   4. openmim without its opendatalab/openxlab dependencies (they downgrade setuptools and
#      pin old rich/requests; `mim` never imports them);
#   5. this package in editable mode, without dependency resolution (everything is in place).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${OVERLOCK_VENV:-$ROOT/.venv}"
FIND_LINKS=()
PYTHON="${PYTHON:-python3.11}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"

while [ $# -gt 0 ]; do
  case "$1" in
    --find-links) FIND_LINKS+=(--find-links "$(cd "$2" && pwd)"); shift 2 ;;
    --venv) VENV="$2"; shift 2 ;;
    *) echo "setup_env.sh: unknown argument '$1' (use --find-links DIR or --venv DIR)" >&2; exit 2 ;;
  esac
done

command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check -q)

have() {  # have <module> <version-prefix>: is <module> importable at that version?
  "$PY" - "$1" "$2" <<'PYEOF' 2>/dev/null
import importlib.metadata as m, sys
try:
    v = m.version(sys.argv[1])
except m.PackageNotFoundError:
    sys.exit(1)
sys.exit(0 if v.split('+')[0].startswith(sys.argv[2]) else 1)
PYEOF
}

# The stamp holds a digest of what the set-up installs from: a changed requirement file (say, a
# new test tool) or a changed script re-runs the steps below, which skip what is already there.
STAMP="$VENV/.overlock_stack_ok"
STAMP_KEY="$(cat "$ROOT"/requirements/*.txt "$ROOT/setup.cfg" "${BASH_SOURCE[0]}" \
  | sha256sum | cut -d' ' -f1) $TORCH_SPEC"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$STAMP_KEY" ] && have overlock_mm "" ; then
  echo "[setup] environment already complete ($VENV)"
  exit 0
fi

"${PIP[@]}" --upgrade "pip>=24" "setuptools>=77,<81" wheel

# 1. torch first.
read -r -a TSPEC <<< "$TORCH_SPEC"
if ! have torch "${TSPEC[0]#torch==}"; then
  echo "[setup] installing ${TORCH_SPEC}"
  "${PIP[@]}" "${TSPEC[@]}"
fi
TORCH_VER="$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')"
# Every later install is constrained to the torch we have, so nothing can replace it.
CONSTRAINTS="$VENV/torch-constraints.txt"
"$PY" - > "$CONSTRAINTS" <<'PYEOF'
import importlib.metadata as m
for p in ('torch', 'torchvision'):
    try:
        print(f'{p}=={m.version(p)}')
    except m.PackageNotFoundError:
        pass
PYEOF

# 2. mmcv 2.1.0 with ops.
mmcv_ok() { "$PY" -c 'import mmcv, mmcv.ops; from mmcv.ops import nms, RoIAlign; assert mmcv.__version__ == "2.1.0"' 2>/dev/null; }
if ! mmcv_ok; then
  "${PIP[@]}" -c "$CONSTRAINTS" "mmengine==0.10.7" ninja psutil
  if [ ${#FIND_LINKS[@]} -gt 0 ] && "${PIP[@]}" -c "$CONSTRAINTS" --no-index "${FIND_LINKS[@]}" \
        --no-deps "mmcv==2.1.0" 2>/dev/null && mmcv_ok; then
    echo "[setup] mmcv 2.1.0 installed from wheel cache"
  else
    echo "[setup] building mmcv 2.1.0 with ops from source (about 25 min on 2 cores)"
    BUILD="$(mktemp -d)"
    "$PY" -m pip download -q --no-deps --no-binary :all: "mmcv==2.1.0" -d "$BUILD"
    tar -xzf "$BUILD"/mmcv-2.1.0.tar.gz -C "$BUILD"
    MAJOR_MINOR="$("$PY" -c 'import torch; print(".".join(torch.__version__.split(".")[:2]))')"
    if "$PY" -c "import sys; v=tuple(map(int,'$MAJOR_MINOR'.split('.'))); sys.exit(0 if v>=(2,14) else 1)"; then
      # torch >= 2.14 headers use C++20 features; mmcv 2.1.0 hard-codes C++17.
      sed -i 's/-std=c++17/-std=c++20/g' "$BUILD/mmcv-2.1.0/setup.py"
    fi
    (cd "$BUILD/mmcv-2.1.0" && MMCV_WITH_OPS=1 MAX_JOBS="$(nproc)" \
        "${PIP[@]}" -c "$CONSTRAINTS" --no-build-isolation --no-deps .)
    rm -rf "$BUILD"
    mmcv_ok || { echo "[setup] mmcv build finished but mmcv.ops does not import" >&2; exit 1; }
  fi
  # mmcv's own light runtime deps.
  "${PIP[@]}" -c "$CONSTRAINTS" addict numpy packaging Pillow pyyaml yapf opencv-python
fi

# 3. OpenMMLab libraries and test tools.
"${PIP[@]}" -c "$CONSTRAINTS" -r "$ROOT/requirements/runtime.txt" -r "$ROOT/requirements/tests.txt"

# 4. openmim without opendatalab/openxlab.
"${PIP[@]}" -c "$CONSTRAINTS" --no-deps "openmim==0.3.9"
"${PIP[@]}" -c "$CONSTRAINTS" click colorama model-index pandas requests rich tabulate

# 5. this package.
"${PIP[@]}" -c "$CONSTRAINTS" --no-deps --no-build-isolation -e "$ROOT"

"$PY" -c 'import torch, mmcv, mmcv.ops, mmengine, mmdet, mmseg, mmpretrain, overlock_mm; print("[setup] OK: torch", torch.__version__, "mmcv", mmcv.__version__, "mmdet", mmdet.__version__, "mmseg", mmseg.__version__, "mmpretrain", mmpretrain.__version__)'
echo "$STAMP_KEY" > "$STAMP"
