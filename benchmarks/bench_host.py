"""What a GPU step will cost outside the GPU's arithmetic, measured on a CPU (issue 8).

    python benchmarks/bench_host.py                              # ViT-B/16 + BERT-base, batch 64 and 256
    python benchmarks/bench_host.py --model tiny --batch-sizes 8 --repeats 3

Per objective and batch, for one training step (forward, every loss term, backward, EMA update):
- ops/step: ATen ops dispatched (each a kernel launch or a view on a GPU); it does not grow with
  the batch when no loss loops over samples;
- host ms/step: the same step on one CPU core with "skinny" towers (the model's layer counts,
  width 32, a few tokens), where the arithmetic is negligible: the Python and dispatch time the
  host spends per step whatever the batch. When the GPU's time for a step is below this, the GPU
  waits for the host (unless ``--compile`` removes the overhead);
- TFLOP/step analytic (``benchmarks/gpu_check.py``'s MFU numerator) and counted by torch's
  FlopCounterMode on the meta device, and their ratio;
- saved activations: bytes autograd keeps for the backward in bf16, on the meta device (an upper
  bound: views of one tensor count separately), the memory that sets the batch a GPU can hold.
Not a test: the host times depend on the CPU; the table says which.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench_common import machine, table
from mlip_ds.bench.meta_step import count_flops, model_and_inputs, to_dtype, training_step


def skinny_config(model_cfg: dict, folder: Path) -> dict:
    """The model's structure (layers, heads' kinds, pooling) at width 32 and a few tokens."""
    cfg = copy.deepcopy(model_cfg)
    vision = cfg["vision_cfg"]
    if "patch_size" not in vision:
        raise SystemExit("bench_host: needs a ViT image tower (the skinny copy keeps the layers, shrinks the width)")
    vision.update(width=32, head_width=32, image_size=64, patch_size=32)
    cfg["preprocess"]["image_size"] = 64
    cfg["embed_dim"] = 32
    text = json.loads((Path(cfg["text_cfg"]["hf_model_name"]) / "config.json").read_text())
    text.update(hidden_size=32, num_attention_heads=1, intermediate_size=64)
    (folder / "config.json").write_text(json.dumps(text))
    cfg["text_cfg"].update(hf_model_name=str(folder), context_length=16)
    return cfg


def count_ops(model, objective, inputs) -> int:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        training_step(model, objective, inputs)
    model.zero_grad(set_to_none=True)
    return Count.n


def saved_bytes(model, objective, inputs) -> int:
    """Bytes autograd saves for the backward during the step's forward and losses."""
    import torch
    seen = {}

    def pack(t):
        seen[id(t)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        training_step(model, objective, inputs, ema=False)
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def host_ms(model_cfg: dict, objective, repeats: int) -> float:
    import torch
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model, inputs = model_and_inputs(skinny_config(model_cfg, Path(tmp)), objective, 4, device="cpu")
        times = []
        for i in range(repeats + 2):
            t0 = time.perf_counter()
            training_step(model, objective, inputs)
            model.zero_grad(set_to_none=True)
            if i >= 2:  # two warm-up steps
                times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit-b16")
    ap.add_argument("--objectives", default="clip,mlip")
    ap.add_argument("--batch-sizes", default="64,256")
    ap.add_argument("--repeats", type=int, default=7, help="timed skinny steps (median)")
    args = ap.parse_args(argv)
    import torch
    import gpu_check
    from mlip_ds.config import objective_preset
    from mlip_ds.model.towers import load_model_config
    model_cfg = load_model_config(args.model)
    rows = []
    for name in args.objectives.split(","):
        objective = objective_preset(name)
        ms = host_ms(model_cfg, objective, args.repeats)
        for batch in map(int, args.batch_sizes.split(",")):
            model, inputs = model_and_inputs(model_cfg, objective, batch)  # on meta
            ops = count_ops(model, objective, inputs)
            flops = count_flops(lambda: training_step(model, objective, inputs, ema=False))
            model.zero_grad(set_to_none=True)
            analytic = gpu_check.step_flops(model_cfg, batch, 1, name)
            model, inputs = to_dtype(model, inputs, torch.bfloat16)
            saved = saved_bytes(model, objective, inputs)
            rows.append([name, batch, ops, f"{ms:.1f}", f"{analytic / 1e12:.2f}", f"{flops / 1e12:.2f}",
                         f"{flops / analytic:.3f}", f"{saved / 2**30:.2f}"])
    print(f"# Host cost and memory of one step: model {args.model}, {machine()}\n")
    print(table(["objective", "batch", "ops/step", "host ms/step (1 core)", "TFLOP analytic", "TFLOP counted",
                 "counted / analytic", "saved activations bf16 (GiB)"], rows))


if __name__ == "__main__":
    main()
