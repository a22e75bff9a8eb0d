"""Fill a DeepSpeed JSON config's "auto" values from the run config, and refuse contradictions.

DeepSpeed itself does not understand "auto" (that is Hugging Face's convention, which our users
know); we resolve it here so one JSON serves every model size and the CLI stays the single source
of truth. A value set explicitly in the JSON that disagrees with an explicitly different CLI
value is an error, raised before DeepSpeed starts.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from mlip_ds.config import TrainConfig


class DSConfigError(ValueError):
    pass


def load_ds_config(path: str) -> dict:
    p = Path(path)
    if not p.exists():
        raise DSConfigError(f"DeepSpeed config '{path}' does not exist (try ds_configs/zero2.json)")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise DSConfigError(f"DeepSpeed config '{path}' is not valid JSON: {e}") from e


def _fill(section: dict, key: str, value, where: str, source: str) -> None:
    current = section.get(key, "auto")
    if current == "auto":
        section[key] = value
    elif current != value:
        raise DSConfigError(f"{where}.{key} = {current!r} in the DeepSpeed config contradicts {source} = {value!r}; "
                            f"set it to \"auto\" or make them agree")


def check_batch(ds: dict, cfg: TrainConfig, world_size: int) -> None:
    """A global batch set in the JSON (``train_batch_size``) must split over the ranks as
    micro-batch x accumulation per rank; say which flags make it so."""
    total = ds.get("train_batch_size", "auto")
    if total == "auto":
        return
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise DSConfigError(f"train_batch_size = {total!r} in the DeepSpeed config: give a positive integer or \"auto\"")
    if total % world_size:
        raise DSConfigError(f"train_batch_size = {total} in the DeepSpeed config does not divide over {world_size} "
                            f"ranks (world size): run on a world size that divides {total}, or set it to \"auto\" "
                            "(--batch-size x --grad-accum x world size)")
    per_rank = total // world_size
    micro, accum = ds.get("train_micro_batch_size_per_gpu", "auto"), ds.get("gradient_accumulation_steps", "auto")
    micro = cfg.data.batch_size if micro == "auto" else micro
    accum = cfg.optim.grad_accum if accum == "auto" else accum
    if isinstance(micro, int) and isinstance(accum, int) and micro * accum != per_rank:
        hint = (f"--grad-accum {per_rank // micro}" if per_rank % micro == 0 else f"--batch-size {per_rank} --grad-accum 1")
        raise DSConfigError(f"train_batch_size = {total} in the DeepSpeed config is {per_rank} samples per rank on "
                            f"{world_size} ranks, but micro-batch {micro} x accumulation {accum} = {micro * accum}: "
                            f"use {hint}, or set train_batch_size to \"auto\"")


def resolve_ds_config(ds: dict, cfg: TrainConfig, world_size: int, total_steps: int, bf16_ok: bool) -> dict:
    ds = copy.deepcopy(ds)
    o = cfg.optim
    check_batch(ds, cfg, world_size)
    _fill(ds, "train_micro_batch_size_per_gpu", cfg.data.batch_size, "", "--batch-size")
    _fill(ds, "gradient_accumulation_steps", o.grad_accum, "", "--grad-accum")
    _fill(ds, "train_batch_size", cfg.data.batch_size * o.grad_accum * world_size, "",
          "--batch-size x --grad-accum x world size")
    _fill(ds, "gradient_clipping", o.grad_clip, "", "--grad-clip")
    if "optimizer" in ds:
        params = ds["optimizer"].setdefault("params", {})
        _fill(params, "lr", o.lr, "optimizer.params", "--lr")
        _fill(params, "betas", [o.beta1, o.beta2], "optimizer.params", "--beta1/--beta2")
        _fill(params, "eps", o.eps, "optimizer.params", "--eps")
        _fill(params, "weight_decay", o.weight_decay, "optimizer.params", "--weight-decay")
    if "scheduler" in ds:
        params = ds["scheduler"].setdefault("params", {})
        if "total_num_steps" in params:
            _fill(params, "total_num_steps", total_steps, "scheduler.params", "epochs x steps per epoch")
        if "warmup_num_steps" in params:
            _fill(params, "warmup_num_steps", min(o.warmup_steps, max(1, total_steps - 1)),
                  "scheduler.params", "--warmup-steps")
        for key in ("warmup_max_lr",):
            if key in params:
                _fill(params, key, o.lr, "scheduler.params", "--lr")
    for precision in ("bf16", "fp16"):
        if precision in ds and ds[precision].get("enabled") == "auto":
            ds[precision]["enabled"] = bool(bf16_ok) if precision == "bf16" else False
    autocast = ds.get("torch_autocast", {})
    if autocast.get("enabled") == "auto":  # bf16 autocast where the GPU has bf16, fp32 elsewhere (a CPU)
        autocast["enabled"] = bool(bf16_ok)
    # bf16_ok None: a CPU, where "auto" means fp32 (faster there) but an explicit true is honoured.
    if ds.get("bf16", {}).get("enabled") is True and bf16_ok is False:
        raise DSConfigError("bf16.enabled is true but this GPU has no bf16 support; set it to \"auto\"")
    optimizer_kernel(ds, o.adam_impl, cuda=bf16_ok is not None)
    leftover = _find_auto(ds)
    if leftover:
        raise DSConfigError(f"DeepSpeed config keys still 'auto' that mlip-ds cannot fill: {leftover}")
    return ds


def optimizer_kernel(ds: dict, impl: str, cuda: bool) -> None:
    """Pick the AdamW kernel (``--adam-impl``) unless the config already chose (``torch_adam``).

    auto: torch's fused AdamW on CUDA (one kernel for all tensors, nothing to JIT-compile, unlike
    DeepSpeed's FusedAdam, which needs nvcc and ninja at start-up), torch's foreach AdamW on CPU
    (DeepSpeed's CPU kernels would be JIT-compiled, ~40 s, for no gain at our sizes)."""
    opt = ds.get("optimizer")
    if not opt or str(opt.get("type", "")).lower() not in ("adam", "adamw"):
        return
    params = opt.setdefault("params", {})
    if "torch_adam" in params:
        return
    if impl == "auto":
        impl = "torch-fused" if cuda else "torch"
    if impl == "torch-fused" and not cuda:
        raise DSConfigError("--adam-impl torch-fused needs CUDA; use torch or auto on CPU")
    if impl == "deepspeed":
        params["torch_adam"] = False
        return
    params["torch_adam"] = True
    if impl == "torch-fused":
        params["fused"] = True


def _find_auto(node, prefix="") -> list[str]:
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _find_auto(v, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if node == "auto" else []


def one_device_route(ds: dict, world_size: int) -> bool:
    """Whether a resolved ``ds`` runs on the one-device route: one rank, ZeRO stage 0, fp32 weights
    (DeepSpeed's bf16/fp16 off; ``torch_autocast`` for mixed precision, as ``ds_configs/one_gpu.json``).

    Why: on one device DeepSpeed still all-reduces the gradients and clips them tensor by tensor, and
    with its own bf16 at stage 0 it picks an optimizer that reads every parameter's overflow on the
    host. The trainer then skips the all-reduce and clips with one foreach norm, which is the same
    arithmetic (docs/benchmarks.md, "Ops per optimizer step": 1.15x the bare loop's ops against 2.2x
    for ZeRO-2). Two settings no DeepSpeed config key expresses, hence this switch.
    """
    return (world_size == 1 and ds.get("zero_optimization", {}).get("stage", 0) == 0
            and ds.get("bf16", {}).get("enabled") is not True and ds.get("fp16", {}).get("enabled") is not True)


def take_gradient_clipping(ds: dict) -> float:
    """Turn DeepSpeed's clipping off in ``ds`` (in place) and return its max norm, for the trainer to
    clip itself on the one-device route."""
    clip = float(ds.get("gradient_clipping", 0.0) or 0.0)
    ds["gradient_clipping"] = 0.0
    return clip
