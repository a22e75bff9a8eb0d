#!/usr/bin/env bash
# One prepared call on a lent GPU (H100/H200): at most ~8 minutes, nothing downloaded.
# Prints the table described in tools/gpu_check.py. Extra arguments go to gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x "${MLIP_VENV:-.venv}/bin/python" ] || bash tools/install.sh
# shellcheck disable=SC1091
. "${MLIP_VENV:-.venv}/bin/activate"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi: CPU run"
timeout 470 python tools/gpu_check.py "$@"
