"""Memory per rank under ZeRO stages 0/1/2/3 at 1 and 2 ranks, against the analytic bytes (CPU, gloo).

    python benchmarks/bench_zero_memory.py                 # width-scaled ViT + BERT (~87 M parameters), 1 and 2 ranks
    python benchmarks/bench_zero_memory.py --width 1024 --layers 8 --ranks 2 --stages 3,3p
    python benchmarks/bench_zero_memory.py --model vit-b16 --image-size 224 --context 112

For each stage and number of ranks N: ``deepspeed --num_gpus N benchmarks/bench_zero_memory.py
--worker ...``. Each rank builds the two-tower model as ``mlip_ds/train.py`` does: stages 0-2 the
whole model on every rank, stage 3 under ``deepspeed.zero.Init`` (``build_model(zero3_config=...)``:
each rank allocates only its partition); stage ``3p`` is stage 3 built the old way (whole model,
partitioned by ``deepspeed.initialize``), for comparison. Then the repository's
``ds_configs/zero2.json`` (stages 0-2) or ``zero3.json`` (stage 3) with the stage set, fp32, torch
AdamW, ``--steps`` steps of the global InfoNCE on random images and token ids.

The default model is generated in the work folder: a ViT (``--width``, ``--layers``, patch 16 at
``--image-size``) and a BERT of the same width and depth (the packaged vocabulary, ``--context``
tokens): big enough that parameters dominate the interpreter's few hundred MB, small images and
short texts so a step takes seconds on 2 cores. ``--model NAME|JSON`` takes a registry config instead.

Per rank it reports:

- **construction**: RSS before building (interpreter, libraries, process group), the RSS high-water
  mark at the end of construction minus that (``ru_maxrss``: the peak *during* construction), and the
  parameter bytes the rank holds right after it (``ds_tensor`` of partitioned parameters);
- **after the steps**, counted from the tensors: parameters held, gradient storage (read after the
  last backward, see ``grad_bytes``: it includes ZeRO's reduce buckets, which do not shrink with N),
  Adam's two moments, and the fp32 master copy ZeRO keeps of the rank's partition (stages 1-3);
- peak RSS over the whole run and RSS after the steps.

The analytic bytes for P parameters on N ranks (fp32, AdamW): parameters 4P (stage 3: 4P/N),
gradients 4P (stages 2-3: 4P/N), Adam moments 8P (stages 1-3: 8P/N), fp32 master 0 (stages 1-3:
4P/N). RSS is what the OS sees: memory freed by torch may stay with the C allocator, so RSS is an
upper bound of the live tensors. Runs go one at a time (the RAM is shared). Not a test: numbers
depend on the machine; the table says which.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from bench_common import (ROOT, add_common_args, begin, bench_env, load_avg,
                          machine_line, run_logged, show, table, work_dir)

from mlip_ds.launch import deepspeed_cmd

GIB = 2 ** 30
MIB = 2 ** 20


def rss_bytes() -> int:
    import psutil
    return psutil.Process().memory_info().rss


def tensor_bytes(tensors) -> int:
    import torch
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def optimizer_bytes(engine, stage: int) -> dict:
    """Adam moments, fp32 master partition and parameters held by this rank, in bytes."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    adam = tensor_bytes(t for st in inner.state.values() for k, t in st.items() if k != "step")
    if stage == 3:
        master = tensor_bytes(getattr(opt, "fp32_partitioned_groups_flat", []))
    else:
        master = tensor_bytes(getattr(opt, "single_partition_of_fp32_groups", [])) if stage > 0 else 0
    return {"adam": adam, "master": master, "params": held_bytes(engine.module)}


def held_bytes(module) -> int:
    """Parameter bytes this rank holds: the tensor, plus the partition (``ds_tensor``) of a ZeRO-3 parameter
    (whose tensor is empty unless gathered: the small ones ZeRO-3 keeps whole, ``param_persistence``)."""
    return sum(tensor_bytes([p.data]) + (tensor_bytes([p.ds_tensor]) if hasattr(p, "ds_tensor") else 0)
               for p in module.parameters())


def grad_bytes(engine) -> int:
    """Gradient storage this rank holds after a backward, each storage counted once: ``p.grad`` (which
    ZeRO-2 points into its bucket), ZeRO-1/2's ``averaged_gradients``, ``grads_in_partition`` and
    ``ipg_buffer`` (the reduce bucket), ZeRO-3's ``grad_partitions_flat_buffer``."""
    import torch
    opt = engine.optimizer
    found = [p.grad for p in engine.module.parameters() if p.grad is not None]

    def collect(x):
        if torch.is_tensor(x):
            found.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                collect(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                collect(v)
    for name in ("averaged_gradients", "grads_in_partition", "ipg_buffer", "grad_partitions_flat_buffer"):
        collect(getattr(opt, name, None))
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in found if t.numel()}
    return sum(storages.values())


