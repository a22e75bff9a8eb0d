"""What the objective needs before anything is built: its switches checked against the model, the
batch and the ZeRO stage, and the concept vocabulary loaded when a term uses it. Run by the trainer
before DeepSpeed starts, so a bad combination ends with one message instead of a traceback per rank."""
from __future__ import annotations

from mlip_ds.config import TrainConfig
from mlip_ds.losses.objective import TERMS
from mlip_ds.model.concepts import ConceptVocab, load_concepts
from mlip_ds.model.mlip import needs


class ObjectiveSetupError(ValueError):
    """A setting of the objective that cannot run; the message says what to change."""


def check_objective(cfg: TrainConfig, model_cfg: dict, urls: list[str], zero_stage: int = 0) -> ConceptVocab | None:
    """The objective's switches and choices against the model, batch and ZeRO stage, and the concept
    vocabulary when a term needs it; raises ``ObjectiveSetupError`` with what to change."""
    o = cfg.objective
    if zero_stage >= 3:
        # ZeRO-3 runs the global term (with or without the false-negative fix) and the category term.
        why = {"divergence": "the EMA encoders are full copies of the towers, updated in place from the online "
                             "weights, which ZeRO-3 partitions",
               "local": "the TKP attention and the knowledge encoder return dataclasses, whose tensors "
                        "ZeRO-3's parameter hooks cannot follow into the backward pass",
               "itm": "it needs the knowledge encoder (see local)",
               "swap": "it needs the knowledge encoder (see local)"}
        off = [t for t in why if o.enabled(t)]
        if off:
            raise ObjectiveSetupError(f"ZeRO stage 3 cannot run the {', '.join(off)} term(s): "
                             + "; ".join(f"{t}: {why[t]}" for t in off)
                             + ". Use ds_configs/zero2.json or zero2_offload.json, or switch them off ("
                             + " ".join(f"--no-use-{t}" for t in off) + ")")
    if not any(o.enabled(t) for t in TERMS):
        raise ObjectiveSetupError("every loss term is switched off: keep at least one --use-<term> (e.g. --use-global)")
    for name, value, allowed in (("--false-negatives", o.false_negatives, ("off", "drop", "soft")),
                                 ("--false-negative-match", o.false_negative_match, ("exact", "overlap")),
                                 ("--swap-mode", o.swap_mode, ("auto", "mentions", "sentence"))):
        if value not in allowed:
            raise ObjectiveSetupError(f"{name} {value!r}: choose one of {list(allowed)}")
    if o.false_negative_weight > 0 and o.false_negatives != "drop":
        raise ObjectiveSetupError(f"--false-negative-weight {o.false_negative_weight:g} weighs the pairs that "
                                  f"'drop' leaves out; with --false-negatives {o.false_negatives} it would be "
                                  "ignored: use --false-negatives drop, or leave the weight at 0")
    resnet = isinstance(model_cfg["vision_cfg"].get("layers"), (list, tuple))
    if o.use_divergence and o.divergence_image and o.image_head > 0 and resnet:
        raise ObjectiveSetupError("--image-head takes the pooled features before the projection of a ViT image "
                                  "tower; this model's image tower is a ResNet: use a ViT model or --image-head 0")
    if o.use_local and resnet:
        raise ObjectiveSetupError("the local term needs patch tokens from a ViT image tower; this model's image tower is a "
                         "ResNet: use a ViT model (tiny, vit-b16) or --no-use-local")
    if o.use_itm and cfg.data.batch_size < 2:
        raise ObjectiveSetupError("the ITM term draws hard negatives from the batch: --batch-size must be at least 2")
    n = needs(o)
    if not (n["knowledge"] or n["categories"]):
        return None
    try:
        return load_concepts(cfg.knowledge.kb, urls)
    except (OSError, ValueError) as e:
        raise ObjectiveSetupError(f"concept vocabulary (--kb {cfg.knowledge.kb!r}): {e}") from e
