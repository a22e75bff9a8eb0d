#!/usr/bin/env bash
# The README's test command: installs mlip-ds with its test dependencies, then runs the suite.
# Extra arguments go to pytest (e.g. `bash tools/test.sh -k probe`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh ".[test]"
bash benchmarks/install_extra.sh  # open_clip_train for the throughput benchmark's test
# shellcheck disable=SC1091
. "${MLIP_VENV:-.venv}/bin/activate"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
python -m pytest -q -p no:cacheprovider --timeout 900 --durations 10 tests "$@"