def scaled_model(work: Path, width: int, layers: int, image_size: int, context: int) -> Path:
    """A model config (JSON + its text-model folder) in ``work``: ViT and BERT of ``width`` x ``layers``."""
    from mlip_ds.model.towers import TEXT_MODEL_DIR
    text = work / f"bert_w{width}_l{layers}"
    text.mkdir(parents=True, exist_ok=True)
    bert = json.loads((TEXT_MODEL_DIR / "bert_base" / "config.json").read_text())
    bert.update(hidden_size=width, num_hidden_layers=layers, num_attention_heads=max(1, width // 64),
                intermediate_size=4 * width)
    (text / "config.json").write_text(json.dumps(bert, indent=2))
    cfg = {"embed_dim": 128,
           "vision_cfg": {"image_size": image_size, "patch_size": 16, "width": width, "layers": layers,
                          "head_width": 64, "mlp_ratio": 4.0},
           "text_cfg": {"hf_model_name": str(text), "hf_tokenizer_name": "builtin:tiny_bert", "hf_proj_type": "mlp",
                        "hf_pooler_type": "cls_pooler", "context_length": context},
           "preprocess": {"image_size": image_size}}
    path = work / f"vit_bert_w{width}_l{layers}.json"
    path.write_text(json.dumps(cfg, indent=1))
    return path


def worker(args) -> None:
    """One rank: build, initialize under the stage, train a few steps, write its numbers."""
    import deepspeed
    import torch
    import torch.distributed as dist
    from mlip_ds.config import TrainConfig
    from mlip_ds.distributed import init_distributed
    from mlip_ds.ds_config import load_ds_config, resolve_ds_config
    from mlip_ds.losses.global_contrast import global_contrastive_loss
    from mlip_ds.model.towers import build_model, load_model_config

    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    stage, plain = int(args.stage[0]), args.stage.endswith("p")
    torch.manual_seed(0)
    model_cfg = load_model_config(args.model)
    if args.image_size:
        model_cfg["vision_cfg"]["image_size"] = model_cfg["preprocess"]["image_size"] = args.image_size
    if args.context:
        model_cfg["text_cfg"]["context_length"] = args.context
    cfg = TrainConfig()
    cfg.data.batch_size = args.batch_size
    ds = resolve_ds_config(load_ds_config(str(ROOT / "ds_configs" / ("zero3.json" if stage == 3 else "zero2.json"))),
                           cfg, world, args.steps, False)
    ds["zero_optimization"]["stage"] = stage
    ds["optimizer"].setdefault("params", {})["torch_adam"] = True
    dist.barrier()
    rss0 = rss_bytes()
    t0 = time.time()
    # As mlip_ds/train.py: stage 3 under deepspeed.zero.Init (3p: the whole model first, the old way).
    model = build_model(model_cfg, zero3_config=ds if stage == 3 and not plain else None)
    construction = {"rss_before_build": rss0,
                    "peak_after_build": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                    "rss_after_build": rss_bytes(), "held_after_build": held_bytes(model), "build_s": time.time() - t0}
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds, model_parameters=[p for p in model.parameters()])
    rss_init = rss_bytes()
    size = model_cfg["preprocess"]["image_size"]
    ctx = model_cfg["text_cfg"].get("context_length", 77)
    vocab = json.loads((Path(model_cfg["text_cfg"]["hf_model_name"]) / "config.json").read_text())["vocab_size"]
    g = torch.Generator().manual_seed(rank)
    step_times, grads = [], 0
    for _ in range(args.steps):
        images = torch.randn(args.batch_size, 3, size, size, generator=g)
        text = torch.randint(5, vocab, (args.batch_size, ctx), generator=g)
        ts = time.time()
        out = engine(images, text)
        img, txt, scale = (out["image_features"], out["text_features"], out["logit_scale"]) if isinstance(out, dict) \
            else out[:3]
        loss = global_contrastive_loss(img, txt, scale)
        engine.backward(loss)
        grads = grad_bytes(engine)
        engine.step()
        step_times.append(time.time() - ts)
    rec = {"rank": rank, "world": world, "stage": args.stage, "params_total": n_params, **construction,
           "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "rss_init": rss_init, "rss_end": rss_bytes(), "step_s": step_times, "grads": grads,
           "loss": float(loss.detach()), **optimizer_bytes(engine, stage)}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"rank{rank}.json").write_text(json.dumps(rec))
    dist.barrier()
    dist.destroy_process_group()


