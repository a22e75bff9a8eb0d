"""Mathematics of the MLIP loss terms: hand-computed values, masking, marginals, samplers, swapping,
over-fitting one batch, and 2 ranks == 1 rank for every term that crosses ranks."""
import math
import os
import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from conftest import free_port
from mlip_ds.losses.category import (category_loss, category_mask, category_multi_hot, masked_info_nce,
                                     swapped_prediction)
from mlip_ds.losses.divergence import divergence_loss
from mlip_ds.losses.global_contrast import info_nce
from mlip_ds.losses.itm import itm_batch, itm_loss, sample_hard_negatives
from mlip_ds.losses.local_alignment import importance_weights, local_alignment_loss, token_mask
from mlip_ds.losses.objective import ObjectiveConfig, total_loss
from mlip_ds.losses.swap import negation_words, sentence_spans, swap_loss, swap_texts
from mlip_ds.model.heads import ITMHead, SwapHead
from mlip_ds.model.prototypes import CooccurrencePrior, Prototypes, sinkhorn
from mlip_ds.model.tucker import TuckerFusion


def _unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def _ce(row, target):
    return -row[target] + math.log(sum(math.exp(v) for v in row))


# ----------------------------------------------------------------------------- false negatives
def test_category_mask_never_removes_the_diagonal_and_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    cats_all = torch.rand(12, 3, generator=g) < 0.4  # many duplicates and some empty rows
    cats_all[:4] = torch.tensor([True, False, False])  # identical rows, including the local ones
    for offset in (0, 4, 8):
        local = cats_all[offset:offset + 4]
        for match in ("exact", "overlap"):
            mask = category_mask(local, cats_all, offset=offset, match=match)
            assert not mask[torch.arange(4), torch.arange(4) + offset].any()
            for i in range(4):
                for j in range(12):
                    a, b = set(local[i].nonzero().flatten().tolist()), set(cats_all[j].nonzero().flatten().tolist())
                    same = (a == b and len(a) > 0) if match == "exact" else len(a & b) > 0
                    assert mask[i, j].item() == (same and j != offset + i), (offset, match, i, j)
    # Every row in one category: only the diagonal survives.
    ones = torch.ones(5, 2, dtype=torch.bool)
    assert torch.equal(category_mask(ones, ones), ~torch.eye(5, dtype=torch.bool))


def test_masked_info_nce_equals_info_nce_without_shared_categories():
    img, txt = _unit(6, 4, seed=1), _unit(6, 4, seed=2)
    scale = torch.tensor([5.0])
    distinct = torch.eye(6, dtype=torch.bool)
    empty = torch.zeros(6, 3, dtype=torch.bool)  # no category at all: nothing is masked
    for cats in (distinct, empty):
        for mode in ("drop", "soft"):
            got = masked_info_nce(img, txt, scale, cats, mode=mode)
            assert torch.allclose(got, info_nce(img, txt, scale), atol=1e-6)


def test_masked_info_nce_matches_hand_computation():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    txt = torch.tensor([[0.6, 0.8], [0.0, 1.0], [1.0, 0.0]])
    scale = torch.tensor([2.0])
    cats = torch.tensor([[1, 0], [1, 0], [0, 1]], dtype=torch.bool)  # samples 0 and 1 share a category
    li = [[2 * sum(a * b for a, b in zip(i, t)) for t in txt.tolist()] for i in img.tolist()]
    lt = [[li[j][i] for j in range(3)] for i in range(3)]  # text -> image is the transpose
    drop = lambda rows: [[v for j, v in enumerate(r) if not ({i, j} == {0, 1})] for i, r in enumerate(rows)]
    tgt = [0, 0, 2]  # the positive's position in each row once (0, 1) / (1, 0) are removed
    i2t = sum(_ce(r, t) for r, t in zip(drop(li), tgt)) / 3
    t2i = sum(_ce(r, t) for r, t in zip(drop(lt), tgt)) / 3
    assert abs(masked_info_nce(img, txt, scale, cats).item() - 0.5 * (i2t + t2i)) < 1e-6
    # soft targets, weight w: row 0 puts 1/(1+w) on column 0 and w/(1+w) on column 1.
    w = 0.5
    def soft(rows):
        total = 0.0
        for i, r in enumerate(rows):
            lse = math.log(sum(math.exp(v) for v in r))
            targets = {i: 1.0} | ({1 - i: w} if i < 2 else {})
            z = sum(targets.values())
            total += -sum(p / z * (r[j] - lse) for j, p in targets.items())
        return total / 3
    expected = 0.5 * (soft(li) + soft(lt))
    assert abs(masked_info_nce(img, txt, scale, cats, mode="soft", soft_weight=w).item() - expected) < 1e-6
    # attenuated negatives, weight w: the pair (0, 1) counts w times in each denominator.
    def attenuated(rows):
        total = 0.0
        for i, r in enumerate(rows):
            denom = sum((w if {i, j} == {0, 1} else 1.0) * math.exp(v) for j, v in enumerate(r))
            total += -(r[i] - math.log(denom))
        return total / 3
    expected = 0.5 * (attenuated(li) + attenuated(lt))
    assert abs(masked_info_nce(img, txt, scale, cats, neg_weight=w).item() - expected) < 1e-6
    # weight 1 is plain InfoNCE; a small weight tends to the dropped pair
    assert torch.allclose(masked_info_nce(img, txt, scale, cats, neg_weight=1.0), info_nce(img, txt, scale), atol=1e-6)
    assert abs(masked_info_nce(img, txt, scale, cats, neg_weight=1e-9).item() - 0.5 * (i2t + t2i)) < 1e-6


