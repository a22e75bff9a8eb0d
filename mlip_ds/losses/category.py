"""Knowledge-guided category-level contrast (MLIP sec. 3).

Two parts:
* ``category_loss``: SwAV's swapped prediction between image and text prototype assignments
  (Sinkhorn targets, temperature 0.2), the target optionally mixed with the knowledge-category
  co-occurrence prior (our choice, see ``model/prototypes.py``).
* The false-negative fix for the global loss: a sample's knowledge category is the set of its
  non-negated finding concepts ("no finding" when empty, if that column exists); ``category_mask``
  marks off-diagonal pairs of the gathered batch with the same category, and ``masked_info_nce``
  drops them from the negatives (or gives them part of the target mass, ``mode="soft"``). It is
  gathered across ranks exactly like ``global_contrast.py``.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mlip_ds.losses.global_contrast import dist_info, global_rows
from mlip_ds.model.prototypes import CooccurrencePrior, sinkhorn


def category_multi_hot(entities_batch: list[list[dict]], category_index: dict[str, int], key: str = "name",
                       no_finding: str | None = "no_finding", include_uncertain: bool = True) -> torch.Tensor:
    """(B, C) bool: column ``category_index[e[key]]`` set for every non-negated mention; a sample with
    none gets the ``no_finding`` column when it is in the index (else stays empty = no category)."""
    out = torch.zeros(len(entities_batch), len(category_index), dtype=torch.bool)
    for b, ents in enumerate(entities_batch):
        for e in ents:
            c = category_index.get(e.get(key))
            if c is None or e.get("negated") or (e.get("uncertain") and not include_uncertain):
                continue
            out[b, c] = True
        if not out[b].any() and no_finding is not None and no_finding in category_index:
            out[b, category_index[no_finding]] = True
    return out


def category_mask(cats_local: torch.Tensor, cats_all: torch.Tensor, offset: int = 0,
                  match: str = "exact") -> torch.Tensor:
    """(B, N) bool: True where local row i and pool column j are different samples (j != offset + i)
    whose categories are non-empty and equal (``match="exact"``) or intersect (``"overlap"``)."""
    a, b = cats_local.float(), cats_all.float()
    inter = a @ b.T
    if match == "exact":
        same = (inter == a.sum(1, keepdim=True)) & (inter == b.sum(1).unsqueeze(0)) & (inter > 0)
    elif match == "overlap":
        same = inter > 0
    else:
        raise ValueError(f"category_mask: match must be 'exact' or 'overlap', got {match!r}")
    same.diagonal(offset).fill_(False)  # not same[rows, rows + offset] = False: a CPU scalar copied, a sync on CUDA
    return same


def _masked_ce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, mode: str,
               soft_weight: float, neg_weight: float = 0.0) -> torch.Tensor:
    if mode == "drop":
        if neg_weight > 0:  # each masked pair counts neg_weight times in the denominator: log w added to its logit
            return F.cross_entropy(logits + math.log(neg_weight) * mask.to(logits.dtype), labels)
        return F.cross_entropy(logits.masked_fill(mask, float("-inf")), labels)
    if mode == "soft":
        target = F.one_hot(labels, logits.shape[1]).to(logits.dtype) + soft_weight * mask.to(logits.dtype)
        target = target / target.sum(dim=1, keepdim=True)
        return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    raise ValueError(f"masked_info_nce: mode must be 'drop' or 'soft', got {mode!r}")


def gather_categories(cats: torch.Tensor) -> torch.Tensor:
    """The (B * world, C) categories of the global batch, in rank order (no gradient)."""
    rank, world_size = dist_info()
    if world_size == 1:
        return cats
    c = cats.to(torch.uint8 if cats.dtype == torch.bool else cats.dtype).contiguous()
    parts = [torch.empty_like(c) for _ in range(world_size)]
    dist.all_gather(parts, c)
    return torch.cat(parts).to(cats.dtype)


def pair_info_nce(a: torch.Tensor, b: torch.Tensor, all_a: torch.Tensor, all_b: torch.Tensor,
                  logit_scale: torch.Tensor, offset: int, mask: torch.Tensor | None = None,
                  mode: str = "drop", soft_weight: float = 0.5, neg_weight: float = 0.0) -> torch.Tensor:
    """Symmetric InfoNCE of the local rows ``a``/``b`` against the pools ``all_b``/``all_a``; row i's
    positive is column ``offset + i``. ``mask`` (B, N): pairs that are not negatives (``mode``
    'drop' or 'soft', see ``masked_info_nce``); None: plain InfoNCE."""
    labels = torch.arange(a.shape[0], device=a.device) + offset
    logits_ab = logit_scale * a @ all_b.T
    logits_ba = logit_scale * b @ all_a.T
    if mask is None:
        return 0.5 * (F.cross_entropy(logits_ab, labels) + F.cross_entropy(logits_ba, labels))
    return 0.5 * (_masked_ce(logits_ab, labels, mask, mode, soft_weight, neg_weight)
                  + _masked_ce(logits_ba, labels, mask, mode, soft_weight, neg_weight))


def masked_info_nce(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                    cats: torch.Tensor, mode: str = "drop", soft_weight: float = 0.5,
                    match: str = "exact", neg_weight: float = 0.0) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch where same-category pairs are not negatives.

    ``cats`` (B, C) multi-hot of the local rows (gathered here, no gradient). ``mode="drop"``: their
    logits are removed, or with ``neg_weight`` w in (0, 1] each counts w times in the denominator
    (attenuated rather than dropped: w = 1 is plain InfoNCE; the push apart of two same-category
    images, which keeps what tells them apart, is scaled by about w); ``"soft"``: the target puts
    weight 1 on the positive and ``soft_weight`` on each same-category pair, normalised. With no shared category it equals ``info_nce``.
    """
    offset = dist_info()[0] * image_features.shape[0]
    all_image, all_text = global_rows(image_features, text_features)
    mask = category_mask(cats, gather_categories(cats), offset=offset, match=match)
    return pair_info_nce(image_features, text_features, all_image, all_text, logit_scale, offset, mask, mode,
                         soft_weight, neg_weight)


