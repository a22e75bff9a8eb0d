"""Peak memory per rank under ZeRO stages 0/1/2/3 (CPU, DeepSpeed, gloo).

    python tools/bench_zero_memory.py                      # ViT-B/16 + BERT-base-sized text tower, batch 2, 2 ranks
    python tools/bench_zero_memory.py --model tiny --stages 0,2 --steps 1

For each stage: ``deepspeed --num_gpus R tools/bench_zero_memory.py --worker ...``. Each rank
builds the two-tower model as ``mlip_ds/train.py`` does (``build_model``, random init, the whole
model on every rank before ``deepspeed.initialize``; no ``zero.Init``), wraps it with the repository's
``ds_configs/zero2.json`` (stages 0-2) or ``zero3.json`` (stage 3) with the stage set, fp32,
torch AdamW, and trains ``--steps`` steps of the global InfoNCE on random images and token ids.
Per rank it reports: peak RSS (``ru_maxrss``, the whole life of the process, model building
included), RSS after ``deepspeed.initialize`` and after the steps, and the bytes held by the
optimizer: Adam's two moments (``exp_avg``, ``exp_avg_sq``), the fp32 master copy ZeRO keeps of this
rank's partition (stages 1-3; stage 0 steps the parameters themselves), and the parameters this rank
holds (partitioned under stage 3). Stages >= 1 partition the optimizer state, so its bytes per rank
shrink as 1/ranks. RSS is what the OS sees: memory freed by torch may stay with the C allocator, so
RSS is an upper bound of the live tensors; the optimizer columns count tensors exactly. Stages run one after the other (one at a time:
the RAM is shared).
Not a test: numbers depend on the machine; the table says which.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (ROOT, add_common_args, begin, bench_env, load_avg,  # noqa: E402
                          machine_line, run_logged, show, table, work_dir)

from mlip_ds.launch import deepspeed_cmd  # noqa: E402

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
        params = tensor_bytes(p.ds_tensor for p in engine.module.parameters())
    else:
        master = tensor_bytes(getattr(opt, "single_partition_of_fp32_groups", [])) if stage > 0 else 0
        params = tensor_bytes(engine.module.parameters())
    return {"adam": adam, "master": master, "params": params}


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
    torch.manual_seed(0)
    model_cfg = load_model_config(args.model)
    rss0 = rss_bytes()
    t0 = time.time()
    cfg = TrainConfig()
    cfg.data.batch_size = args.batch_size
    ds = resolve_ds_config(load_ds_config(str(ROOT / "ds_configs" / ("zero3.json" if args.stage == 3 else "zero2.json"))),
                           cfg, world, args.steps, False)
    ds["zero_optimization"]["stage"] = args.stage
    ds["optimizer"].setdefault("params", {})["torch_adam"] = True
    # The whole model on every rank, as mlip_ds/train.py builds it. (deepspeed.zero.Init would
    # allocate only each rank's partition, but with transformers 5.24 the BERT tower's weight init
    # fails under it: IndexError in _init_weights, which indexes the partitioned, empty embedding.)
    model = build_model(model_cfg)
    n_params = sum(p.numel() for p in model.parameters())
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds, model_parameters=[p for p in model.parameters()])
    build_s = time.time() - t0
    rss_init = rss_bytes()
    size = model_cfg["preprocess"]["image_size"]
    ctx = model_cfg["text_cfg"].get("context_length", 77)
    vocab = json.loads((Path(model_cfg["text_cfg"]["hf_model_name"]) / "config.json").read_text())["vocab_size"]
    g = torch.Generator().manual_seed(rank)
    step_times = []
    for _ in range(args.steps):
        images = torch.randn(args.batch_size, 3, size, size, generator=g)
        text = torch.randint(5, vocab, (args.batch_size, ctx), generator=g)
        ts = time.time()
        out = engine(images, text)
        img, txt, scale = (out["image_features"], out["text_features"], out["logit_scale"]) if isinstance(out, dict) \
            else out[:3]
        loss = global_contrastive_loss(img, txt, scale)
        engine.backward(loss)
        engine.step()
        step_times.append(time.time() - ts)
    rec = {"rank": rank, "world": world, "stage": args.stage, "params_total": n_params,
           "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rss_start": rss0,
           "rss_init": rss_init, "rss_end": rss_bytes(), "build_s": build_s, "step_s": step_times,
           "loss": float(loss.detach()), **optimizer_bytes(engine, args.stage)}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"stage{args.stage}-rank{rank}.json").write_text(json.dumps(rec))
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit-b16", help="model config (mlip_ds/model/configs) or JSON path")
    ap.add_argument("--stages", default="0,1,2,3")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=2, help="per rank")
    ap.add_argument("--steps", type=int, default=2)
    add_common_args(ap)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per stage")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--stage", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)

    work, tmp = work_dir(args.work, "bench_zero_memory_")
    stages = [int(s) for s in args.stages.split(",") if s]
    begun = begin(args)
    rows, cmds, total = [], {}, None
    for stage in stages:
        name = label = f"stage{stage}"
        out = work / name
        cmd = deepspeed_cmd(["--worker", "--stage", stage, "--model", args.model, "--batch-size", args.batch_size,
                             "--steps", args.steps, "--out", out],
                            ranks=args.ranks, ds_config=None, script=Path(__file__).resolve())
        cmds[stage] = cmd
        wall = run_logged(cmd, work / f"{name}.log", args.timeout, bench_env())
        recs = sorted((json.loads(p.read_text()) for p in out.glob("*.json")), key=lambda r: r["rank"])
        if len(recs) != args.ranks:
            raise RuntimeError(f"{label}: {len(recs)} of {args.ranks} ranks reported (log: {work / f'{name}.log'})")
        print(f"  {label}: wall {wall:.0f} s, load {load_avg()}", file=sys.stderr, flush=True)
        total = recs[0]["params_total"]
        for r in recs:
            steps = r["step_s"]
            rows.append([stage, r["rank"], f"{r['peak_rss'] / GIB:.2f}", f"{r['rss_init'] / GIB:.2f}",
                         f"{r['rss_end'] / GIB:.2f}", f"{r['adam'] / MIB:.1f}", f"{r['master'] / MIB:.1f}",
                         f"{r['params'] / MIB:.1f}",
                         f"{sorted(steps)[len(steps) // 2]:.1f}" if steps else "n/a", f"{r['loss']:.3f}"])
    load_end = load_avg()
    print(machine_line(begun, load_end))
    print(f"model {args.model} ({total:,} parameters, fp32: {total * 4 / GIB:.2f} GiB; Adam moments "
          f"{total * 8 / GIB:.2f} GiB unpartitioned), {args.ranks} ranks x batch {args.batch_size}, {args.steps} "
          f"step(s), fp32, torch AdamW; per rank: RSS in GiB, optimizer and parameter bytes in MiB")
    print(table(["ZeRO stage", "rank", "peak RSS GiB", "RSS after init", "RSS after steps", "Adam moments MiB",
                 "fp32 master MiB", "params held MiB", "step s (median)", "last loss"], rows))
    print("commands:")
    for stage, cmd in cmds.items():
        print(f"  stage {stage}: OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu {show(cmd)}")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