def test_category_multi_hot_uses_non_negated_findings_and_no_finding():
    index = {"effusion": 0, "edema": 1, "no_finding": 2}
    ents = [[{"name": "effusion", "negated": False}, {"name": "edema", "negated": True}],
            [{"name": "edema", "negated": True}],
            [{"name": "edema", "negated": False, "uncertain": True}]]
    got = category_multi_hot(ents, index).int().tolist()
    assert got == [[1, 0, 0], [0, 0, 1], [0, 1, 0]]
    assert category_multi_hot(ents, index, include_uncertain=False).int().tolist()[2] == [0, 0, 1]


# ----------------------------------------------------------------------------- sinkhorn / category
def test_sinkhorn_meets_both_marginals():
    scores = _unit(16, 8, seed=3) @ _unit(10, 8, seed=4).T
    b, k = scores.shape
    q3 = sinkhorn(scores, eps=0.05, iters=3)
    assert (q3 >= 0).all()
    # Our normalisation: each sample row sums to exactly 1, each prototype column to B/K.
    assert torch.allclose(q3.sum(1), torch.ones(b), atol=1e-5)
    q0 = torch.softmax(scores / 0.05, dim=1)
    assert (q3.sum(0) - b / k).abs().max() < (q0.sum(0) - b / k).abs().max()  # 3 iterations move towards it
    q = sinkhorn(scores, eps=0.05, iters=200)
    assert torch.allclose(q.sum(1), torch.ones(b), atol=1e-5)
    assert torch.allclose(q.sum(0), torch.full((k,), b / k), atol=1e-3)
    assert torch.isfinite(sinkhorn(scores * 0 + 1.0)).all()


def test_swapped_prediction_matches_formula_and_prior_mixing():
    si, st = _unit(6, 4, seed=5), _unit(6, 4, seed=6)
    qi, qt = sinkhorn(si), sinkhorn(st)
    expected = -0.5 * ((qt * F.log_softmax(si / 0.2, 1)).sum(1).mean()
                       + (qi * F.log_softmax(st / 0.2, 1)).sum(1).mean())
    assert torch.allclose(swapped_prediction(si, st, qi, qt), expected)
    assert torch.allclose(category_loss(si, st), expected)
    # Prior: an empty table gives no prior; once filled, the target is (1 - a) q + a p.
    cats = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1], [0, 0], [1, 1]], dtype=torch.bool)
    prior = CooccurrencePrior(2, 4, decay=0.0)
    assert torch.allclose(category_loss(si, st, cats=cats, prior=prior, prior_mix=0.5), expected)
    filled = prior.counts.clone()
    assert torch.allclose(filled, cats.float().T @ (0.5 * (qi + qt)), atol=1e-6)
    p, has = prior.prior(cats)
    assert has.tolist() == [True, True, True, True, False, True]
    mix = (0.5 * has.float()).unsqueeze(1)
    mixed = swapped_prediction(si, st, (1 - mix) * qi + mix * p, (1 - mix) * qt + mix * p)
    assert torch.allclose(category_loss(si, st, cats=cats, prior=prior, prior_mix=0.5), mixed, atol=1e-6)


# ----------------------------------------------------------------------------- divergence
def test_divergence_loss_is_the_two_cross_terms_and_ema_features_get_no_gradient():
    img, txt = _unit(6, 4, seed=7).requires_grad_(), _unit(6, 4, seed=8).requires_grad_()
    img_d, txt_d = _unit(6, 4, seed=9).requires_grad_(), _unit(6, 4, seed=10).requires_grad_()
    scale = torch.tensor([4.0])
    loss = divergence_loss(img, txt, img_d, txt_d, scale)
    assert torch.allclose(loss, info_nce(img, txt_d, scale) + info_nce(img_d, txt, scale))
    loss.backward()
    assert img.grad is not None and txt.grad is not None
    assert img_d.grad is None and txt_d.grad is None


