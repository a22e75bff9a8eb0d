"""Checkpoints that a kill at any moment cannot break.

A checkpoint is a tag folder ``stepNNNNNNNN`` written by DeepSpeed (model, optimizer, scheduler
states), plus one ``trainer_rank<r>.json`` per rank (data-stream positions, RNG states) and a
``COMPLETE`` marker written only after every rank has finished. ``latest`` is replaced
atomically (temp file + rename) after the marker; resuming picks ``latest`` if it is complete, else
the newest complete tag. So a kill during a save leaves the previous checkpoint as the one loaded.
The marker holds each file's size and sha256 (rank 0 hashes the folder once every rank has written
its part); a resume verifies them and, for ``latest``, falls back to the newest intact checkpoint,
naming the ones skipped. Markers without checksums (older saves) load unverified.
Rank 0 also writes ``run.json`` (model config, objective, parameter shapes, world size, ZeRO stage):
a resume compares it with the current run before DeepSpeed loads anything.
"""
from __future__ import annotations

import hashlib
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
SIGNATURE = "run.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed here; the message says why and what to do."""


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


def run_signature(module, model_cfg: dict, objective: dict, concepts, world_size: int, zero_stage: int) -> dict:
    """What a checkpoint must share with the run that loads it (``run.json``): the model config,
    every parameter's full shape (ZeRO-3's ``ds_shape``), the concept vocabulary; the objective,
    world size and ZeRO stage are recorded to explain a mismatch and to spot a new world size."""
    params = {n: list(getattr(p, "ds_shape", p.shape)) for n, p in module.named_parameters()}
    return {"model": model_cfg, "params": params, "concepts": concepts, "objective": objective,
            "world_size": world_size, "zero_stage": zero_stage}


def _diff(saved, now, prefix="") -> list[str]:
    """Dotted keys whose values differ, as 'key (saved X, now Y)'."""
    if isinstance(saved, dict) and isinstance(now, dict):
        return [d for k in sorted(set(saved) | set(now), key=str)
                for d in _diff(saved.get(k, "<unset>"), now.get(k, "<unset>"), f"{prefix}{k}.")]
    return [] if saved == now else [f"{prefix.rstrip('.')} (saved {saved!r}, now {now!r})"]


def check_signature(tag_dir: Path, current: dict) -> None:
    """Refuse, before DeepSpeed's load, a checkpoint of another model: say which keys differ."""
    path = tag_dir / SIGNATURE
    if not path.exists():
        log.info("%s has no %s (saved by an older version): model config not compared before loading",
                 tag_dir, SIGNATURE)
        return
    saved = json.loads(path.read_text())
    model = _diff(saved.get("model"), current["model"])
    names_s, names_n = set(saved.get("params", {})), set(current["params"])
    shapes = [f"{n} (saved {saved['params'][n]}, now {current['params'][n]})"
              for n in sorted(names_s & names_n) if saved["params"][n] != current["params"][n]]
    concepts = saved.get("concepts") != current["concepts"]
    if not (model or shapes or names_s != names_n or concepts):
        return
    parts = []
    if model:
        parts.append("model config keys that differ: " + "; ".join(model[:12]) + (" ..." if len(model) > 12 else ""))
    objective = _diff(saved.get("objective", {}), current["objective"])
    if objective:
        parts.append("objective keys that differ: " + "; ".join(objective[:12]) + (" ..." if len(objective) > 12 else ""))
    if names_s != names_n:
        missing, extra = sorted(names_s - names_n), sorted(names_n - names_s)
        parts.append(f"{len(missing)} saved parameters this model lacks {missing[:4]}, {len(extra)} of this model's "
                     f"not in the checkpoint {extra[:4]}")
    if shapes:
        parts.append(f"{len(shapes)} parameters with another shape: " + "; ".join(shapes[:4]))
    if concepts:
        parts.append("the concept vocabulary differs (--kb)")
    raise CheckpointError(f"checkpoint {tag_dir} was saved by another model configuration: " + ". ".join(parts)
                          + ". Resume with the flags it was saved with (its run.json), or start a new --out-dir")


def file_digests(tag_dir: Path) -> dict[str, dict]:
    """{relative path: {"size", "sha256"}} of every file in a tag folder but the marker."""
    out = {}
    for path in sorted(tag_dir.rglob("*")):
        if path.is_file() and path.name != COMPLETE:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
            out[str(path.relative_to(tag_dir))] = {"size": path.stat().st_size, "sha256": h.hexdigest()}
    return out


def damage(tag_dir: Path) -> str | None:
    """What is wrong with a complete checkpoint's files against its marker's checksums; None when
    intact, or when the marker has none (an older save: loaded unverified)."""
    text = (tag_dir / COMPLETE).read_text()
    try:
        files = json.loads(text)["files"] if text.strip() else None
    except (ValueError, KeyError, TypeError):
        return f"its {COMPLETE} marker is unreadable"
    if files is None:
        log.info("checkpoint %s has no checksums (saved by an older version): loading it unverified", tag_dir)
        return None
    for name, want in files.items():
        path = tag_dir / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{name} is {size} bytes, {want['size']} were saved"
    now = file_digests(tag_dir)
    for name, want in files.items():
        if now[name]["sha256"] != want["sha256"]:
            return f"{name} does not match its sha256 checksum"
    return None


