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


def write_json_and_markdown(out_dir: str, stem: str, payload: dict, md: str) -> tuple[str, str]:
    """``<stem>.json`` (NaN as null) and ``<stem>.md`` in ``out_dir``; returns their paths."""
    import json
    import os

    from mlip_ds.eval.linear_probe import _clean_nan, _json_default
    os.makedirs(out_dir, exist_ok=True)
    json_path, md_path = os.path.join(out_dir, f"{stem}.json"), os.path.join(out_dir, f"{stem}.md")
    with open(json_path, "w") as f:
        json.dump(_clean_nan(payload), f, indent=2, default=_json_default)
    with open(md_path, "w") as f:
        f.write(md)
    return json_path, md_path
