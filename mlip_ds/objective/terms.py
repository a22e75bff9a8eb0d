"""Model outputs -> the unweighted loss terms of the enabled parts (``losses/*``), one call per active term.

``losses.objective.total_loss`` weighs them; ``mlip_ds.objective.Objective.loss`` does both.
"""
from __future__ import annotations

import torch

from mlip_ds.losses.category import category_loss, masked_info_nce
from mlip_ds.losses.divergence import divergence_loss
from mlip_ds.losses.global_contrast import global_contrastive_loss
from mlip_ds.losses.itm import itm_loss
from mlip_ds.losses.local_alignment import local_alignment_loss
from mlip_ds.losses.objective import TERMS, ObjectiveConfig
from mlip_ds.losses.swap import swap_loss
from mlip_ds.model.prototypes import CooccurrencePrior

MAX_LOGIT_SCALE = 100.0  # temperature floor 0.01, as in CLIP


def compute_terms(out: dict, inputs: dict, objective: ObjectiveConfig, prior: CooccurrencePrior | None = None,
                  update_prior: bool = True, active: frozenset[str] | None = None) -> dict[str, torch.Tensor]:
    """The unweighted loss terms of the enabled parts (``losses/*``), gathered across ranks where the
    term needs it; with ``active``, only those terms (the forward's ``active``). Collective: every rank
    calls it once per micro-step with the same ``active``."""
    o = objective
    on = {t: o.enabled(t) and (active is None or t in active) for t in TERMS}
    scale = out["logit_scale"].float().clamp(max=MAX_LOGIT_SCALE)
    img, txt = out["image_features"].float(), out["text_features"].float()
    cats = inputs.get("cats")
    terms = {}
    if on["global"]:
        if o.false_negatives == "off":
            terms["global"] = global_contrastive_loss(img, txt, scale)
        else:
            terms["global"] = masked_info_nce(img, txt, scale, cats, mode=o.false_negatives,
                                              soft_weight=o.soft_weight, match=o.false_negative_match,
                                              neg_weight=o.false_negative_weight)
    if on["divergence"]:
        terms["divergence"] = divergence_loss(
            img, txt, out["image_features_ema"].float(), out["text_features_ema"].float(), scale, cats=cats,
            mode=o.false_negatives if o.false_negatives_divergence else "off", soft_weight=o.soft_weight,
            match=o.false_negative_match, neg_weight=o.false_negative_weight,
            image_image_scale=1.0 / o.image_temperature if o.divergence_image else None,
            image_image_weight=o.image_weight,
            image_ssl=out["image_ssl"].float() if "image_ssl" in out else None,
            image_ssl_div=out["image_ssl_ema"].float() if "image_ssl_ema" in out else None)
    if on["local"]:
        tkp = out["tkp"]
        terms["local"] = local_alignment_loss(tkp.tokens, tkp.contexts, out["token_mask"], out["token_weights"],
                                              tkp.patches, tkp.patch_contexts, out["patch_weights"],
                                              temperature=o.local_temperature)
    if on["category"]:
        terms["category"] = category_loss(out["proto_image"].float(), out["proto_text"].float(),
                                          temperature=o.proto_temperature, eps=o.sinkhorn_eps,
                                          iters=o.sinkhorn_iters, cats=cats, prior=prior,
                                          prior_mix=o.prior_mix, update_prior=update_prior,
                                          image_queue_scores=out.get("proto_image_queue"),
                                          text_queue_scores=out.get("proto_text_queue"))
    if on["itm"]:
        terms["itm"] = itm_loss(out["itm_logits"], out["itm_labels"])
    if on["swap"]:
        terms["swap"] = swap_loss(out["swap_logits"], out["swap_labels"])
    return terms
