#!/usr/bin/env bash
# open_clip's own trainer (open_clip_train, in the open_clip_torch wheel) for benchmarks/bench_throughput.py.
# Not in the venv: open_clip_torch[training] would pull numpy 2 (scispacy pins numpy<2) and
# open_clip_train 3.3.0 needs webdataset <= 0.2.86 (KeyError 'fname' on 1.x), while mlip-ds runs on
# webdataset 1.0.2. So its extras go to .bench-extra/, put on PYTHONPATH for that run only.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. "${MLIP_VENV:-.venv}/bin/activate"
[ -d .bench-extra/pandas ] && [ -d .bench-extra/webdataset ] && exit 0
python -m pip install -q --no-deps --target .bench-extra 'pandas==2.2.3' 'pytz==2025.2' 'webdataset==0.2.86'
echo "[install] open_clip_train extras in .bench-extra"
