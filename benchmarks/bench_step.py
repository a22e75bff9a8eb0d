"""Step time of the MLIP objective against the CLIP baseline, per component, side by side (CPU).

    python benchmarks/bench_step.py                      # tiny towers, batch 32, 1 thread
    python benchmarks/bench_step.py --model vit-b16 --batch-size 4 --steps 4

One process, no DeepSpeed: the same towers (same initial weights) under each objective, one
training step each in turn (round robin, so a change in machine load hits every configuration
alike), timing per configuration: the training process's step (forward, backward, the optimizer
step with what follows it: EMA update, prototype renormalisation) and, separately, the batch
preparation that the trainer runs in the data-loader workers (``BatchPreparer``: knowledge
linking, categories, text swapping and its tokenisation; the second view's augmentation is timed
per sample at the end). Configurations: the CLIP baseline, the baseline plus each term alone, and
full MLIP. Prints a table of median milliseconds and ratios to the CLIP step: "x CLIP" compares the
training-process steps, "x CLIP inline" adds the loader-side preparation (what ``--workers 0``
pays). ``--set name=value`` changes an objective field in every configuration (e.g. head sizes).
Not a test: the numbers depend on the machine; the table says which.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import random
import statistics
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch
from PIL import Image

from bench_common import machine
from mlip_ds.config import objective_preset
from mlip_ds.data.text_augment import augment_report
from mlip_ds.data.transforms import train_transform
from mlip_ds.losses.objective import TERMS, ObjectiveConfig, total_loss
from mlip_ds.model.concepts import load_concepts
from mlip_ds.model.mlip import MLIPModel
from mlip_ds.objective.batch import BatchPreparer
from mlip_ds.objective.terms import compute_terms
from mlip_ds.model.towers import build_model, build_tokenizer, load_model_config
from mlip_ds.sources.synthetic import generate_sample


def configs(**overrides) -> dict[str, object]:
    """name -> ObjectiveConfig: the baseline, + each term alone, full MLIP."""
    out = {"clip (global)": objective_preset("clip", **overrides),
           "+ false negatives": objective_preset("clip", **{**overrides, "false_negatives": "drop"})}
    for term in TERMS[1:]:
        out[f"+ {term}"] = objective_preset("clip", **{**overrides, f"use_{term}": True})
    out["MLIP (all six)"] = objective_preset("mlip", **overrides)
    return out


def parse_set(items: list[str]) -> dict:
    fields = {f.name: f.type for f in dataclasses.fields(ObjectiveConfig)}
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in fields:
            raise SystemExit(f"--set {item}: unknown objective field (one of {sorted(fields)})")
        as_bool = lambda v: v.lower() in ("1", "true", "yes")  # noqa: E731
        typ = {"int": int, "float": float, "str": str, "bool": as_bool}[fields[name]]
        out[name] = typ(value)
    return out


def make_batch(model_cfg: dict, tokenizer, n: int, seed: int = 0) -> tuple[dict, float]:
    """A batch as the loader gives it (both views, raw report and entities) from synthetic samples;
    also the seconds per sample the second view costs in a loader worker."""
    size = model_cfg["preprocess"]["image_size"]
    transform = train_transform(size, (0.5,) * 3, (0.25,) * 3)
    samples = [generate_sample(i, seed=seed, size=max(size, 64)) for i in range(n)]
    for s in samples:
        s.image = Image.fromarray(s.image) if not isinstance(s.image, Image.Image) else s.image
    images, texts, images2, texts2 = [], [], [], []
    for i, s in enumerate(samples):
        torch.manual_seed(i)
        images.append(transform(s.image))
        texts.append(tokenizer(s.report)[0])
    t0 = time.perf_counter()
    for i, s in enumerate(samples):
        torch.manual_seed(10_000 + i)
        images2.append(transform(s.image))
        texts2.append(tokenizer(augment_report(s.report, random.Random(i)))[0])
    view_cost = (time.perf_counter() - t0) / n
    batch = {"image": torch.stack(images), "text": torch.stack(texts), "image2": torch.stack(images2),
             "text2": torch.stack(texts2), "report": [s.report for s in samples],
             "entities": [s.entities for s in samples], "labels": [s.labels for s in samples]}
    return batch, view_cost


class Runner:
    """One objective: model, optimizer, and a timed training step.

    Every configuration wraps the same two towers (``clip``) and steps them with the same optimizer
    (``tower_opt``): one copy of the towers and of their Adam state in memory whatever the number of
    configurations (ViT-B/16 + BERT-base would not fit eight times). Timings do not depend on the
    weights' values. The MLIP parts and their optimizer are the configuration's own.
    """

    def __init__(self, objective, clip, tower_opt, tokenizer, vocab, lr=1e-4):
        torch.manual_seed(1)
        self.objective = objective
        self.model = MLIPModel(clip, objective, num_concepts=len(vocab), num_categories=len(vocab.categories),
                               special_ids=tuple(tokenizer.tokenizer.all_special_ids)).train()
        self.prep = BatchPreparer(objective, tokenizer, vocab)
        towers = {id(p) for p in clip.parameters()}
        own = [p for p in self.model.parameters() if p.requires_grad and id(p) not in towers]
        self.opts = [tower_opt] + ([torch.optim.AdamW(own, lr=lr, weight_decay=0.05)] if own else [])
        self.n_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.times: dict[str, list[float]] = {k: [] for k in ("loader", "forward", "backward", "optimizer", "step")}
        self.step_no = 0
        if hasattr(self.model, "prototypes"):
            self.model.prototypes.freeze(False)

    def step(self, batch: dict, record: bool) -> None:
        t0 = time.perf_counter()
        prepared = self.prep(dict(batch), seed=self.step_no)  # in the trainer: a data-loader worker
        t = [time.perf_counter()]
        inputs = self.prep.to_device(prepared, "cpu")
        out = self.model(**inputs)
        loss, _ = total_loss(compute_terms(out, inputs, self.objective, getattr(self.model, "prior", None)),
                             self.objective)
        t.append(time.perf_counter())
        self.model.zero_grad(set_to_none=True)
        loss.backward()
        t.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        for opt in self.opts:
            opt.step()
        self.step_no += 1
        self.model.ema_step(self.step_no, 1000)
        if hasattr(self.model, "prototypes"):
            self.model.prototypes.normalize_()
        t.append(time.perf_counter())
        if record:
            self.times["loader"].append(t[0] - t0)
            for name, a, b in zip(("forward", "backward", "optimizer"), t, t[1:]):
                self.times[name].append(b - a)
            self.times["step"].append(t[-1] - t[0])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="model config (mlip_ds/model/configs) or JSON path")
    ap.add_argument("--batch-size", type=int, default=32, help="samples per step (one rank's micro-batch)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration first")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the trainer uses cores / ranks)")
    ap.add_argument("--only", default="", help="comma-separated configuration names to run (default: all)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="objective field for every configuration, e.g. --set local_dim=64 (repeatable)")
    args = ap.parse_args(argv)
    overrides = parse_set(args.set)
    torch.set_num_threads(args.threads)
    model_cfg = load_model_config(args.model)
    tokenizer = build_tokenizer(model_cfg)
    vocab = load_concepts("", [])
    batch, view_cost = make_batch(model_cfg, tokenizer, args.batch_size)
    chosen = configs(**overrides)
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}
    torch.manual_seed(0)
    clip = build_model(model_cfg)
    tower_opt = torch.optim.AdamW(clip.parameters(), lr=1e-4, weight_decay=0.05)
    runners = {name: Runner(obj, clip, tower_opt, tokenizer, vocab) for name, obj in chosen.items()}
    for i in range(args.warmup + args.steps):
        for runner in runners.values():
            runner.step(batch, record=i >= args.warmup)
    med = {name: {k: statistics.median(v) * 1000 for k, v in r.times.items()} for name, r in runners.items()}
    for m in med.values():
        m["inline"] = m["step"] + m["loader"]
    base = med.get("clip (global)", next(iter(med.values())))
    print(f"machine: {machine()}; torch threads {torch.get_num_threads()}")
    print(f"model {args.model}, batch {args.batch_size}, median of {args.steps} steps after {args.warmup} "
          f"warm-up, configurations interleaved; concept vocabulary {len(vocab)} ({vocab.source})"
          + (f"; objective overrides {overrides}" if overrides else ""))
    header = (f"| {'objective':<18} | {'trainable params':>16} | {'fwd ms':>8} | {'bwd ms':>8} | {'opt ms':>8} "
              f"| {'step ms':>8} | {'x CLIP':>6} | {'loader ms':>9} | {'x CLIP inline':>13} |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for name, m in med.items():
        print(f"| {name:<18} | {runners[name].n_params:>16,} | {m['forward']:>8.1f} | {m['backward']:>8.1f} "
              f"| {m['optimizer']:>8.1f} | {m['step']:>8.1f} | {m['step'] / base['step']:>6.2f} "
              f"| {m['loader']:>9.1f} | {m['inline'] / base['inline']:>13.2f} |")
    print(f"second view in the loader workers (divergence only): {view_cost * 1000:.2f} ms per sample "
          f"({view_cost * 1000 * args.batch_size:.0f} ms per batch, off the training process)")


if __name__ == "__main__":
    main()