def swapped_prediction(image_scores: torch.Tensor, text_scores: torch.Tensor, image_codes: torch.Tensor,
                       text_codes: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """SwAV swapped prediction: the image's scores predict the text's code and vice versa (mean over rows)."""
    loss_i = -(text_codes * F.log_softmax(image_scores / temperature, dim=1)).sum(dim=1).mean()
    loss_t = -(image_codes * F.log_softmax(text_scores / temperature, dim=1)).sum(dim=1).mean()
    return 0.5 * (loss_i + loss_t)


def category_loss(image_scores: torch.Tensor, text_scores: torch.Tensor, temperature: float = 0.2,
                  eps: float = 0.05, iters: int = 3, cats: torch.Tensor | None = None,
                  prior: CooccurrencePrior | None = None, prior_mix: float = 0.0,
                  update_prior: bool = True, image_queue_scores: torch.Tensor | None = None,
                  text_queue_scores: torch.Tensor | None = None) -> torch.Tensor:
    """Category-level loss from prototype scores (B, K) of the image and text embeddings.

    Codes come from the (all-reduced) Sinkhorn, over the batch and, when given, the (n, K) scores of
    queued embeddings (``FeatureQueue``; only the batch's codes are used); with ``prior`` and
    ``prior_mix`` > 0, each sample's code becomes (1 - prior_mix)·code + prior_mix·prior(cats) where
    the sample's categories have been seen; the prior is then updated with the mean of the two codes
    (before mixing).
    """
    b = image_scores.shape[0]

    def codes(scores, queued):
        rows = scores if queued is None or queued.shape[0] == 0 else torch.cat([scores, queued.to(scores.dtype)])
        return sinkhorn(rows, eps=eps, iters=iters)[:b]

    image_codes = codes(image_scores, image_queue_scores)
    text_codes = codes(text_scores, text_queue_scores)
    if prior is not None and cats is not None:
        if prior_mix > 0:
            p, has = prior.prior(cats)
            mix = (prior_mix * has.float()).unsqueeze(1)
            image_codes_mixed = (1 - mix) * image_codes + mix * p
            text_codes_mixed = (1 - mix) * text_codes + mix * p
        else:
            image_codes_mixed, text_codes_mixed = image_codes, text_codes
        if update_prior:
            prior.update(cats, 0.5 * (image_codes + text_codes))
        image_codes, text_codes = image_codes_mixed, text_codes_mixed
    return swapped_prediction(image_scores.float(), text_scores.float(), image_codes, text_codes, temperature)
