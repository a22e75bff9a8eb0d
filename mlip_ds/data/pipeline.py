"""Shards -> batches: the WebDataset streaming pipeline used by training.

Two ways to hand shards to ranks and workers:
- ``resampled`` (default, open_clip's scheme for large runs): every rank/worker draws shards with
  replacement from its own seeded stream; no splitting, any number of shards works.
- ``split``: shards are split by node (rank) and then by worker, each reading a disjoint subset
  and cycling through it; needs at least ranks x workers shards.
Samples are shuffled in a buffer, decoded, augmented and tokenized in the loader workers, and
batched there. An epoch is a fixed number of batches per rank (samples_per_epoch / world / batch).
"""
from __future__ import annotations

import glob
import io
import json
import logging
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import webdataset as wds
from PIL import Image

from mlip_ds.data.text_augment import augment_report
from mlip_ds.data.transforms import train_transform

log = logging.getLogger(__name__)


class ShardPathError(FileNotFoundError):
    """The shard specification does not point at any readable tar file."""


def expand_shards(spec: str) -> list[str]:
    """Resolve a shard spec to tar paths: a directory (its ``*.tar``), a brace pattern, a glob, or a
    ``::``-separated list of those. Fails with a message that says what to fix."""
    urls: list[str] = []
    for part in spec.split("::"):
        if os.path.isdir(part):
            found = sorted(glob.glob(os.path.join(part, "*.tar")))
            if not found:
                raise ShardPathError(f"no *.tar shards in directory '{part}'; make some with "
                                     f"`python tools/make_shards.py synthetic --out {part}`")
            urls += found
            continue
        expanded = wds.shardlists.expand_urls(part)
        expanded = [p for e in expanded for p in (sorted(glob.glob(e)) if any(c in e for c in "*?[") else [e])]
        missing = [p for p in expanded if "://" not in p and not os.path.isfile(p)]
        if missing or not expanded:
            raise ShardPathError(f"shard file(s) not found: {missing[:3] or part} (from --train-shards "
                                 f"'{spec}'); pass a shard directory, a brace pattern like "
                                 "'data/shard-{000000..000009}.tar', or a glob; "
                                 "make shards with `python tools/make_shards.py synthetic|csv --out DIR`")
        urls += expanded
    return urls


# Samples a worker skipped because its tar stream was unreadable (counted by the handler below,
# read by ``decode_stream`` of the same worker process and reported with its batches).
_TAR_ERRORS = {"count": 0}


def log_and_continue(exn: Exception) -> bool:
    """WebDataset handler: log the bad sample (the exception names shard and key), count it, go on."""
    _TAR_ERRORS["count"] += 1
    log.warning("skipped unreadable shard data: %r", exn)
    return True


def decode_sample(sample: dict) -> dict:
    """Decode only image, text and JSON members (never pickle: shard contents are untrusted)."""
    key = sample.get("__key__", "?")
    url = sample.get("__url__", "?")
    image_bytes = sample.get("png", sample.get("jpg", sample.get("jpeg")))
    if image_bytes is None or "txt" not in sample:
        raise ValueError(f"sample lacks an image (png/jpg) or txt member (has {sorted(k for k in sample if not k.startswith('__'))})")
    image = Image.open(io.BytesIO(image_bytes))
    image.load()
    text = sample["txt"].decode("utf-8")
    meta = json.loads(sample["json"].decode("utf-8")) if "json" in sample else {}
    return {"__key__": key, "__url__": url, "image": image, "text": text, "meta": meta}


def seed_cpu(seed: int) -> None:
    """Seed the CPU generator only (what the torchvision transforms draw from). ``torch.manual_seed``
    also queues a seed for every lazily initialised accelerator module, and records a stack trace
    for each: about 1 ms per call, per sample, in the loader workers."""
    torch.default_generator.manual_seed(seed)


@dataclass
class LoaderSpec:
    shards: str
    batch_size: int                # per rank
    batches_per_epoch: int         # per rank
    image_size: int
    mean: tuple
    std: tuple
    workers: int = 2
    shuffle_buffer: int = 1000
    seed: int = 0
    mode: str = "resampled"        # or "split"
    # What the MLIP terms need on top of (image, text); off: the batches are exactly the CLIP ones.
    second_view: bool = False      # image2 / text2: another augmentation of each sample (divergence)
    raw: bool = False              # report (str), entities (list of dicts), labels (dict) per sample
    text_word_dropout: float = 0.1     # second text view: word dropout (text_augment.py)
    text_sentence_shuffle: bool = True  # second text view: shuffle sentences within sections
    # (batch, seed) -> batch, run in the worker after batching (the trainer's MLIPModel inputs);
    # ``seed`` comes from the batch's stream position, so its random draws replay on resume.
    batch_fn: Callable[[dict, int], dict] | None = None
    timeout: float = 0.0           # seconds per batch from a worker before StallGuard rebuilds (0: none)
    intensity_jitter: float = 0.0  # brightness/contrast jitter of both views (transforms.train_transform)