def test_divergence_loss_false_negatives_and_image_image_term():
    img, txt = _unit(6, 4, seed=7).requires_grad_(), _unit(6, 4, seed=8).requires_grad_()
    img_d, txt_d = _unit(6, 4, seed=9), _unit(6, 4, seed=10)
    scale = torch.tensor([4.0])
    cats = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 0], [0, 1], [1, 1]], dtype=torch.bool)
    plain = divergence_loss(img, txt, img_d, txt_d, scale)
    # No shared category: the mask changes nothing.
    alone = torch.eye(6, dtype=torch.bool)
    assert torch.allclose(divergence_loss(img, txt, img_d, txt_d, scale, cats=alone, mode="drop"), plain)
    assert torch.allclose(divergence_loss(img, txt, img_d, txt_d, scale, cats=cats, mode="off"), plain)
    # Same-category pairs (0,1) and (2,4) are not negatives in either cross term: brute force.
    same = category_mask(cats, cats)
    def masked(a, b):
        logits = scale * a @ b.T
        return torch.stack([torch.tensor(_ce(logits[i].masked_fill(same[i], -1e9).tolist(), i))
                            for i in range(6)]).mean()
    expect = 0.5 * (masked(img, txt_d) + masked(txt_d, img)) + 0.5 * (masked(img_d, txt) + masked(txt, img_d))
    got = divergence_loss(img, txt, img_d, txt_d, scale, cats=cats, mode="drop")
    assert torch.allclose(got, expect.float(), atol=1e-5) and got < plain
    # The image-image term: InfoNCE between the two views of the images, at its own temperature,
    # without any category mask (instance discrimination).
    with_ii = divergence_loss(img, txt, img_d, txt_d, scale, cats=cats, mode="drop", image_image_scale=10.0)
    assert torch.allclose(with_ii - got, info_nce(img, img_d, torch.tensor([10.0])), atol=1e-6)
    heavier = divergence_loss(img, txt, img_d, txt_d, scale, cats=cats, mode="drop", image_image_scale=10.0,
                              image_image_weight=3.0)
    assert torch.allclose(heavier - got, 3 * info_nce(img, img_d, torch.tensor([10.0])), atol=1e-5)
    with_ii.backward()
    assert img.grad is not None and txt.grad is not None


# ----------------------------------------------------------------------------- local alignment
def _local_batch(seed=0, b=3, t=7, p=5, d=6):
    g = torch.Generator().manual_seed(seed)
    tok, ctx = torch.randn(b, t, d, generator=g), torch.randn(b, t, d, generator=g)
    pat, pctx = torch.randn(b, p, d, generator=g), torch.randn(b, p, d, generator=g)
    w, pw = torch.rand(b, t, generator=g), torch.rand(b, p, generator=g)
    mask = torch.zeros(b, t, dtype=torch.bool)
    mask[0, 1:6], mask[1, 1:3], mask[2, 1:] = True, True, True  # pad/special tokens off
    return tok, ctx, pat, pctx, w, pw, mask


def test_local_loss_ignores_padding_values_and_gradients():
    tok, ctx, pat, pctx, w, pw, mask = _local_batch()
    def run(tok, ctx, w):
        tok, ctx = tok.clone().requires_grad_(), ctx.clone().requires_grad_()
        loss = local_alignment_loss(tok, ctx, mask, w, pat, pctx, pw)
        loss.backward()
        return loss.detach(), tok.grad, ctx.grad
    ref = run(tok, ctx, w)
    pad = ~mask.unsqueeze(-1)
    noisy = [x + pad * 100 * torch.randn_like(x) for x in (tok, ctx)]
    got = run(*noisy, w + (~mask) * 7.0)
    assert torch.isfinite(ref[0]) and torch.allclose(ref[0], got[0], atol=1e-6)
    for a, b in zip(ref[1:], got[1:]):
        assert torch.allclose(a, b, atol=1e-6)
        assert (a * pad).abs().max() == 0  # masked positions receive no gradient


def test_local_loss_equals_the_per_sample_loss_without_padding():
    tok, ctx, pat, pctx, w, pw, mask = _local_batch(seed=1)
    full = local_alignment_loss(tok, ctx, mask, w, temperature=0.1)
    per = []
    for i in range(3):
        keep = mask[i]
        per.append(local_alignment_loss(tok[i:i + 1, keep], ctx[i:i + 1, keep], mask[i:i + 1, keep], w[i:i + 1, keep]))
    assert torch.allclose(full, torch.stack(per).mean(), atol=1e-6)
    # One sample, uniform weights, no clipping: MGCA's two-directional token InfoNCE by hand.
    t, c = F.normalize(tok[1, 1:3], dim=-1), F.normalize(ctx[1, 1:3], dim=-1)
    s = (t @ c.T / 0.1).tolist()
    expected = 0.5 * (sum(_ce(s[i], i) for i in range(2)) / 2 + sum(_ce([s[0][j], s[1][j]], j) for j in range(2)) / 2)
    got = local_alignment_loss(tok[1:2], ctx[1:2], mask[1:2], None, clip_quantiles=None)
    assert abs(got.item() - expected) < 1e-5


def test_importance_weights_and_token_mask():
    ids = torch.tensor([[101, 7, 8, 102, 0, 0]])
    assert token_mask(ids, (0, 101, 102)).tolist() == [[False, True, True, False, False, False]]
    w = importance_weights(torch.tensor([[5.0, 0.1, 0.2, 0.3, 9.0]]), torch.tensor([[False, True, True, True, False]]))
    assert w[0, 0] == 0 and w[0, 4] == 0 and torch.allclose(w.sum(), torch.tensor(1.0))


