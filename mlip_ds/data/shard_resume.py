"""Resumable ``make_shards`` runs: a killed or damaged conversion is finished without redoing the
shards that are already complete.

* While a run writes, each shard that is complete (renamed into place) gets a sidecar
  ``<out>/.<prefix>-journal/NNNNNN.json`` (written atomically): its file, sha256, sample count,
  the range of jobs (input rows / indices) it consumed, the rows skipped in that range and the
  run's *fingerprint* (options + the exact job list). The finished manifest holds the same facts;
  the journal is removed once the manifest is written.
* ``--resume`` reads the manifest and the journal, keeps the records of this fingerprint whose
  file still has the recorded sha256, and :func:`resumable_map` feeds only the other jobs to the
  workers. Output is deterministic, so a rewritten shard is byte-identical to what the first run
  would have written, and a verified one is left untouched.
The input files themselves are trusted not to have changed between the runs.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import Callable, Iterator

# options that do not change the output
NEUTRAL_OPTIONS = ("workers", "quiet", "overwrite", "resume", "out")


@dataclass
class Reuse:
    """A verified shard of an earlier run, yielded in job order in place of its results."""
    record: dict


def fingerprint(options: dict, jobs: list) -> str:
    """sha256 over the output-relevant options and the job list (ids, paths, labels...)."""
    h = hashlib.sha256()
    opts = {k: v for k, v in options.items() if k not in NEUTRAL_OPTIONS}
    h.update(json.dumps(opts, sort_keys=True, default=str).encode())
    for job in jobs:
        h.update(repr(job).encode("utf-8", "surrogatepass"))
        h.update(b"\n")
    return h.hexdigest()


def journal_dir(out_dir: str, prefix: str) -> str:
    return os.path.join(out_dir, f".{prefix}-journal")


def write_record(out_dir: str, prefix: str, index: int, record: dict, fp: str) -> None:
    """Write one complete shard's sidecar atomically (after the shard itself is in place)."""
    from mlip_ds.data.shard_writer import write_atomic

    d = journal_dir(out_dir, prefix)
    os.makedirs(d, exist_ok=True)
    write_atomic(os.path.join(d, f"{index:06d}.json"),
                 json.dumps({**record, "index": index, "fingerprint": fp}, ensure_ascii=False).encode("utf-8"))


def _records_from_manifest(path: str, fp: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return {}
    if manifest.get("fingerprint") != fp:
        return {}
    out = {}
    for i, shard in enumerate(manifest.get("shards", [])):
        if "jobs" not in shard:
            continue
        s, e = shard["jobs"]
        skipped = [x for x in manifest.get("skipped", []) if s <= x.get("job", -1) < e]
        out[i] = {**shard, "skipped": skipped}
    return out


def verified_records(out_dir: str, prefix: str, manifest_path: str, fp: str) -> dict:
    """{shard index: record} of complete shards of this fingerprint whose file matches its sha256."""
    from mlip_ds.data.shard_writer import sha256_file

    records = _records_from_manifest(manifest_path, fp)
    d = journal_dir(out_dir, prefix)
    if os.path.isdir(d):
        for name in sorted(os.listdir(d)):
            if not re.fullmatch(r"\d{6}\.json", name):
                continue
            try:
                with open(os.path.join(d, name), encoding="utf-8") as f:
                    rec = json.load(f)
            except (OSError, ValueError):
                continue
            if rec.pop("fingerprint", None) == fp:
                records[int(rec.pop("index"))] = rec
    good = {}
    for i, rec in sorted(records.items()):
        path = os.path.join(out_dir, rec["file"])
        if os.path.isfile(path) and sha256_file(path) == rec["sha256"]:
            good[i] = rec
    return good


def resumable_map(fn: Callable, jobs: list, workers: int, records: dict) -> tuple[Iterator, int]:
    """(results in job order with :class:`Reuse` markers in place of reused shards, number reused).

    Only jobs outside the reused shards' ranges go to ``ordered_map``."""
    from mlip_ds.data.shard_writer import ordered_map

    plan, pos = [], 0
    for _, rec in sorted(records.items()):
        s, e = rec["jobs"]
        if s < pos:
            continue
        if s > pos:
            plan.append((pos, s))
        plan.append(rec)
        pos = e
    if pos < len(jobs):
        plan.append((pos, len(jobs)))
    todo = [jobs[i] for step in plan if isinstance(step, tuple) for i in range(*step)]
    mapped = ordered_map(fn, todo, workers, total=len(todo))

    def run():
        try:
            for step in plan:
                if isinstance(step, dict):
                    yield Reuse(step)
                else:
                    for _ in range(step[1] - step[0]):
                        yield next(mapped)
        finally:
            close = getattr(mapped, "close", None)
            if close is not None:
                close()

    return run(), sum(isinstance(step, dict) for step in plan)


def finish(out_dir: str, prefix: str, num_shards: int) -> None:
    """After the manifest is written: drop the journal, leftover temp files and shards of this
    prefix numbered beyond the new last one."""
    from mlip_ds.data.shard_writer import SHARD_DIGITS

    shutil.rmtree(journal_dir(out_dir, prefix), ignore_errors=True)
    pat = re.compile(rf"{re.escape(prefix)}-(\d{{{SHARD_DIGITS}}})\.tar")
    for name in os.listdir(out_dir):
        m = pat.fullmatch(name)
        stale_tmp = name.startswith(f".{prefix}-") and ".tar.tmp" in name
        if stale_tmp or (m and int(m.group(1)) >= num_shards):
            try:
                os.remove(os.path.join(out_dir, name))
            except FileNotFoundError:
                pass


def remove_journal(out_dir: str, prefix: str) -> None:
    shutil.rmtree(journal_dir(out_dir, prefix), ignore_errors=True)