def analytic(stage: int, ranks: int, n: int) -> dict:
    """Bytes per rank for n fp32 parameters under AdamW: what ZeRO's stage divides by the number of ranks."""
    return {"params": 4 * n / (ranks if stage == 3 else 1), "grads": 4 * n / (ranks if stage >= 2 else 1),
            "adam": 8 * n / (ranks if stage >= 1 else 1), "master": 4 * n / ranks if stage >= 1 else 0}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="", help="model config (mlip_ds/model/configs) or JSON path; default: the "
                                                 "width-scaled ViT + BERT of --width/--layers")
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--image-size", type=int, default=64, help="0: the config's")
    ap.add_argument("--context", type=int, default=32, help="text tokens; 0: the config's")
    ap.add_argument("--stages", default="0,1,2,3", help="comma list of 0-3; 3p: stage 3 built without zero.Init")
    ap.add_argument("--ranks", default="1,2", help="comma list of rank counts")
    ap.add_argument("--batch-size", type=int, default=2, help="per rank")
    ap.add_argument("--steps", type=int, default=2)
    add_common_args(ap)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--stage", default="0", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)

    work, tmp = work_dir(args.work, "bench_zero_memory_")
    model = args.model or str(scaled_model(work, args.width, args.layers, args.image_size, args.context))
    stages = [s for s in args.stages.split(",") if s]
    begun = begin(args)
    rows, cmds, total = [], {}, None
    for ranks in (int(r) for r in args.ranks.split(",") if r):
        for stage in stages:
            label = f"stage{stage}-ranks{ranks}"
            out = work / label
            cmd = deepspeed_cmd(["--worker", "--stage", stage, "--model", model, "--batch-size", args.batch_size,
                                 "--steps", args.steps, "--image-size", args.image_size, "--context", args.context,
                                 "--out", out], ranks=ranks, ds_config=None, script=Path(__file__).resolve())
            cmds[label] = cmd
            wall = run_logged(cmd, work / f"{label}.log", args.timeout, bench_env())
            recs = sorted((json.loads(p.read_text()) for p in out.glob("rank*.json")), key=lambda r: r["rank"])
            if len(recs) != ranks:
                raise RuntimeError(f"{label}: {len(recs)} of {ranks} ranks reported (log: {work / f'{label}.log'})")
            print(f"  {label}: wall {wall:.0f} s, load {load_avg()}", file=sys.stderr, flush=True)
            total = recs[0]["params_total"]
            a = analytic(int(stage[0]), ranks, total)
            for r in recs:
                steps = r["step_s"]
                rows.append([stage, ranks, r["rank"], f"{r['rss_before_build'] / GIB:.2f}",
                             f"{(r['peak_after_build'] - r['rss_before_build']) / MIB:.0f}",
                             f"{r['held_after_build'] / MIB:.0f} / {a['params'] / MIB:.0f}",
                             f"{r['params'] / MIB:.0f} / {a['params'] / MIB:.0f}",
                             f"{r['grads'] / MIB:.0f} / {a['grads'] / MIB:.0f}",
                             f"{r['adam'] / MIB:.0f} / {a['adam'] / MIB:.0f}",
                             f"{r['master'] / MIB:.0f} / {a['master'] / MIB:.0f}",
                             f"{r['peak_rss'] / GIB:.2f}", f"{r['rss_end'] / GIB:.2f}",
                             f"{sorted(steps)[len(steps) // 2]:.1f}" if steps else "n/a", f"{r['loss']:.3f}"])
    load_end = load_avg()
    print(machine_line(begun, load_end))
    print(f"model {Path(model).name} ({total:,} parameters, one fp32 copy {total * 4 / MIB:.0f} MiB), batch "
          f"{args.batch_size} per rank, {args.steps} step(s), fp32, torch AdamW. Per rank; 'measured / analytic' in "
          f"MiB; construction peak = RSS high-water mark at the end of construction minus RSS before it")
    print(table(["stage", "ranks", "rank", "RSS before build GiB", "construction peak MiB",
                 "params after build MiB", "params MiB", "grads MiB", "Adam MiB", "fp32 master MiB",
                 "peak RSS GiB", "RSS after steps GiB", "step s", "last loss"], rows))
    print("commands:")
    for label, cmd in cmds.items():
        print(f"  {label}: OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu {show(cmd)}")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
