"""``mlip-eval COMMAND ARGS``: one entry point for the evaluation commands, each also runnable as
``python -m mlip_ds.eval.<module>`` (``mlip-eval COMMAND --help`` for its options)."""
from __future__ import annotations

import importlib
import sys
from typing import Sequence

# command -> module under mlip_ds.eval (each has main(argv) -> exit code)
COMMANDS = {
    "probe": "linear_probe",
    "finetune": "finetune",
    "zero-shot": "zero_shot",
    "retrieval": "retrieval",
    "grounding": "grounding",
    "leakage": "leakage",
    "splits": "splits",
    "plots": "plots",
    "predict": "predict",
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        out = sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr
        if argv and argv[0] not in ("-h", "--help"):
            print(f"mlip-eval: unknown command {argv[0]!r}", file=out)
        print("usage: mlip-eval COMMAND [ARGS...]   (mlip-eval COMMAND --help)\ncommands:", file=out)
        for name, module in COMMANDS.items():
            print(f"  {name:10s} python -m mlip_ds.eval.{module}", file=out)
        return 0 if out is sys.stdout else 2
    module = importlib.import_module(f"mlip_ds.eval.{COMMANDS[argv[0]]}")
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