# ----------------------------------------------------------------------------- ITM
def test_hard_negatives_never_positive_nor_same_category_when_others_exist():
    g = torch.Generator().manual_seed(0)
    b = 6
    logits = torch.randn(b, b, generator=g) * 3
    logits.diagonal().add_(50.0)  # the positive dominates the softmax: it must still never be drawn
    cats = torch.tensor([[1, 0], [1, 0], [1, 0], [0, 1], [0, 1], [0, 0]], dtype=torch.bool)
    same = category_mask(cats, cats)
    for _ in range(200):
        idx = sample_hard_negatives(logits, cats, generator=g)
        assert (idx != torch.arange(b)).all()
        assert not same[torch.arange(b), idx].any()
    # Everyone in one category: the only candidates are same-category, still never the positive.
    one = torch.ones(b, 1, dtype=torch.bool)
    for _ in range(50):
        assert (sample_hard_negatives(logits, one, generator=g) != torch.arange(b)).all()
    # Hard negatives follow the similarities: a strongly similar column is picked nearly always.
    logits2 = torch.zeros(b, b)
    logits2[0, 4] = 20.0
    assert (torch.stack([sample_hard_negatives(logits2, generator=g)[0] for _ in range(50)]) == 4).all()
    # Offset: rows are a slice of a larger pool.
    pool = torch.randn(2, 6, generator=g)
    for _ in range(50):
        idx = sample_hard_negatives(pool, cats, offset=3, generator=g)
        assert idx[0] not in (3, 4) and idx[1] != 4


