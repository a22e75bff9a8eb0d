"""The shared ``main`` of the evaluation commands (zero_shot, retrieval, finetune): parse, run,
print the Markdown table, exit 2 with the message on a user error."""
from __future__ import annotations

import sys
import warnings
from typing import Callable, Sequence


def eval_main(tag: str, build_parser: Callable, run_cli: Callable, argv: Sequence[str] | None = None) -> int:
    from mlip_ds.eval.linear_probe import ProbeError
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            _, json_path, md_path, md = run_cli(args)
    except ProbeError as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2
    print(md)
    print(f"[{tag}] wrote {json_path} and {md_path}", file=sys.stderr)
    return 0
