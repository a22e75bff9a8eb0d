"""The MLIP objective: L = λg·(L_global + L_div) + λl·L_local + λc·L_category + λm·L_itm + λs·L_swap.

Every term has an on/off switch and a weight (all 1.0 by default, MGCA's defaults); with only the
global term on it is a plain CLIP/ConVIRT baseline. The other fields hold the temperatures and
switches of the parts (docs/method.md); fields are plain bool/int/float/str so the config
module can turn them into command-line flags like the rest of the run configuration.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

TERMS = ("global", "divergence", "local", "category", "itm", "swap")


@dataclass
class ObjectiveConfig:
    use_global: bool = field(default=True, metadata={"help": "global image-report InfoNCE"})
    use_divergence: bool = field(default=True, metadata={"help": "divergence (EMA) encoders' cross terms"})
    use_local: bool = field(default=True, metadata={"help": "token-knowledge-patch local alignment"})
    use_category: bool = field(default=True, metadata={"help": "prototype (Sinkhorn) category-level loss"})
    use_itm: bool = field(default=True, metadata={"help": "image-text matching with hard negatives"})
    use_swap: bool = field(default=True, metadata={"help": "text-swapping prediction"})
    lambda_global: float = field(default=1.0, metadata={"min": 0, "help": "λg, weight of global + divergence"})
    lambda_local: float = field(default=1.0, metadata={"min": 0, "help": "λl"})
    lambda_category: float = field(default=1.0, metadata={"min": 0, "help": "λc"})
    lambda_itm: float = field(default=1.0, metadata={"min": 0, "help": "λm"})
    lambda_swap: float = field(default=1.0, metadata={"min": 0, "help": "λs"})
    # global / false negatives
    false_negatives: str = field(default="drop", metadata={
        "help": "same-knowledge-category pairs in the global loss: 'off' (plain InfoNCE), 'drop' or 'soft'"})
    false_negative_match: str = field(default="overlap", metadata={
        "help": "which pairs share a knowledge category: 'overlap' (any affirmed finding in common; measured "
                "best, docs/ablation.md) or 'exact' (the same set of findings)"})
    false_negatives_divergence: bool = field(default=True, metadata={
        "help": "apply the false-negative rule to the divergence cross terms too (else plain InfoNCE there)"})
    false_negative_weight: float = field(default=0.0, metadata={"min": 0, "max": 1, "help":
        "'drop': weight of a same-category pair in the denominator (0: dropped, 1: plain InfoNCE); between, "
        "same-finding images are still pushed apart a little, which keeps what no report names"})
    soft_weight: float = field(default=0.5, metadata={"min": 0, "max": 1, "help": "target weight of a same-category pair ('soft')"})
    # divergence encoders
    ema_m0: float = field(default=0.99, metadata={"min": 0, "max": 1, "help": "EMA momentum at step 0 (cosine rise)"})
    ema_m1: float = field(default=0.999, metadata={"min": 0, "max": 1, "help": "EMA momentum at the last step"})
    divergence_image: bool = field(default=True, metadata={
        "help": "the divergence term also contrasts each image with its divergence view (InfoNCE(image, "
                "image_div)): keeps image detail that no report names (our choice, docs/method.md)"})
    image_weight: float = field(default=1.0, metadata={"min": 0,
        "help": "weight of the image-image divergence term within the divergence term (4 kept more of what no "
                "report names on real X-rays, but collapsed MLIP to random-init scores on the synthetic demo data: "
                "docs/ablation.md)"})
    image_head: int = field(default=0, metadata={"min": 0, "help":
        "hidden width of a separate MLP head (SLIP's) that maps the image tower's pooled features before "
        "its projection to the image-image space; 0: the image-image term uses the shared image-report "
        "embedding, where the false-negative rule pulls same-finding images together"})
    image_temperature: float = field(default=0.1, metadata={"gt": 0,
        "help": "temperature of the image-image divergence term (SimCLR/MoCo range; the image-report terms "
                "use the learned one)"})
    # local
    local_temperature: float = field(default=0.1, metadata={"gt": 0, "help": "token-level InfoNCE temperature"})
    local_heads: int = field(default=4, metadata={"min": 1, "help": "heads of the TKP cross-attentions"})
    local_dim: int = field(default=0, metadata={"min": 0,
        "help": "width of the local (token/patch) space; 0: auto, 128 (the method's) or the image tower's "
                "width if narrower"})
    local_knowledge: bool = field(default=True, metadata={"help": "tokens attend to knowledge before patches"})
    knowledge_relations: bool = field(default=False, metadata={
        "help": "relation-aware knowledge: each concept's embedding is averaged with the mean of its KB "
                "neighbours' (docs/method.md)"})
    # category
    num_prototypes: int = field(default=0, metadata={"min": 0,
        "help": "K prototypes (0: auto from the global batch, see recipe.py; MGCA's 500 is for batch 144 x 50 "
                "epochs)"})
    proto_temperature: float = field(default=0.2, metadata={"gt": 0, "help": "swapped-prediction temperature"})
    sinkhorn_eps: float = field(default=0.05, metadata={"gt": 0, "help": "Sinkhorn entropy ε"})
    sinkhorn_iters: int = field(default=3, metadata={"min": 1, "help": "Sinkhorn iterations"})
    freeze_prototypes: float = field(default=0.05, metadata={"min": 0, "max": 1,
        "help": "fraction of the run's optimizer steps with frozen prototypes (MGCA: its first epoch of 50)"})
    freeze_prototypes_steps: int = field(default=-1, metadata={"min": -1,
        "help": "optimizer steps with frozen prototypes; -1: from --freeze-prototypes"})
    proto_queue: int = field(default=0, metadata={"min": 0,
        "help": "embeddings of past batches kept per rank and added to the Sinkhorn batch (SwAV's queue, "
                "for global batches smaller than K); 0: off"})
    prior_mix: float = field(default=0.3, metadata={"min": 0, "max": 1,
        "help": "weight of the category co-occurrence prior in the Sinkhorn target (0: off)"})
    # fusion / proxy tasks
    # Fusion sizes, 0: auto from the embedding width E (model/mlip.py ``head_sizes``): the method's
    # 32/32/16 -> 256 for E >= 128, scaled down for narrower towers, whose step they would dominate.
    tucker_rank_v: int = field(default=0, metadata={"min": 0, "help": "Tucker rank of the image factor (0: auto)"})
    tucker_rank_t: int = field(default=0, metadata={"min": 0, "help": "Tucker rank of the text factor (0: auto)"})
    tucker_rank_k: int = field(default=0, metadata={"min": 0, "help": "Tucker rank of the knowledge factor (0: auto)"})
    tucker_out: int = field(default=0, metadata={"min": 0, "help": "Tucker fusion output width (0: auto)"})
    swap_prob: float = field(default=0.5, metadata={"min": 0, "max": 1, "help": "probability of swapping a report"})
    swap_mode: str = field(default="auto", metadata={"help": "'auto', 'mentions' or 'sentence'"})
    aux_start: float = field(default=0.2, metadata={"min": 0, "max": 1,
        "help": "fraction of the run's optimizer steps during which every term but the global one is off "
                "(not computed)"})
    aux_warmup: float = field(default=0.1, metadata={"min": 0, "max": 1,
        "help": "then the fraction of the run over which their weights ramp linearly from 0 to their λ"})
    aux_start_steps: int = field(default=-1, metadata={"min": -1,
        "help": "the same in optimizer steps (overrides --aux-start); -1: from --aux-start"})
    aux_warmup_steps: int = field(default=-1, metadata={"min": -1,
        "help": "the same in optimizer steps (overrides --aux-warmup); -1: from --aux-warmup"})

    def enabled(self, name: str) -> bool:
        return getattr(self, f"use_{name}")

    def weight(self, name: str) -> float:
        key = {"global": "global", "divergence": "global", "local": "local", "category": "category",
               "itm": "itm", "swap": "swap"}[name]
        return getattr(self, f"lambda_{key}")


def aux_scale(cfg: ObjectiveConfig, step: int | None) -> float:
    """The factor on the auxiliary terms at optimizer step ``step`` (``aux_start_steps``,
    ``aux_warmup_steps``). Why: with
    random towers the global term starts near chance, and the auxiliary terms have degenerate
    minima (one embedding for every image solves the prototype and local terms' easy parts) that
    can pull the towers there before the global term gets going."""
    if step is None:
        return 1.0
    start, warmup = max(0, cfg.aux_start_steps), max(0, cfg.aux_warmup_steps)
    if step < start:
        return 0.0
    if warmup <= 0:
        return 1.0
    return min(1.0, (step - start) / warmup)


def term_weight(cfg: ObjectiveConfig, name: str, step: int | None = None) -> float:
    """The weight of term ``name`` at optimizer step ``step``: 0 when it is switched off or delayed."""
    if not cfg.enabled(name):
        return 0.0
    return cfg.weight(name) * (1.0 if name == "global" else aux_scale(cfg, step))


def active_terms(cfg: ObjectiveConfig, step: int | None = None) -> frozenset[str]:
    """The terms with a non-zero weight at ``step``: the only ones worth computing."""
    return frozenset(t for t in TERMS if term_weight(cfg, t, step) > 0)


def total_loss(terms: dict[str, torch.Tensor], cfg: ObjectiveConfig,
               step: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the enabled terms and a dict of detached values for logging.

    ``terms`` maps names of ``TERMS`` to scalar losses; a term with a non-zero weight at ``step``
    missing from it is an error (a silent zero would hide an integration bug); a term whose weight is
    0 (off, λ = 0, or still delayed) is left out of the sum even when present, so it costs nothing
    and a non-finite value in it cannot reach the total. Logged names: ``loss/<term>`` (unweighted)
    and ``loss/total``.
    """
    unknown = set(terms) - set(TERMS)
    if unknown:
        raise KeyError(f"unknown loss terms {sorted(unknown)}; expected some of {TERMS}")
    total, named = None, {}
    for name in TERMS:
        w = term_weight(cfg, name, step)
        if w == 0:
            continue
        if name not in terms:
            raise KeyError(f"loss term '{name}' is enabled (use_{name}) but was not computed")
        value = terms[name]
        named[f"loss/{name}"] = value.detach()
        total = w * value if total is None else total + w * value
    if total is None:
        raise ValueError("every loss term is switched off (or has weight 0)")
    named["loss/total"] = total.detach()
    return total, named