def test_itm_hard_negatives_follow_the_false_negative_match_mode():
    # Row 0 has {A, B}; column 1 has {A} (overlaps, not exact), column 2 has {C}. 'overlap' never draws
    # column 1 (a likely false negative under that rule); 'exact' does (it is a negative there).
    cats = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.bool)
    logits = torch.tensor([[0.0, 5.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    draws = {m: {int(sample_hard_negatives(logits, cats, generator=torch.Generator().manual_seed(s), match=m)[0])
                 for s in range(40)} for m in ("exact", "overlap")}
    assert draws["overlap"] == {2} and 1 in draws["exact"]
    g = torch.Generator().manual_seed(0)
    v, t, k = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 2)
    for m in ("exact", "overlap"):
        _, t3, _, _ = itm_batch(v, t, k, logits, cats, generator=torch.Generator().manual_seed(1), match=m)
        if m == "overlap":
            assert torch.equal(t3[3], t[2])  # image 0's negative report: never the overlapping one


def test_itm_and_swap_learn_a_separable_batch_well_below_chance():
    """With the fusion's init (unit-variance output), the proxy heads learn within a few dozen steps:
    pairs of the same class match, pairs across classes do not. Chance: ITM 0.637 (1:2 prior),
    swap ln 2."""
    torch.manual_seed(0)
    b, d = 32, 16
    classes = torch.arange(b) % 4
    centers = _unit(4, d, seed=3)
    noisy = lambda seed: F.normalize(centers[classes] + 0.3 * _unit(b, d, seed=seed), dim=-1)
    img, txt, know = noisy(1), noisy(2), torch.randn(4, 8)[classes]
    cats = F.one_hot(classes, 4).bool()
    sims = 10 * img @ txt.T
    v3, t3, k3, labels = itm_batch(img, txt, know, sims, cats, generator=torch.Generator().manual_seed(0))
    fusion, head = TuckerFusion(d, d, 8, ranks=(8, 8, 4), out_dim=32), ITMHead(32)
    first, last = _fits(lambda: itm_loss(head(fusion(v3, t3, k3)), labels),
                        list(fusion.parameters()) + list(head.parameters()), steps=40, lr=3e-3)
    assert first > 0.45 and last < 0.2, (first, last)
    partner = (torch.arange(b) + 1) % b  # a swapped report reads like another class's
    swapped = torch.arange(b) % 2
    t_sw = torch.where(swapped.bool().unsqueeze(1), txt[partner], txt)
    k_sw = torch.where(swapped.bool().unsqueeze(1), know[partner], know)
    fusion, head = TuckerFusion(d, d, 8, ranks=(8, 8, 4), out_dim=32), SwapHead(32)
    first, last = _fits(lambda: swap_loss(head(fusion(img, t_sw, k_sw)), swapped),
                        list(fusion.parameters()) + list(head.parameters()), steps=40, lr=3e-3)
    assert first > 0.5 and last < 0.2, (first, last)


def test_itm_batch_pairs_and_labels():
    g = torch.Generator().manual_seed(1)
    v, t, k = torch.randn(4, 3, generator=g), torch.randn(4, 5, generator=g), torch.randn(4, 2, generator=g)
    v3, t3, k3, labels = itm_batch(v, t, k, torch.randn(4, 4, generator=g), generator=g)
    assert labels.tolist() == [1] * 4 + [0] * 8
    assert torch.equal(v3[:8], torch.cat([v, v])) and torch.equal(t3[8:], t) and torch.equal(k3[8:], k)
    for i in range(4):  # negative reports carry their own knowledge, and are not the positive
        j = [r for r in range(4) if torch.equal(t3[4 + i], t[r])][0]
        assert j != i and torch.equal(k3[4 + i], k[j])
        assert not torch.equal(v3[8 + i], v[i])


# ----------------------------------------------------------------------------- text swapping
def _reports(n=16):
    from mlip_ds.sources.synthetic import generate_sample
    samples = [generate_sample(i, seed=3, size=32) for i in range(n)]
    return [s.report for s in samples], [s.entities for s in samples]


def _negated_sentences(text):
    return sum(bool(negation_words(text[a:b])) for a, b in sentence_spans(text))


@pytest.mark.parametrize("mode", ["mentions", "sentence", "auto"])
def test_text_swapping_keeps_negations_and_labels_are_right(mode):
    texts, ents = _reports()
    res = swap_texts(texts, ents, p=1.0, mode=mode, rng=random.Random(0))
    # Only affirmed statements are swapped: a report with an affirmed finding can be swapped, one
    # without (a normal report) never is (its swap would still be true of the image).
    affirmed = [any(not e.get("negated") and not e.get("uncertain") for e in ents[i]) for i in range(len(texts))]
    assert 0 < sum(affirmed) < len(texts)  # both kinds are in the batch
    assert res.labels.sum() >= sum(affirmed) // 2
    for i, (old, new) in enumerate(zip(texts, res.texts)):
        assert res.labels[i].item() == int(new != old)
        if res.kinds[i] == "mentions":
            gone = {e["cui"] for e in ents[i]} - {e["cui"] for e in res.entities[i]}
            assert gone and all(not e.get("negated") for e in ents[i] if e["cui"] in gone)
        if res.kinds[i] == "sentence":
            assert _negated_sentences(new) == _negated_sentences(old)
        if res.labels[i]:
            assert res.partners[i] not in (-1, i) and res.kinds[i] in ("mentions", "sentence")
        if res.kinds[i] == "mentions":
            assert negation_words(new) == negation_words(old)  # only the mention span changed
            old_c = {e["cui"] for e in ents[i]}
            new_c = {e["cui"] for e in res.entities[i]}
            assert new_c != old_c and (new_c - old_c) <= {e["cui"] for e in ents[res.partners[i]]}
        if res.kinds[i] == "sentence":
            assert _negated_sentences(new) == _negated_sentences(old)
        for e in res.entities[i]:  # re-linked spans point at real text
            assert 0 <= e["start"] < e["end"] <= len(new)
        partner_surface = {texts[res.partners[i]][e["start"]:e["end"]].lower() for e in ents[res.partners[i]]} \
            if res.labels[i] else set()
        old_surface = {old[e["start"]:e["end"]].lower() for e in ents[i]}
        for e in res.entities[i]:
            assert new[e["start"]:e["end"]].lower() in old_surface | partner_surface
    untouched = swap_texts(texts, ents, p=0.0, rng=random.Random(0))
    assert untouched.texts == texts and untouched.labels.sum() == 0


def _mentions(text, *spans):
    """Shard-schema entities for (cui, surface word, negated) triples of ``text``."""
    return [{"cui": cui, "start": text.index(word), "end": text.index(word) + len(word), "negated": neg}
            for cui, word, neg in spans]


def test_text_swapping_leaves_reports_without_affirmed_findings():
    normal = "FINDINGS: No pleural effusion. No pneumothorax. The lungs are clear."
    sick = "FINDINGS: Right lower lobe pneumonia. Small effusion."
    en = _mentions(normal, ("E", "pleural effusion", True), ("P", "pneumothorax", True))
    es = _mentions(sick, ("N", "pneumonia", False), ("E", "effusion", False))
    for mode in ("mentions", "sentence", "auto"):
        res = swap_texts([normal, sick], [en, es], p=1.0, mode=mode, rng=random.Random(0))
        assert res.texts[0] == normal and res.labels[0] == 0  # "no effusion" -> "no pneumonia" is no swap
        if mode != "sentence":  # the sick report's affirmed finding can take the normal one's concept
            assert res.labels[1] == 1 and "pneumothorax" in res.texts[1]


def test_text_swapping_probability_and_hand_example():
    texts, ents = _reports(32)
    labels = swap_texts(texts, ents, p=0.5, rng=random.Random(1)).labels
    assert 6 <= labels.sum() <= 26
    a = "FINDINGS: Small left pleural effusion. No pneumothorax."
    b = "FINDINGS: Mild edema. No focal consolidation."
    ea = _mentions(a, ("E", "pleural effusion", False), ("P", "pneumothorax", True))
    eb = _mentions(b, ("D", "edema", False), ("C", "consolidation", True))
    res = swap_texts([a, b], [ea, eb], p=1.0, mode="mentions", rng=random.Random(0))
    assert res.texts[0] in ("FINDINGS: Small left edema. No pneumothorax.",
                            "FINDINGS: Small left consolidation. No pneumothorax.")
    shift = len(res.texts[0]) - len(a)
    assert res.entities[0][1] == {**ea[1], "start": ea[1]["start"] + shift, "end": ea[1]["end"] + shift}
    assert res.entities[0][0]["cui"] in ("D", "C") and res.entities[0][0]["negated"] is False
    assert res.labels.tolist() == [1, 1] and res.texts[1].startswith("FINDINGS: Mild ")


# ----------------------------------------------------------------------------- objective
def test_total_loss_weights_switches_and_names():
    cfg = ObjectiveConfig(lambda_global=2.0, lambda_local=0.5, use_itm=False, use_swap=False)
    terms = {k: torch.tensor(v) for k, v in
             dict(global_=1.0, divergence=3.0, local=4.0, category=5.0, itm=100.0).items()}
    terms["global"] = terms.pop("global_")
    total, named = total_loss(terms, cfg)
    assert abs(total.item() - (2 * (1 + 3) + 0.5 * 4 + 5)) < 1e-6
    assert set(named) == {"loss/global", "loss/divergence", "loss/local", "loss/category", "loss/total"}
    with pytest.raises(KeyError, match="swap"):
        total_loss(terms, ObjectiveConfig())
    baseline = ObjectiveConfig(use_divergence=False, use_local=False, use_category=False, use_itm=False, use_swap=False)
    assert total_loss({"global": torch.tensor(1.5)}, baseline)[0].item() == 1.5
    # --aux-warmup-steps: the auxiliary terms ramp from 0; the global term is never scaled.
    ramp = ObjectiveConfig(lambda_global=2.0, lambda_local=0.5, use_itm=False, use_swap=False, aux_warmup_steps=10)
    assert abs(total_loss(terms, ramp, step=0)[0].item() - 2 * 1) < 1e-6
    assert abs(total_loss(terms, ramp, step=5)[0].item() - (2 * 1 + 0.5 * (2 * 3 + 0.5 * 4 + 5))) < 1e-6
    assert abs(total_loss(terms, ramp, step=50)[0].item() - (2 * (1 + 3) + 0.5 * 4 + 5)) < 1e-6
    assert abs(total_loss(terms, ramp)[0].item() - (2 * (1 + 3) + 0.5 * 4 + 5)) < 1e-6  # no step: full weights
    late = ObjectiveConfig(use_itm=False, use_swap=False, aux_start_steps=20, aux_warmup_steps=10)
    assert abs(total_loss(terms, late, step=19)[0].item() - 1.0) < 1e-6
    assert abs(total_loss(terms, late, step=25)[0].item() - (1 + 0.5 * (3 + 4 + 5))) < 1e-6


def test_zero_weighted_terms_cost_nothing_and_cannot_poison_the_total():
    from mlip_ds.losses.objective import active_terms, term_weight
    cfg = ObjectiveConfig(aux_start_steps=10, aux_warmup_steps=5, lambda_swap=0.0)
    assert active_terms(cfg, step=3) == {"global"}
    assert active_terms(cfg, step=10) == {"global"}  # the ramp starts at weight 0
    assert active_terms(cfg, step=11) == {"global", "divergence", "local", "category", "itm"}  # swap: λ = 0
    assert term_weight(cfg, "local", 12) == pytest.approx(0.4)
    terms = {t: torch.tensor(float("inf")) for t in ("divergence", "local", "category", "itm", "swap")}
    terms["global"] = torch.tensor(2.0)
    total, named = total_loss(terms, cfg, step=3)
    assert total.item() == 2.0 and set(named) == {"loss/global", "loss/total"}
    # A delayed term may be absent (it was not computed); an active one may not.
    assert total_loss({"global": torch.tensor(2.0)}, cfg, step=3)[0].item() == 2.0
    with pytest.raises(KeyError, match="divergence"):
        total_loss({"global": torch.tensor(2.0)}, cfg, step=12)


def test_prototype_scores_and_sinkhorn_stay_fp32_under_bf16():
    protos = Prototypes(16, num_prototypes=8)
    feats = _unit(12, 16, seed=4).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = protos(feats)
    exact = F.normalize(feats.float(), dim=-1) @ F.normalize(protos.weight.float(), dim=-1).T
    assert scores.dtype == torch.float32 and torch.allclose(scores, exact, atol=1e-6)
    # What bf16 scores would do to the codes at eps 0.05: a visible change that fp32 avoids.
    codes = sinkhorn(scores)
    noisy = sinkhorn(exact.bfloat16())
    assert torch.allclose(codes, sinkhorn(exact), atol=1e-6)
    assert (codes - noisy).abs().max() > 1e-3


def test_tucker_fusion_output_has_unit_scale_at_init():
    """The fused vector starts with a variance near 1 (the old init gave ~1e-7, under the heads'
    LayerNorm eps of 1e-5), for the tiny and the ViT-B head sizes, with unit-norm inputs."""
    for dims, ranks, out in (((64, 64, 64), (16, 16, 8), 64), ((128, 128, 128), (32, 32, 16), 256)):
        torch.manual_seed(0)
        fusion = TuckerFusion(*dims, ranks=ranks, out_dim=out)
        z = fusion(*(_unit(256, d, seed=i) for i, d in enumerate(dims)))
        assert 0.5 < z.var().item() < 2.0, (dims, z.var().item())
        z.pow(2).mean().backward()
        for w in (fusion.wv, fusion.wt, fusion.wk):  # every factor gets a gradient of a usable size
            assert w.weight.grad.abs().mean() > 1e-3


# ----------------------------------------------------------------------------- over-fitting one batch
def _fits(loss_fn, params, steps=30, lr=0.05):
    opt = torch.optim.Adam(params, lr=lr)
    first = None
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn()
        assert torch.isfinite(loss)
        first = loss.item() if first is None else first
        loss.backward()
        opt.step()
    return first, loss_fn().item()


def test_every_loss_decreases_when_overfitting_one_batch():
    torch.manual_seed(0)
    b, d = 8, 8
    xi, xt = torch.randn(b, 12), torch.randn(b, 12)
    wi, wt = torch.nn.Linear(12, d), torch.nn.Linear(12, d)
    scale = torch.tensor([10.0])
    img = lambda: F.normalize(wi(xi), dim=-1)
    txt = lambda: F.normalize(wt(xt), dim=-1)
    online = list(wi.parameters()) + list(wt.parameters())
    cats = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1], [0, 0], [0, 0], [1, 1], [1, 0]], dtype=torch.bool)
    img_d, txt_d = _unit(b, d, seed=11), _unit(b, d, seed=12)
    results = {
        "global_drop": _fits(lambda: masked_info_nce(img(), txt(), scale, cats), online),
        "global_soft": _fits(lambda: masked_info_nce(img(), txt(), scale, cats, mode="soft"), online),
        "divergence": _fits(lambda: divergence_loss(img(), txt(), img_d, txt_d, scale), online),
    }
    protos = Prototypes(d, num_prototypes=6)
    prior = CooccurrencePrior(2, 6)
    results["category"] = _fits(lambda: category_loss(protos(img()), protos(txt()), cats=cats, prior=prior,
                                                      prior_mix=0.3), online + list(protos.parameters()))
    tok, ctx, pat, pctx, w, pw, mask = _local_batch(seed=2)
    params = [p.requires_grad_() for p in (tok, ctx, pat, pctx)]
    results["local"] = _fits(lambda: local_alignment_loss(tok, ctx, mask, w, pat, pctx, pw), params)
    fusion, itm_head, swap_head = TuckerFusion(d, d, 4, ranks=(4, 4, 2), out_dim=16), ITMHead(16), SwapHead(16)
    k = torch.randn(b, 4)
    g = torch.Generator().manual_seed(0)
    v3, t3, k3, labels = itm_batch(img().detach(), txt().detach(), k, torch.randn(b, b), generator=g)
    results["itm"] = _fits(lambda: itm_loss(itm_head(fusion(v3, t3, k3)), labels),
                           list(fusion.parameters()) + list(itm_head.parameters()), lr=0.01)
    swapped = torch.tensor([1, 0] * (b // 2))
    results["swap"] = _fits(lambda: swap_loss(swap_head(fusion(img().detach(), txt().detach(), k)), swapped),
                            list(fusion.parameters()) + list(swap_head.parameters()), lr=0.01)
    for name, (first, last) in results.items():
        assert last < first, (name, first, last)


# ----------------------------------------------------------------------------- 2 ranks == 1 rank
def _dist_inputs(n=8, d_in=6, d=4, k=5):
    g = torch.Generator().manual_seed(0)
    xi, xt = torch.randn(n, d_in, generator=g), torch.randn(n, d_in, generator=g)
    wi, wt = torch.randn(d_in, d, generator=g), torch.randn(d_in, d, generator=g)
    ema_i, ema_t = torch.randn(d_in, d, generator=g), torch.randn(d_in, d, generator=g)
    protos = torch.randn(k, d, generator=g)
    # Categories shared within and across the two halves (ranks), some empty.
    cats = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 0], [1, 1, 0],
                         [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]], dtype=torch.bool)
    queue = F.normalize(torch.randn(2, 6, d, generator=g), dim=-1)  # SwAV queue: image, text rows
    return xi, xt, wi, wt, ema_i, ema_t, protos, cats, queue