def check_world_size(tag_dir: Path, world_size: int) -> None:
    """Refuse, before DeepSpeed's load, a checkpoint saved on another number of ranks: ZeRO's
    optimizer state and the trainer's data-stream positions are per rank (DeepSpeed 0.19.8 raises
    ZeRORuntimeException on every rank). Say exactly how to resume it."""
    path = tag_dir / SIGNATURE
    if path.exists():
        saved = json.loads(path.read_text()).get("world_size")
    else:  # an older save: one trainer file per rank
        saved = len(list(tag_dir.glob("trainer_rank*.json"))) or None
    if saved is None or saved == world_size:
        return
    raise CheckpointError(
        f"checkpoint {tag_dir} was saved on {saved} rank(s); this run has {world_size}. Resuming on another world "
        f"size is not supported yet (ZeRO's optimizer partitions and each rank's data-stream position belong to "
        f"the saved ranks): rerun with {saved} rank(s) (deepspeed --num_gpus {saved} mlip_ds/train.py ..., or "
        f"{saved} SLURM tasks), or start a new --out-dir")


def save(engine, ckpt_dir: Path, step: int, client_state: dict, rank_state: dict, keep_last: int,
         signature: dict | None = None) -> None:
    """Collective: every rank calls it."""
    rank = dist.get_rank()
    tag = tag_for(step)
    if rank == 0 and (ckpt_dir / tag / COMPLETE).exists():  # saved again (after a resume): not complete until done
        (ckpt_dir / tag / COMPLETE).unlink()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    atomic_write_text(ckpt_dir / tag / f"trainer_rank{rank}.json", json.dumps({**rank_state, "rng": rng_state()}))
    if rank == 0 and signature is not None:
        atomic_write_text(ckpt_dir / tag / SIGNATURE, json.dumps(signature, indent=1, default=str))
    _fault("kill_in_save", step)
    dist.barrier()
    if rank == 0:
        atomic_write_text(ckpt_dir / tag / COMPLETE, json.dumps({"files": file_digests(ckpt_dir / tag)}, indent=1))
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


def pick_intact_tag(ckpt_dir: Path, which: str) -> str | None:
    """``pick_tag``, then verified against the marker's checksums: for 'latest', a damaged checkpoint
    is skipped (with a warning naming it and what is wrong) for the newest intact one; an explicit
    tag, or no intact one left, raises ``CheckpointError`` with the cause."""
    tag = pick_tag(ckpt_dir, which)
    if tag is None:
        return None
    if which != "latest":
        bad = damage(ckpt_dir / tag)
        if bad:
            raise CheckpointError(f"checkpoint {ckpt_dir / tag} is damaged: {bad}. Resume another one "
                                  f"(--resume latest or one of {complete_tags(ckpt_dir)})")
        return tag
    candidates = [tag] + [t for t in reversed(complete_tags(ckpt_dir)) if t != tag]
    skipped = []
    for t in candidates:
        bad = damage(ckpt_dir / t)
        if bad is None:
            if skipped:
                log.warning("skipped damaged checkpoint(s) %s; resuming from %s",
                            "; ".join(f"{s} ({why})" for s, why in skipped), t)
            return t
        log.warning("checkpoint %s is damaged: %s", ckpt_dir / t, bad)
        skipped.append((t, bad))
    raise CheckpointError(f"no intact checkpoint in {ckpt_dir}: " + "; ".join(f"{s}: {why}" for s, why in skipped)
                          + ". Remove the damaged folders and rerun without --resume to start over")


def resume(engine, ckpt_dir: Path, which: str, signature: dict | None = None) -> tuple[dict, dict] | None:
    """Load a checkpoint into the engine; return (client_state, this rank's trainer state) or None
    when 'latest' finds nothing yet (a requeued job's first start). With ``signature`` (this run's
    ``run_signature``) a checkpoint of another model is refused before DeepSpeed loads it.
    Rank 0 picks and verifies the checkpoint, every rank loads the one it picked."""
    choice = [None, None]
    if dist.get_rank() == 0:
        try:
            choice = [pick_intact_tag(ckpt_dir, which), None]
        except (CheckpointError, FileNotFoundError) as e:
            choice = [None, str(e)]
    dist.broadcast_object_list(choice, src=0)
    tag, error = choice
    if error:
        raise CheckpointError(error)
    if tag is None:
        log.info("no checkpoint in %s yet: starting from scratch", ckpt_dir)
        return None
    if signature is not None:
        check_signature(ckpt_dir / tag, signature)
        check_world_size(ckpt_dir / tag, signature["world_size"])
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    rank_file = ckpt_dir / tag / f"trainer_rank{dist.get_rank()}.json"
    rank_state = json.loads(rank_file.read_text()) if rank_file.exists() else {}
    if "rng" in rank_state:
        set_rng_state(rank_state["rng"])
    log.info("resumed from %s", ckpt_dir / tag)
    return client_state or {}, rank_state
