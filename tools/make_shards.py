#!/usr/bin/env python
"""``python tools/make_shards.py ...``: the ``mlip-make-shards`` command (mlip_ds/cli/make_shards.py)."""
import sys

from mlip_ds.cli.make_shards import main

if __name__ == "__main__":
    sys.exit(main())