def stream_id(start_batch: int, num_streams: int) -> int:
    """The logical stream this worker process reads. The DataLoader hands out batches round-robin
    from worker 0; a run resumed after ``start_batch`` batches must continue with the stream that
    was next, so physical worker p reads logical stream (p + start_batch) mod num_streams."""
    info = torch.utils.data.get_worker_info()
    return ((info.id if info else 0) + start_batch) % num_streams


def shard_stages(urls: list[str], mode: str, seed: int, rank: int, world: int, stream) -> list:
    """The first pipeline stages: which shard URLs this (rank, stream) reads, forever."""
    if mode == "resampled":
        return [wds.ResampledShards(urls, seed=seed, deterministic=True,
                                    worker_seed=lambda: rank * 1000 + stream())]
    if mode != "split":
        raise ValueError(f"data mode must be 'resampled' or 'split', got {mode!r}")

    def split_and_cycle():
        ours = urls[rank::world][stream.id()::stream.count]
        while True:  # an epoch is a number of batches, so each stream cycles through its shards
            yield from ({"url": u} for u in ours)

    return [split_and_cycle]


class _Stream:
    """Callable giving this worker's logical stream id (evaluated inside the worker process)."""

    def __init__(self, start_batch: int, count: int):
        self.start_batch, self.count = start_batch, count

    def id(self) -> int:
        return stream_id(self.start_batch, self.count)

    __call__ = id


def _injected_stall(epoch: int, rank: int) -> None:
    """Test hook: MLIP_FAULT_INJECT=stall_worker:EPOCH:MARKER hangs one loader worker of rank 0 in
    that epoch, once (the MARKER file records it; an empty MARKER: every time): a worker hung at its
    start, as gh-112275 leaves it."""
    spec = os.environ.get("MLIP_FAULT_INJECT", "")
    if not spec.startswith("stall_worker:") or rank != 0 or torch.utils.data.get_worker_info() is None:
        return
    at, marker = spec[len("stall_worker:"):].split(":", 1)
    if int(at) == epoch:
        if marker:
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return
        time.sleep(3600)


def fork_hang_warning(workers: int, world: int, version: tuple = tuple(sys.version_info[:3])) -> str:
    """The start-up warning for a Python whose forked loader workers can hang (gh-112275, fixed in
    3.11.8), or "" when this run is safe: no workers, one rank (no gloo threads), or a fixed Python."""
    if workers <= 0 or world <= 1 or not ((3, 11, 0) <= tuple(version) < (3, 11, 8)):
        return ""
    return (f"Python {'.'.join(map(str, version))} can hang a data-loader worker at its fork (CPython "
            "gh-112275, fixed in 3.11.8); the trainer rebuilds a loader that gives no batch within "
            "--loader-timeout seconds, which costs that long per hang: use Python >= 3.11.8")


class StallGuard:
    """Iterate a loader; a DataLoader timeout ends the iteration and is kept in ``stalled`` (a message).

    Why: a worker forked while another thread of the rank creates its Python thread state (gloo's
    run loops do, after a collective) can hang for good before it runs a line on CPython < 3.11.8
    (gh-112275; seen here on 3.11.7: a rank stuck at an epoch boundary). The rank would wait on it
    until the job's time limit. With ``LoaderSpec.timeout`` the trainer sees ``stalled`` and rebuilds
    the loader at the same stream positions, which replays the same batches. Other errors pass.
    """

    def __init__(self, loader):
        self.loader, self.stalled = loader, ""

    def __iter__(self):
        it = iter(self.loader)
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except RuntimeError as e:
                if "timed out" not in str(e):
                    raise
                self.stalled = f"a data-loader worker gave no batch ({e})"  # e names the seconds
                return
            yield batch


