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

A checkpoint saved on another number of ranks (ZeRO stage 1-3) is converted once to DeepSpeed's
universal format in ``stepNNNNNNNN_universal`` next to it (built in a temporary folder, renamed
into place, with its own checksummed marker) and loaded from there; the data-stream position is
carried over by samples (``remap_data_position``): see docs/resume.md.
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
UNIVERSAL = "_universal"  # stepNNNNNNNN_universal: that tag converted by ds_to_universal


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed here; the message says why and what to do."""


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def complete_tags(ckpt_dir: Path) -> list[str]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if TAG.match(p.name) and (p / COMPLETE).exists())


def replace_dir(tmp: Path, out: Path) -> None:
    """Put the finished folder ``tmp`` at ``out``: renames only, so a kill leaves either the old
    folder, the new one, or the old one under ``<out>.old`` next to the new one, never a half."""
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


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


def saved_world_size(tag_dir: Path) -> tuple[int | None, int | None]:
    """(world size, ZeRO stage) a checkpoint was saved with: from ``run.json``, else (older saves)
    the number of ``trainer_rank*.json`` files and an unknown stage."""
    path = tag_dir / SIGNATURE
    if path.exists():
        saved = json.loads(path.read_text())
        return saved.get("world_size"), saved.get("zero_stage")
    return len(list(tag_dir.glob("trainer_rank*.json"))) or None, None


def convert_to_universal(ckpt_dir: Path, tag: str) -> str:
    """Rank 0: DeepSpeed's ``ds_to_universal`` of ``tag`` into ``<tag>_universal`` (reused when
    already there and intact). Written under a temporary name and renamed: a kill leaves no
    half-converted folder that looks finished. Returns the universal tag. Same as

        python -m deepspeed.checkpoint.ds_to_universal --inject_missing_state \\
            --input_folder CKPT/stepN --output_folder CKPT/stepN_universal
    """
    import argparse
    import contextlib
    import io

    from deepspeed.checkpoint import ds_to_universal

    utag = tag + UNIVERSAL
    out = ckpt_dir / utag
    if (out / COMPLETE).exists() and damage(out) is None:
        log.info("using the universal checkpoint %s converted earlier", out)
        return utag
    shutil.rmtree(out, ignore_errors=True)
    for leftover in ckpt_dir.glob(f".{utag}.tmp*"):  # a conversion that was killed
        shutil.rmtree(leftover, ignore_errors=True)
    work = ckpt_dir / f".{utag}.tmp{os.getpid()}"
    work.mkdir()
    # ds_to_universal writes 'latest_universal' next to its output folder: here, inside ``work``.
    args = argparse.Namespace(input_folder=str(ckpt_dir / tag), output_folder=str(work / utag),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            ds_to_universal.main(args)
    except Exception as e:  # noqa: BLE001 - any failure of the converter is reported with its cause
        shutil.rmtree(work, ignore_errors=True)
        raise CheckpointError(f"could not convert checkpoint {ckpt_dir / tag} to DeepSpeed's universal format "
                              f"({type(e).__name__}: {str(e)[:300]})") from e
    log.debug("ds_to_universal: %s", printed.getvalue())
    for name in (SIGNATURE,):
        if (ckpt_dir / tag / name).exists():
            shutil.copy2(ckpt_dir / tag / name, work / utag / name)
    atomic_write_text(work / utag / COMPLETE, json.dumps({"files": file_digests(work / utag)}, indent=1))
    os.replace(work / utag, out)
    shutil.rmtree(work, ignore_errors=True)
    return utag


def remap_data_position(client_state: dict, saved_world: int, world: int, micro_batch: int, accum: int) -> dict:
    """The epoch's position on a new world size, kept in samples: the saved ranks had read
    ``micro_in_epoch`` micro-batches each, ``micro_in_epoch x saved global micro-batch`` samples of
    the epoch; the new ranks start at the micro-batch that count reaches with the new global
    micro-batch (rounded down to a whole optimizer step), so the epoch still ends after the same
    number of samples. The step, the LR schedule's position and ``samples_seen`` carry over as they
    are. Each (rank, stream) of ranks that existed before continues where it stopped (its
    ``trainer_rank<r>.json``); ranks that did not exist start their streams at 0. docs/resume.md
    says what that means for samples seen twice."""
    ds_saved = client_state.get("ds_config") or {}
    saved_micro = int(ds_saved.get("train_micro_batch_size_per_gpu") or micro_batch)
    saved_accum = int(ds_saved.get("gradient_accumulation_steps") or accum)
    consumed = int(client_state.get("micro_in_epoch", 0)) * saved_micro * saved_world
    new_micro = consumed // (micro_batch * world)
    new_micro -= new_micro % accum
    if saved_micro * saved_accum * saved_world != micro_batch * accum * world:
        log.warning("the global batch changed from %d (%d ranks x %d x %d accumulation) to %d (%d x %d x %d): "
                    "the step count and the LR schedule's position carry over, but a step now holds another "
                    "number of samples (keep --batch-size x --grad-accum x ranks the same for an exact "
                    "continuation of the schedule)", saved_micro * saved_accum * saved_world, saved_world,
                    saved_micro, saved_accum, micro_batch * accum * world, world, micro_batch, accum)
    log.info("world size %d -> %d: %d samples of epoch %s were read; continuing at micro-batch %d of the epoch "
             "(%d samples again from rounding to a whole step)", saved_world, world, consumed,
             client_state.get("epoch"), new_micro, consumed - new_micro * micro_batch * world)
    return {**client_state, "micro_in_epoch": new_micro, "resumed_world_size_from": saved_world}


def save(engine, ckpt_dir: Path, step: int, client_state: dict, rank_state: dict, keep_last: int,
         signature: dict | None = None) -> None:
    """Collective: every rank calls it."""
    rank = dist.get_rank()
    tag = tag_for(step)
    if rank == 0 and (ckpt_dir / tag).exists():  # saved again (after a resume): not complete until done
        (ckpt_dir / tag / COMPLETE).unlink(missing_ok=True)
        # Files of the old save that this one does not rewrite (other ranks after a world-size
        # change) would be mixed in: start the folder afresh, and its universal copy with it.
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
        shutil.rmtree(ckpt_dir / (tag + UNIVERSAL), ignore_errors=True)
    dist.barrier()
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
            elif partial.name.endswith(UNIVERSAL) and not (ckpt_dir / partial.name[:-len(UNIVERSAL)]).is_dir():
                shutil.rmtree(partial, ignore_errors=True)  # its checkpoint was removed
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
    saved_world, saved_stage, load_tag = None, None, tag
    if signature is not None:
        check_signature(ckpt_dir / tag, signature)
        saved_world, saved_stage = saved_world_size(ckpt_dir / tag)
        if saved_world == signature["world_size"]:
            saved_world = None
    if saved_world is not None and (saved_stage or 0) >= 1:
        # ZeRO's optimizer partitions belong to the saved ranks: load through the universal format.
        choice = [None, None]
        if dist.get_rank() == 0:
            log.info("checkpoint %s was saved on %d rank(s), this run has %d: converting it to DeepSpeed's "
                     "universal format", ckpt_dir / tag, saved_world, signature["world_size"])
            try:
                choice = [convert_to_universal(ckpt_dir, tag), None]
            except CheckpointError as e:
                choice = [None, f"{e}. Resume it on {saved_world} rank(s) as it was saved (deepspeed --num_gpus "
                                f"{saved_world} mlip_ds/train.py ..., or {saved_world} SLURM tasks), or start a "
                                "new --out-dir"]
        dist.broadcast_object_list(choice, src=0)
        load_tag, error = choice
        if error:
            raise CheckpointError(error)
    universal = load_tag != tag
    engine._config.load_universal_checkpoint = universal  # DeepSpeed reads it at load time only
    try:
        path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=load_tag)
    finally:
        engine._config.load_universal_checkpoint = False
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / load_tag}")
    client_state = client_state or {}
    rank_file = ckpt_dir / tag / f"trainer_rank{dist.get_rank()}.json"  # absent for a rank that is new
    rank_state = json.loads(rank_file.read_text()) if rank_file.exists() else {}
    if "rng" in rank_state:
        set_rng_state(rank_state["rng"])
    if saved_world is not None:
        client_state = remap_data_position(client_state, saved_world, signature["world_size"],
                                           engine.train_micro_batch_size_per_gpu(),
                                           engine.gradient_accumulation_steps())
    log.info("resumed from %s%s", ckpt_dir / tag, f" (through {load_tag})" if universal else "")
    return client_state, rank_state
