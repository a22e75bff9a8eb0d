#!/usr/bin/env python
"""Detection / segmentation transfer of exported image encoders at 1% / 10% / 100% of the labels.

    python tools/transfer.py detect|segment --encoder NAME=EXPORT_DIR [--encoder NAME=random:EXPORT_DIR]
        --data KIND:PATH [--test-data KIND:PATH] [--fractions 0.01,0.1,1.0] [--seeds 0,1,2]
        [--freeze | --finetune] [--epochs N] --out DIR

KIND: rsna | object-cxr | boxes-csv | siim | mask-folder | synthetic. Writes DIR/<task>.json,
DIR/<task>.md and DIR/overlays/*.png; prints the Markdown table. Exit codes: 0 ok, 2 bad arguments
or data. The protocol is in mlip_ds/downstream/transfer.py; ``--help`` lists every option.
"""
from __future__ import annotations

import sys

from mlip_ds.downstream.transfer import main

if __name__ == "__main__":
    sys.exit(main())
