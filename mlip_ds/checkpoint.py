"""DeepSpeed engine checkpoints: tagged by step, pruned to the last N, resumable with 'latest'."""
from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import torch.distributed as dist

log = logging.getLogger(__name__)
TAG = re.compile(r"^step(\d{8})$")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def list_tags(ckpt_dir: Path) -> list[str]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG.match(p.name))


def save(engine, ckpt_dir: Path, step: int, client_state: dict, keep_last: int) -> None:
    """Collective: every rank calls it. DeepSpeed writes ``latest`` only after the tag is complete."""
    engine.save_checkpoint(str(ckpt_dir), tag=tag_for(step), client_state=client_state, save_latest=True)
    if dist.get_rank() == 0 and keep_last > 0:
        for old in list_tags(ckpt_dir)[:-keep_last]:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    dist.barrier()


def resume(engine, ckpt_dir: Path, which: str) -> dict | None:
    """Load 'latest' (or a named tag). 'latest' with no checkpoint yet starts fresh (a requeued job's
    first start); a named tag that does not exist is an error."""
    if which == "latest":
        if not (ckpt_dir / "latest").exists():
            log.info("no checkpoint in %s yet: starting from scratch", ckpt_dir)
            return None
        tag = None
    else:
        tag = which
        if not (ckpt_dir / tag).is_dir():
            raise FileNotFoundError(f"checkpoint '{tag}' not found in {ckpt_dir}; have {list_tags(ckpt_dir)}")
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load a checkpoint from {ckpt_dir} (tag {which})")
    log.info("resumed from %s", path)
    return client_state or {}