def _dist_losses(xi, xt, wi, wt, ema_i, ema_t, protos, cats, queue):
    """Every cross-rank term with its gradients w.r.t. the shared parameters, as (how to combine
    across ranks, tensor): "mean" (losses, gradients: what DeepSpeed averages), "rows" (per-sample
    Sinkhorn codes: concatenated), "same" (the co-occurrence table: identical on every rank)."""
    out = []
    for term in ("divergence", "divergence_fn", "drop", "soft", "category", "category_queue"):
        p = [t.clone().requires_grad_() for t in (wi, wt, protos)]
        scale = torch.tensor([3.0], requires_grad=True)
        img, txt = F.normalize(xi @ p[0], dim=-1), F.normalize(xt @ p[1], dim=-1)
        if term == "divergence":
            loss = divergence_loss(img, txt, F.normalize(xi @ ema_i, dim=-1), F.normalize(xt @ ema_t, dim=-1), scale)
        elif term == "divergence_fn":  # the false-negative mask and the image-image term
            loss = divergence_loss(img, txt, F.normalize(xi @ ema_i, dim=-1), F.normalize(xt @ ema_t, dim=-1),
                                   scale, cats=cats, mode="drop", image_image_scale=10.0)
        elif term in ("drop", "soft"):
            loss = masked_info_nce(img, txt, scale, cats, mode=term)
        else:
            protos_n = F.normalize(p[2], dim=-1)  # what Prototypes.forward computes
            si, st = img @ protos_n.T, txt @ protos_n.T
            prior = CooccurrencePrior(cats.shape[1], protos.shape[0], decay=0.5)
            codes = sinkhorn(si)
            prior.update(cats, codes)  # fill the table once so the prior mixing is exercised
            loss = category_loss(si, st, cats=cats, prior=prior, prior_mix=0.4)
            out += [("rows", codes), ("same", prior.counts.clone())]
            if term == "category_queue":  # each rank's own queued rows join the (global) Sinkhorn batch
                loss = category_loss(si, st, image_queue_scores=queue[0] @ protos_n.T,
                                     text_queue_scores=queue[1] @ protos_n.T)
        loss.backward()
        out.append(("mean", loss.detach().reshape(1)))
        out += [("mean", t.grad if t.grad is not None else torch.zeros_like(t)) for t in p + [scale]]
    return out


