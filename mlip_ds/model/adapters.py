"""Choose what trains: freeze a tower, freeze both towers but their projections, LoRA adapters.

Applied to the two-tower model after it is built (and warm-started) and before ``MLIPModel`` and
``deepspeed.initialize``: a frozen parameter has ``requires_grad`` False, so ``param_groups`` leaves
it out of the optimizer (and ZeRO never partitions optimizer state for it).

LoRA comes from ``peft`` (``inject_adapter_in_model``: the towers keep their structure; a targeted
``nn.Linear`` becomes ``peft``'s ``lora.Linear`` around it). open_clip's ViT uses
``nn.MultiheadAttention``, which reads its weights directly instead of calling sub-modules, so:
  * ``in_proj_weight`` (query/key/value) is targeted as a parameter (peft's ``target_parameters``,
    a parametrization W + BA computed in the forward; the base weight is never written);
  * ``out_proj`` is not targeted: MHA never calls its forward (a LoRA there would be ignored), and
    peft's MHA wrapper (targeting ``attn``) merges and unmerges the base weights in place at every
    forward, which drifts frozen weights in floating point (visibly in bf16).
Default targets: ViT ``in_proj_weight``, ``c_fc``, ``c_proj`` (MLP); BERT ``query``, ``value``.
With LoRA on a tower its base weights are frozen; its output projection trains (it is small and
maps into the joint space). ``merge_adapters_`` folds the adapters into the base weights (peft's
``merge`` per layer, then the layer is replaced by its base layer): a plain open_clip model again.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

DEFAULT_TARGETS = {"visual": ("in_proj_weight", "c_fc", "c_proj"), "text": ("query", "value")}
# Parameter names (relative to a tower) of its output projection into the joint embedding space:
# ViT ``proj``; ResNet attention pool's ``c_proj``; timm ``head``; HF ``proj`` (Linear or MLP).
PROJECTIONS = {"visual": ("proj", "attnpool.c_proj.", "head."), "text": ("proj", "proj.", "text_projection")}
TOWERS = ("visual", "text")


class TrainChoiceError(ValueError):
    pass


@dataclass
class TrainChoice:
    freeze_image: bool = False
    freeze_text: bool = False
    freeze_towers_except_proj: bool = False
    lora_rank: int = 0
    lora_alpha: float = 0.0  # 0: = rank (scale 1)
    lora_dropout: float = 0.0
    lora_targets: str = "auto"

    @classmethod
    def from_model_config(cls, mc) -> "TrainChoice":
        return cls(**{k: getattr(mc, k) for k in cls.__dataclass_fields__})

    def active(self) -> bool:
        return self != TrainChoice()

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def is_projection(tower: str, name: str) -> bool:
    """``name`` relative to the tower."""
    return any(name == p or (p.endswith(".") and name.startswith(p)) or name.startswith(p + ".")
               for p in PROJECTIONS[tower])


def is_adapter(name: str) -> bool:
    return "lora_" in name


def _targets(choice: TrainChoice, tower_name: str, tower: nn.Module) -> tuple[list[str], list[str]]:
    """(module targets, parameter targets) of ``tower``: the requested names present in it."""
    wanted = (DEFAULT_TARGETS[tower_name] if choice.lora_targets == "auto"
              else tuple(t.strip() for t in choice.lora_targets.split(",") if t.strip()))
    modules = dict(tower.named_modules())
    params = [n for n, _ in tower.named_parameters()]
    mod_t, par_t = [], []
    for t in wanted:
        hit_mod = [n for n in modules if n == t or n.endswith("." + t)]
        hit_par = [n for n in params if n == t or n.endswith("." + t)]
        for n in hit_mod:
            parent = modules.get(n.rsplit(".", 1)[0] if "." in n else "")
            if isinstance(modules[n], nn.MultiheadAttention) or isinstance(parent, nn.MultiheadAttention):
                raise TrainChoiceError(
                    f"--lora-targets {t}: '{n}' is (part of) an nn.MultiheadAttention, which reads its weights "
                    "directly (a LoRA on out_proj would be ignored; peft's MHA wrapper rewrites the frozen weights "
                    "at every forward); target its parameter in_proj_weight instead")
        if hit_mod:
            mod_t.append(t)
        elif hit_par:
            par_t.append(t)
    return mod_t, par_t


def apply(model: nn.Module, choice: TrainChoice) -> dict:
    """Freeze and/or add LoRA adapters to ``model.visual`` / ``model.text`` in place. Returns
    ``trainable_counts``. A tower frozen whole gets no adapters."""
    if choice.lora_rank < 0:
        raise TrainChoiceError("--lora-rank must be >= 0")
    whole = {"visual": choice.freeze_image, "text": choice.freeze_text}
    lora = choice.lora_rank > 0
    if lora:
        from peft import LoraConfig, inject_adapter_in_model
        found_any = False
        for name in TOWERS:
            if whole[name]:
                continue
            tower = getattr(model, name)
            mod_t, par_t = _targets(choice, name, tower)
            if not (mod_t or par_t):
                continue
            found_any = True
            config = LoraConfig(r=choice.lora_rank, lora_alpha=choice.lora_alpha or choice.lora_rank,
                                lora_dropout=choice.lora_dropout, bias="none", target_modules=mod_t or None,
                                target_parameters=par_t or None)
            inject_adapter_in_model(config, tower)
        if not found_any:
            raise TrainChoiceError(f"--lora-targets {choice.lora_targets}: no module or parameter of the trained "
                                   "towers has such a name (ViT: in_proj_weight, c_fc, c_proj; BERT: query, key, "
                                   "value, dense)")
    for name in TOWERS:
        tower = getattr(model, name)
        for pname, p in tower.named_parameters():
            if whole[name]:
                p.requires_grad_(False)
            elif lora or choice.freeze_towers_except_proj:
                p.requires_grad_(is_adapter(pname) or is_projection(name, pname))
    return trainable_counts(model)


def trainable_counts(model: nn.Module) -> dict[str, dict[str, int]]:
    """{"visual"|"text"|"other": {"trainable": n, "total": n, "adapter": n}} (element counts)."""
    out = {k: {"trainable": 0, "total": 0, "adapter": 0} for k in (*TOWERS, "other")}
    for name, p in model.named_parameters():
        key = name.split(".", 1)[0]
        key = key if key in TOWERS else "other"
        n = getattr(p, "ds_numel", None) or p.numel()  # ZeRO-3 (built under zero.Init): the full size
        out[key]["total"] += n
        out[key]["trainable"] += n if p.requires_grad else 0
        out[key]["adapter"] += n if is_adapter(name) else 0
    return out


def has_adapters(module: nn.Module) -> bool:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # no peft, no adapters
        return False
    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


def merge_adapters_(module: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base weights (peft's merge) and put the base layers back in
    place: afterwards the module has the parameter names of the model without adapters."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    while True:
        layer = next(((n, m) for n, m in module.named_modules() if isinstance(m, BaseTunerLayer)), None)
        if layer is None:
            return module
        name, sub = layer
        if hasattr(sub, "unload_and_optionally_merge_module"):
            base = sub.unload_and_optionally_merge_module(merge=True, safe_merge=True, adapter_names=None)
        else:
            sub.merge(safe_merge=True)
            base = sub.get_base_layer()
        parent_name, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, child, base)


def merged_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with the adapters merged (the module itself is left as it is)."""
    with torch.no_grad():
        return merge_adapters_(copy.deepcopy(module))
