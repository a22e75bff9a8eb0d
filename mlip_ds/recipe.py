"""The effective recipe of a run: the objective's relative settings turned into steps and sizes,
the learning rate of each parameter group, and warnings for settings known to hurt.

Why a module: ``--objective mlip`` alone must be the best recipe we know at any run length and batch.
So the schedule of the auxiliary terms and of the prototype freeze is given as fractions of the run,
the number of prototypes follows the global batch, and pretrained towers get their own learning rate;
this is where those turn into numbers, once, before the model is built. The trainer prints
``describe()`` at start-up. Evidence for the defaults: docs/ablation.md.
"""
from __future__ import annotations

import dataclasses

from mlip_ds.config import TrainConfig
from mlip_ds.losses.objective import TERMS, ObjectiveConfig

MAX_PROTOTYPES = 500  # MGCA's K (global batch 144)
HIGH_LR_FOR_PRETRAINED = 1e-4


def num_prototypes(global_batch: int) -> int:
    """K from the global batch: half of it, within [8, 500]. Sinkhorn spreads each batch evenly over
    the K prototypes; with K far above the batch every code is spread thin and the targets say
    little (docs/ablation.md: the loss sat at ln K with K = 128 at batch 64)."""
    return int(min(MAX_PROTOTYPES, max(8, global_batch // 2)))


def resolve_objective(o: ObjectiveConfig, total_steps: int, global_batch: int) -> ObjectiveConfig:
    """``o`` with its fractions turned into optimizer steps and K set (explicit values are kept)."""
    def steps(frac: float) -> int:
        return int(round(frac * total_steps))

    return dataclasses.replace(
        o,
        aux_start_steps=o.aux_start_steps if o.aux_start_steps >= 0 else steps(o.aux_start),
        aux_warmup_steps=o.aux_warmup_steps if o.aux_warmup_steps >= 0 else steps(o.aux_warmup),
        freeze_prototypes_steps=(o.freeze_prototypes_steps if o.freeze_prototypes_steps >= 0
                                 else steps(o.freeze_prototypes)),
        num_prototypes=o.num_prototypes if o.num_prototypes > 0 else num_prototypes(global_batch))


def resolve(cfg: TrainConfig, total_steps: int, global_batch: int) -> TrainConfig:
    """The run configuration with every relative setting made absolute (a copy)."""
    return dataclasses.replace(cfg, objective=resolve_objective(cfg.objective, total_steps, global_batch))


def pretrained_towers(cfg: TrainConfig) -> tuple[str, ...]:
    """Module-name prefixes of the towers that start from pretrained weights."""
    init = bool(getattr(cfg.model, "init_from", ""))  # --init-from loads both towers
    return tuple(name for name, on in (("visual.", bool(cfg.model.pretrained_image) or init),
                                       ("text.", cfg.model.pretrained_text or init)) if on)


def aux_terms_on(o: ObjectiveConfig) -> list[str]:
    return [t for t in TERMS if t != "global" and o.enabled(t)]


def warnings_for(cfg: TrainConfig, total_steps: int, global_batch: int) -> list[str]:
    """Settings of a resolved ``cfg`` that docs/ablation.md found to hurt, or that cannot work."""
    o, out = cfg.objective, []
    aux = aux_terms_on(o)
    if aux and o.aux_start_steps == 0 and len(pretrained_towers(cfg)) < 2:
        out.append(f"the auxiliary terms ({', '.join(aux)}) start at step 0 with a randomly initialised tower: "
                   "they can collapse the embeddings before the global term leaves chance (docs/ablation.md); "
                   "keep --aux-start (default 0.2)")
    if aux and o.aux_start_steps >= total_steps:
        out.append(f"the auxiliary terms never start: the delay ({o.aux_start_steps} steps) is the whole run "
                   f"({total_steps} steps)")
    if o.use_category:
        if o.freeze_prototypes_steps >= total_steps:
            out.append(f"the prototypes are frozen for the whole run ({o.freeze_prototypes_steps} of {total_steps} "
                       "steps): they never train")
        if o.num_prototypes > 2 * global_batch and o.proto_queue == 0:
            out.append(f"{o.num_prototypes} prototypes for a global batch of {global_batch}: each Sinkhorn code is "
                       "spread over many prototypes and the category loss stays near ln K; use --num-prototypes 0 "
                       "(auto) or --proto-queue")
    for prefix in pretrained_towers(cfg):
        if cfg.optim.lr_pretrained > HIGH_LR_FOR_PRETRAINED:
            out.append(f"pretrained {prefix[:-1]} tower at learning rate {cfg.optim.lr_pretrained:g}: above "
                       f"{HIGH_LR_FOR_PRETRAINED:g} a pretrained BERT/ViT forgets what it knew (the method: 2e-5)")
    if o.use_divergence and o.divergence_image and cfg.data.intensity_jitter > 0:
        out.append(f"--intensity-jitter {cfg.data.intensity_jitter:g}: the image-image term learns to ignore the gray "
                   "levels its two views differ in; on real X-rays that cost MLIP 0.02-0.03 AUC on what no report "
                   "names (docs/ablation.md); the default is 0")
    if o.use_divergence and o.ema_m0 >= 1.0:
        out.append("--ema-m0 1.0: the divergence encoders never follow the online towers")
    return out


def describe(cfg: TrainConfig, total_steps: int, global_batch: int) -> list[str]:
    """Human-readable lines of the effective recipe (printed by the trainer on rank 0)."""
    o = cfg.objective
    terms = []
    for t in TERMS:
        if not o.enabled(t):
            continue
        extra = ""
        if t == "global" and o.false_negatives != "off":
            weight = (f", weight {o.false_negative_weight:g}" if o.false_negatives == "drop" and o.false_negative_weight > 0
                      else "")
            extra = f" (false negatives: {o.false_negatives}{weight}, {o.false_negative_match} categories)"
        if t == "divergence":
            head = f", own head of width {o.image_head}" if o.image_head > 0 else ""
            extra = " (image-text cross terms" + (f" + image-image at T={o.image_temperature:g}{head})"
                                                   if o.divergence_image else ")")
        if t == "category":
            extra = f" (K={o.num_prototypes}, frozen for {o.freeze_prototypes_steps} steps)"
        weight = o.weight(t)
        terms.append(f"{t}" + (f" x{weight:g}" if weight != 1 else "") + extra)
    lines = [f"objective: {', '.join(terms)}"]
    aux = aux_terms_on(o)
    if aux:
        start, ramp = o.aux_start_steps, o.aux_warmup_steps
        lines.append(f"schedule: {total_steps} optimizer steps; {', '.join(aux)} off for steps 0-{start - 1}"
                     if start > 0 else f"schedule: {total_steps} optimizer steps; {', '.join(aux)} on from step 0")
        if ramp > 0:
            lines[-1] += f", ramped to their λ over steps {start}-{start + ramp - 1}"
    pre = pretrained_towers(cfg)
    lr = f"lr {cfg.optim.lr:g} (from scratch)"
    if pre:
        lr += f", {cfg.optim.lr_pretrained:g} ({' and '.join(p[:-1] for p in pre)} tower: pretrained)"
    lines.append(f"optimizer: AdamW, {lr}, weight decay {cfg.optim.weight_decay:g}, warm-up "
                 f"{cfg.optim.warmup_steps} steps then cosine; global batch {global_batch}")
    return lines