def _dist_worker(rank, world, port, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    xi, xt, wi, wt, ema_i, ema_t, protos, cats, queue = _dist_inputs()
    n, nq = xi.shape[0] // world, queue.shape[1] // world
    sl = slice(rank * n, (rank + 1) * n)
    result = []
    for how, t in _dist_losses(xi[sl], xt[sl], wi, wt, ema_i, ema_t, protos, cats[sl],
                               queue[:, rank * nq:(rank + 1) * nq]):
        if how == "rows":
            parts = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(parts, t.contiguous())
            t = torch.cat(parts)
        elif how == "mean":
            dist.all_reduce(t)
            t = t / world
        result.append(t)
    if rank == 0:
        q.put([t.numpy() for t in result])
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_equal_one_rank_for_every_cross_rank_term():
    ref = [t for _, t in _dist_losses(*_dist_inputs())]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    mp.spawn(_dist_worker, args=(2, free_port(), q), nprocs=2, join=True)
    got = q.get(timeout=60)
    assert len(got) == len(ref)
    for i, (r, g) in enumerate(zip(ref, got)):
        assert torch.allclose(r.detach(), torch.from_numpy(g), rtol=1e-5, atol=1e-6), (i, r, g)


def test_feature_queue_is_fifo_keeps_no_skipped_batch_and_feeds_sinkhorn():
    from mlip_ds.model.prototypes import FeatureQueue
    q = FeatureQueue(size=5, dim=2)
    assert q.rows()[0].shape == (0, 2)
    batch = lambda v: torch.full((2, 2), float(v))  # noqa: E731
    for v in (1, 2, 3):
        q.push(batch(v), -batch(v))
    img, txt = q.rows()
    assert img[:, 0].tolist() == [3, 3, 2, 2, 1] and torch.equal(txt, -img)  # newest first, capped at 5
    q.push(batch(float("nan")), batch(4))  # a non-finite (skipped) batch leaves no trace
    assert q.rows()[0][:, 0].tolist() == [3, 3, 2, 2, 1]
    # The queued rows join the Sinkhorn batch; the batch's codes are the first rows of that.
    torch.manual_seed(0)
    s_img, s_txt, qi, qt = (torch.randn(n, 16) for n in (4, 4, 12, 12))
    with_queue = category_loss(s_img, s_txt, image_queue_scores=qi, text_queue_scores=qt)
    ci, ct = sinkhorn(torch.cat([s_img, qi]))[:4], sinkhorn(torch.cat([s_txt, qt]))[:4]
    assert torch.allclose(with_queue, swapped_prediction(s_img, s_txt, ci, ct))
    assert torch.allclose(category_loss(s_img, s_txt, image_queue_scores=qi[:0], text_queue_scores=qt[:0]),
                          category_loss(s_img, s_txt))
    # Why the queue: 4 samples over 16 prototypes must spread each code over >= 4 prototypes;
    # with 12 more rows in the batch the codes can be sharper.
    assert sinkhorn(torch.cat([s_img, qi]))[:4].max(1).values.mean() > sinkhorn(s_img).max(1).values.mean()
