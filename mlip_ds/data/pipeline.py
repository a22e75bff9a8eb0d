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
from dataclasses import dataclass

import webdataset as wds
from PIL import Image

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


def log_and_continue(exn: Exception) -> bool:
    """WebDataset handler: log the bad sample (the exception names shard and key) and go on."""
    log.warning("skipped a bad sample: %r", exn)
    return True


def _decode_sample(sample: dict) -> dict:
    """Decode only image, text and JSON members (never pickle: shard contents are untrusted)."""
    key = sample.get("__key__", "?")
    url = sample.get("__url__", "?")
    image_bytes = sample.get("png", sample.get("jpg", sample.get("jpeg")))
    if image_bytes is None or "txt" not in sample:
        raise ValueError(f"{url}: sample {key} lacks an image (png/jpg) or txt member")
    image = Image.open(io.BytesIO(image_bytes))
    image.load()
    text = sample["txt"].decode("utf-8")
    meta = json.loads(sample["json"].decode("utf-8")) if "json" in sample else {}
    return {"__key__": key, "image": image, "text": text, "meta": meta}


def _seeded_shuffle(bufsize: int, seed: int):
    """A shuffle stage whose RNG depends on (seed, rank, worker): reproducible and distinct per worker.
    (webdataset's ``detshuffle`` seeds every worker alike.)"""
    def stage(src):
        rng = random.Random(wds.utils.make_seed(seed, wds.utils.pytorch_worker_seed()))
        return wds.filters._shuffle(src, bufsize, min(bufsize, 100), rng)
    return stage


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


def shard_stages(urls: list[str], mode: str, seed: int, workers: int) -> list:
    """The first pipeline stages: which shard URLs this rank/worker reads, forever."""
    if mode == "resampled":
        return [wds.ResampledShards(urls, seed=seed, deterministic=True)]
    if mode != "split":
        raise ValueError(f"data mode must be 'resampled' or 'split', got {mode!r}")
    rank, world, _, _ = wds.utils.pytorch_worker_info()
    if len(urls) < world * workers:
        raise ShardPathError(f"--data-mode split needs at least ranks x workers = {world} x {workers} shards, "
                             f"found {len(urls)}; make more, smaller shards (--samples-per-shard) or use "
                             "--data-mode resampled")

    def cycle(src):
        urls_here = list(src)
        while True:  # an epoch is a number of batches, so each worker cycles through its shards
            yield from ({"url": u} for u in urls_here)

    return [wds.SimpleShardList(urls), wds.split_by_node, wds.split_by_worker,
            lambda src: cycle(d["url"] for d in src)]


def make_train_loader(spec: LoaderSpec, tokenizer, epoch: int = 0) -> wds.WebLoader:
    """Build the loader for one epoch; batches are dicts {image: B,3,H,W, text: B,L, key: [B]}.

    The seed mixes in ``epoch`` so each epoch (and a resumed run) draws a new, reproducible stream.
    """
    urls = expand_shards(spec.shards)
    seed = wds.utils.make_seed(spec.seed, epoch)
    transform = train_transform(spec.image_size, spec.mean, spec.std)

    def to_training(sample):
        return {"image": transform(sample["image"]), "text": tokenizer(sample["text"])[0],
                "key": sample["__key__"]}

    workers = max(0, spec.workers)
    dataset = wds.DataPipeline(
        *shard_stages(urls, spec.mode, seed, max(1, workers)),
        wds.tarfile_to_samples(handler=log_and_continue),
        _seeded_shuffle(spec.shuffle_buffer, seed),
        wds.map(_decode_sample, handler=log_and_continue),
        wds.map(to_training, handler=log_and_continue),
        wds.batched(spec.batch_size, partial=False, collation_fn=wds.filters.default_collation_fn),
    )
    per_worker = -(-spec.batches_per_epoch // max(1, workers))  # ceil: with_epoch counts per worker
    dataset = dataset.with_epoch(per_worker)
    loader = wds.WebLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                           persistent_workers=False, pin_memory=False)
    return loader.with_epoch(spec.batches_per_epoch)
