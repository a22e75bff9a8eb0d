#!/usr/bin/env bash
# Install mlip-ds into a virtualenv (default ./.venv; set MLIP_VENV to reuse another one).
# torch/torchvision are pinned to the releases this project is tested with; on a CUDA machine the
# same wheels run on the GPU. Extra pip arguments (e.g. ".[test]") are passed through.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${MLIP_VENV:-.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[install] creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -c "import torch, torchvision" 2>/dev/null || {
  echo "[install] torch 2.14.1 + torchvision 0.29.1"
  python -m pip install -q torch==2.14.1 torchvision==0.29.1
}
echo "[install] mlip-ds ${1:-.}"
python -m pip install -q -e "${1:-.}"
python -c "import mlip_ds, deepspeed, open_clip, webdataset; print('[install] ok: deepspeed', deepspeed.__version__, 'open_clip', open_clip.__version__)" 2>&1 | grep -v WARNING
