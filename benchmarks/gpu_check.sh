#!/usr/bin/env bash
# One prepared call on a lent GPU (H100/H200): at most 9 minutes, nothing downloaded.
# Prints the table described in benchmarks/gpu_check.py. Extra arguments go to gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
# Python: our virtualenv where there is one; else, on a lent GPU machine (no package index, its own
# python3 with torch), the wheels from benchmarks/gpu_wheels.sh carried in ./.whl; else install.
PY=python
if [ -x "${MLIP_VENV:-.venv}/bin/python" ]; then
  # shellcheck disable=SC1091
  . "${MLIP_VENV:-.venv}/bin/activate"
elif [ -d .whl ]; then
  SITE=${MLIP_WHEEL_SITE:-/tmp/mlip_site}
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  PY=python3
else
  bash tools/install.sh
  # shellcheck disable=SC1091
  . "${MLIP_VENV:-.venv}/bin/activate"
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi: CPU run"
df -h /dev/shm | tail -1   # the loader's hand-over space (gpu_check.py fits its workers to it)
"$PY" -c 'import torch, deepspeed, open_clip, transformers; print("torch", torch.__version__, "deepspeed",
  deepspeed.__version__, "open_clip", open_clip.__version__, "transformers", transformers.__version__)'
JSON=()
[ -n "${OUT:-}" ] && JSON=(--json "$OUT/gpu_check.json")
timeout 530 "$PY" benchmarks/gpu_check.py "${JSON[@]}" "$@"
