"""Checkpoints that a kill at any moment cannot break.

A checkpoint is a tag folder ``stepNNNNNNNN`` written by DeepSpeed (model, optimizer, scheduler
states), plus one ``trainer_rank<r>.json`` per rank (data-stream positions, RNG states) and a
``COMPLETE`` marker written only after every rank has finished. ``latest`` is replaced
atomically (temp file + rename) after the marker; resuming picks ``latest`` if it is complete, else
the newest complete tag. So a kill during a save leaves the previous checkpoint as the one loaded.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
TAG = re.compile(r"^step(\d{8})$")
COMPLETE = "COMPLETE"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def complete_tags(ckpt_dir: Path) -> list[str]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if TAG.match(p.name) and (p / COMPLETE).exists())


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    """RNG states as JSON-safe lists (no pickle needed to restore them)."""
    return {"torch": torch.get_rng_state().tolist(), "python": _listify(random.getstate())}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _listify(x):
    return [_listify(v) for v in x] if isinstance(x, (list, tuple)) else x


def _fault(point: str, step: int) -> None:
    """Test hook: MLIP_FAULT_INJECT=kill_in_save:STEP kills this process in the middle of a save."""
    spec = os.environ.get("MLIP_FAULT_INJECT", "")
    if spec == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def save(engine, ckpt_dir: Path, step: int, client_state: dict, rank_state: dict, keep_last: int) -> None:
    """Collective: every rank calls it."""
    rank = dist.get_rank()
    tag = tag_for(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    atomic_write_text(ckpt_dir / tag / f"trainer_rank{rank}.json", json.dumps({**rank_state, "rng": rng_state()}))
    _fault("kill_in_save", step)
    dist.barrier()
    if rank == 0:
        atomic_write_text(ckpt_dir / tag / COMPLETE, "")
        atomic_write_text(ckpt_dir / "latest", tag)
        if keep_last > 0:
            for old in complete_tags(ckpt_dir)[:-keep_last]:
                shutil.rmtree(ckpt_dir / old, ignore_errors=True)
        for partial in ckpt_dir.iterdir():  # leftovers of saves that were killed
            if TAG.match(partial.name) and not (partial / COMPLETE).exists() and partial.name < tag:
                shutil.rmtree(partial, ignore_errors=True)
    dist.barrier()


def pick_tag(ckpt_dir: Path, which: str) -> str | None:
    """'latest' -> the tag in ``latest`` if complete, else the newest complete tag, else None."""
    if which != "latest":
        if not (ckpt_dir / which / COMPLETE).exists():
            raise FileNotFoundError(f"checkpoint '{which}' not found or incomplete in {ckpt_dir}; "
                                    f"complete ones: {complete_tags(ckpt_dir)}")
        return which
    tags = complete_tags(ckpt_dir)
    latest = ckpt_dir / "latest"
    named = latest.read_text().strip() if latest.exists() else None
    if named in tags:
        return named
    if named:
        log.warning("checkpoint '%s' named in %s is incomplete; using %s", named, latest, tags[-1] if tags else None)
    return tags[-1] if tags else None


def resume(engine, ckpt_dir: Path, which: str) -> tuple[dict, dict] | None:
    """Load a checkpoint into the engine; return (client_state, this rank's trainer state) or None
    when 'latest' finds nothing yet (a requeued job's first start)."""
    tag = pick_tag(ckpt_dir, which)
    if tag is None:
        log.info("no checkpoint in %s yet: starting from scratch", ckpt_dir)
        return None
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    rank_file = ckpt_dir / tag / f"trainer_rank{dist.get_rank()}.json"
    rank_state = json.loads(rank_file.read_text()) if rank_file.exists() else {}
    if "rng" in rank_state:
        set_rng_state(rank_state["rng"])
    log.info("resumed from %s", ckpt_dir / tag)
    return client_state or {}, rank_state