def make_train_loader(spec: LoaderSpec, tokenizer, epoch: int = 0, start_batch: int = 0,
                      resume_positions: list[int] | None = None) -> wds.WebLoader:
    """Build the loader for one epoch (or what is left of it).

    Batches are dicts {image: B,3,H,W, text: B,L, key: [B], stream, pos, skipped}: ``stream`` is
    the logical stream the batch came from, ``pos`` the number of raw samples that stream had
    read (after shuffling) up to the batch's last sample, ``skipped`` the bad samples it skipped.
    The trainer keeps the last ``pos`` per stream in its checkpoint; ``resume_positions`` and
    ``start_batch`` replay the epoch exactly from there (skipping raw samples before decoding).
    Augmentation is seeded per sample from (seed, rank, stream, pos), so it replays too.

    ``spec.second_view`` adds ``image2`` (B,3,H,W) and ``text2`` (B,L): the same sample augmented
    again (its own per-sample seeds; the report perturbed by ``text_augment.augment_report``), and
    ``spec.raw`` adds the lists ``report``, ``entities`` and ``labels`` (from the sample's json).
    Neither changes ``image``/``text`` or the stream positions. ``spec.batch_fn`` finishes each
    batch in the worker (seeded from the batch's stream and position).
    """
    urls = expand_shards(spec.shards)
    seed = wds.utils.make_seed(spec.seed, epoch)
    rank, world, _, _ = wds.utils.pytorch_worker_info()
    streams = max(1, spec.workers)
    if spec.mode == "split" and len(urls) < world * streams:
        raise ShardPathError(f"--data-mode split needs at least ranks x workers = {world} x {streams} shards, "
                             f"found {len(urls)}; make more, smaller shards (--samples-per-shard) or use "
                             "--data-mode resampled")
    stream = _Stream(start_batch, streams)
    skip = list(resume_positions or [0] * streams)
    transform = train_transform(spec.image_size, spec.mean, spec.std, intensity_jitter=spec.intensity_jitter)

    def shuffle(src):
        rng = random.Random(wds.utils.make_seed(seed, rank, stream()))
        return wds.filters._shuffle(src, spec.shuffle_buffer, min(spec.shuffle_buffer, 100), rng)

    def decode_stream(src):
        sid = stream()
        bad = 0
        _injected_stall(epoch, rank)
        for pos, raw in enumerate(src, start=1):
            if pos <= skip[sid]:
                continue  # consumed before the checkpoint: skipped without decoding
            try:
                sample = decode_sample(raw)
                with torch.random.fork_rng(devices=[]):  # leave the caller's RNG (dropout) untouched
                    seed_cpu(wds.utils.make_seed(seed, rank, sid, pos))
                    image = transform(sample["image"])
                text = sample["text"]  # tokenized per batch (``tokenize_batches``): one call, not B
                extra = extras(sample, sid, pos)
            except Exception as exn:  # noqa: BLE001 - any bad sample is skipped and counted
                bad += 1
                log.warning("skipped bad sample %s in %s: %r", raw.get("__key__"), raw.get("__url__"), exn)
                continue
            yield {"image": image, "text": text, "key": sample["__key__"], "stream": sid, "pos": pos,
                   "skipped": bad + _TAR_ERRORS["count"], **extra}

    def extras(sample: dict, sid: int, pos: int) -> dict:
        """What the MLIP terms need: a second view (own seeds: the first view is unchanged) and the
        raw report, entities and labels."""
        out = {}
        if spec.second_view:
            with torch.random.fork_rng(devices=[]):
                seed_cpu(wds.utils.make_seed(seed, rank, sid, pos, 1))
                out["image2"] = transform(sample["image"])
            rng = random.Random(wds.utils.make_seed(seed, rank, sid, pos, 2))
            report = augment_report(sample["text"], rng, spec.text_sentence_shuffle, spec.text_word_dropout)
            out["text2"] = report
        if spec.raw:
            meta = sample["meta"] if isinstance(sample["meta"], dict) else {}
            entities = meta.get("entities", [])
            out["report"] = sample["text"]
            out["entities"] = [e for e in entities if isinstance(e, dict)] if isinstance(entities, list) else []
            out["labels"] = meta.get("labels", {}) if isinstance(meta.get("labels", {}), dict) else {}
        return out

    def tokenize_batches(src):
        """The batch's reports (and second views) tokenized in one call each: the tokenizer's
        per-call overhead was a quarter of the loader's time when it ran per sample."""
        for batch in src:
            batch["text"] = tokenizer(list(batch["text"]))
            if "text2" in batch:
                batch["text2"] = tokenizer(list(batch["text2"]))
            yield batch

    def finish_batches(src):
        for batch in src:
            yield spec.batch_fn(batch, wds.utils.make_seed(seed, rank, int(batch["stream"][-1]),
                                                           int(batch["pos"][-1]), 3))

    dataset = wds.DataPipeline(
        *shard_stages(urls, spec.mode, seed, rank, world, stream),
        wds.tarfile_to_samples(handler=log_and_continue),
        shuffle,
        decode_stream,
        wds.batched(spec.batch_size, partial=False, collation_fn=wds.filters.default_collation_fn),
        tokenize_batches,
        *([finish_batches] if spec.batch_fn is not None else []),
    )
    per_stream = -(-spec.batches_per_epoch // streams)  # ceil: with_epoch counts per worker
    # Its own generator: creating the iterator would otherwise draw from the global RNG, so a
    # resumed run (which creates it at another step) would get other dropout masks. Pinned batches
    # on CUDA: the trainer's non_blocking copies then overlap the step instead of blocking it.
    loader = wds.WebLoader(dataset.with_epoch(per_stream), batch_size=None, shuffle=False,
                           num_workers=max(0, spec.workers), persistent_workers=False,
                           pin_memory=torch.cuda.is_available(),
                           timeout=spec.timeout if spec.workers > 0 else 0,
                           generator=torch.Generator().manual_seed(seed))
    return loader.with_epoch(spec.batches_per_epoch)
