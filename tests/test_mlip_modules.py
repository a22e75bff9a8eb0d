"""The MLIP modules: EMA copies and schedule, knowledge encoder, TKP attention, prototypes, Tucker fusion."""
import math

import pytest
import torch
from torch import nn

from mlip_ds.losses.local_alignment import local_alignment_loss
from mlip_ds.model.divergence import ema_update, make_ema_copy, momentum_schedule
from mlip_ds.model.heads import ITMHead, SwapHead
from mlip_ds.model.knowledge_encoder import KnowledgeEncoder, pad_mentions
from mlip_ds.model.prototypes import Prototypes
from mlip_ds.model.tkp_attention import TKPAttention
from mlip_ds.model.tucker import TuckerFusion


# ----------------------------------------------------------------------------- EMA
def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))


def test_ema_update_equals_the_formula_and_carries_no_gradient():
    online = _net()
    ema = make_ema_copy(online)
    assert all(not p.requires_grad for p in ema.parameters())
    assert all(p.requires_grad for p in online.parameters())
    online(torch.randn(8, 4)).sum().backward()  # changes BN running stats, gives online grads
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    m = 0.9
    ema_update(ema, online, m)
    online_state = online.state_dict()
    for name, p in ema.named_parameters():
        assert torch.allclose(p, m * before[name] + (1 - m) * online_state[name])
        assert p.grad is None and p.grad_fn is None and not p.requires_grad
    for name, b in ema.named_buffers():
        assert torch.equal(b, online_state[name])
    # The EMA view gives features without a graph: nothing flows back to either network.
    out = ema(torch.randn(8, 4))
    assert not out.requires_grad
    # m = 1 keeps the copy, m = 0 copies the online weights.
    frozen = {k: v.clone() for k, v in ema.named_parameters()}
    ema_update(ema, online, 1.0)
    assert all(torch.equal(p, frozen[k]) for k, p in ema.named_parameters())
    ema_update(ema, online, 0.0)
    assert all(torch.equal(p, online_state[k]) for k, p in ema.named_parameters())
    with pytest.raises(ValueError):
        ema_update(ema, online, 1.5)


def test_momentum_schedule_endpoints_and_monotone_cosine_rise():
    assert momentum_schedule(0, 100) == pytest.approx(0.99)
    assert momentum_schedule(100, 100) == pytest.approx(0.999)
    assert momentum_schedule(50, 100) == pytest.approx((0.99 + 0.999) / 2)
    assert momentum_schedule(-5, 100) == pytest.approx(0.99) and momentum_schedule(500, 100) == pytest.approx(0.999)
    values = [momentum_schedule(s, 100) for s in range(101)]
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert momentum_schedule(25, 100, m0=0.0, m1=1.0) == pytest.approx(0.5 * (1 - math.cos(math.pi * 0.25)))


# ----------------------------------------------------------------------------- knowledge encoder
def test_knowledge_encoder_sums_definition_residual_and_absent():
    torch.manual_seed(0)
    enc = KnowledgeEncoder(num_concepts=5, dim=4)
    with torch.no_grad():
        enc.residual.weight.normal_()
    text = torch.randn(5, 4)
    ids = torch.tensor([[1, 3, 0], [2, 0, 0], [0, 0, 0]])
    neg = torch.tensor([[False, True, False], [True, False, False], [False, False, False]])
    mask = torch.tensor([[True, True, False], [True, False, False], [False, False, False]])
    out = enc(text, ids, neg, mask)
    e11 = text[1] + enc.residual.weight[1]
    e13 = text[3] + enc.residual.weight[3] + enc.absent
    assert torch.allclose(out.tokens[0, 0], e11) and torch.allclose(out.tokens[0, 1], e13)
    assert (out.tokens[0, 2] == 0).all() and (out.tokens[2] == 0).all()
    assert torch.allclose(out.pooled[0], (e11 + e13) / 2)
    assert torch.allclose(out.pooled[1], text[2] + enc.residual.weight[2] + enc.absent)
    assert torch.allclose(out.pooled[2], enc.no_knowledge)  # no concept: the learned vector
    # Only the batch's unique concepts encoded: text_rows index into them.
    rows = torch.tensor([[0, 1, 0], [2, 0, 0], [0, 0, 0]])
    out2 = enc(text[[1, 3, 2]], ids, neg, mask, text_rows=rows)
    assert torch.allclose(out2.tokens, out.tokens) and torch.allclose(out2.pooled, out.pooled)
    # Switches: without residual/absent it is the definitions' embedding.
    plain = KnowledgeEncoder(5, 4, use_residual=False, use_absent=False)(text, ids, neg, mask)
    assert torch.allclose(plain.tokens[0, 1], text[3])
    # A text tower of another width is mapped by a linear layer.
    assert KnowledgeEncoder(5, 4, text_dim=6)(torch.randn(5, 6), ids, neg, mask).pooled.shape == (3, 4)


def test_pad_mentions_from_schema_entities():
    index = {"C1": 0, "C2": 1}
    ents = [[{"cui": "C1", "negated": False}, {"cui": "C2", "negated": True}, {"cui": "C1", "negated": False},
             {"cui": "X", "negated": False}], []]
    ids, neg, mask = pad_mentions(ents, index)
    assert ids.tolist() == [[0, 1], [0, 0]] and neg.tolist() == [[False, True], [False, False]]
    assert mask.tolist() == [[True, True], [False, False]]


# ----------------------------------------------------------------------------- TKP attention
def _tkp_inputs(seed=0, b=3, t=6, p=5, m=3, dt=8, dk=6, dp=10):
    g = torch.Generator().manual_seed(seed)
    tokens, patches = torch.randn(b, t, dt, generator=g), torch.randn(b, p, dp, generator=g)
    knowledge = torch.randn(b, m, dk, generator=g)
    tmask = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1], [0, 1, 0, 0, 0, 0]], dtype=torch.bool)
    kmask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)  # sample 1: no knowledge
    return tokens, tmask, patches, knowledge, kmask


def test_tkp_attention_shapes_maps_and_padding_invariance():
    torch.manual_seed(0)
    tkp = TKPAttention(dim=8, heads=2, token_dim=8, knowledge_dim=6, patch_dim=10).eval()
    tokens, tmask, patches, knowledge, kmask = _tkp_inputs()
    out = tkp(tokens, tmask, patches, knowledge, kmask)
    assert out.tokens.shape == out.contexts.shape == (3, 6, 8) and out.attn.shape == (3, 6, 5)
    assert out.patch_contexts.shape == (3, 5, 8) and out.patch_attn.shape == (3, 5, 6)
    for t in (out.tokens, out.contexts, out.attn, out.patch_contexts, out.patch_attn):
        assert torch.isfinite(t).all()
    # Grounding maps: each real token's attention over patches is a distribution; padding is zero.
    assert torch.allclose(out.attn.sum(-1)[tmask], torch.ones(int(tmask.sum())), atol=1e-5)
    assert (out.attn[~tmask] == 0).all() and (out.contexts[~tmask] == 0).all()
    assert (out.patch_attn.masked_select(~tmask.unsqueeze(1)) == 0).all()
    # Changing padded tokens and absent knowledge slots changes nothing, loss included.
    noisy_tokens = tokens + (~tmask).unsqueeze(-1) * 50 * torch.randn_like(tokens)
    noisy_knowledge = knowledge + (~kmask).unsqueeze(-1) * 50 * torch.randn_like(knowledge)
    out2 = tkp(noisy_tokens, tmask, patches, noisy_knowledge, kmask)
    for a, b in zip((out.tokens, out.contexts, out.attn, out.patch_contexts, out.patch_attn),
                    (out2.tokens, out2.contexts, out2.attn, out2.patch_contexts, out2.patch_attn)):
        assert torch.allclose(a, b, atol=1e-5)
    loss = lambda o: local_alignment_loss(o.tokens, o.contexts, tmask, None, o.patches, o.patch_contexts)
    assert torch.allclose(loss(out), loss(out2), atol=1e-6)
    # Knowledge matters where present, and the ablation switch turns it off.
    other = tkp(tokens, tmask, patches, knowledge + 1.0, kmask)
    assert not torch.allclose(other.tokens[0][tmask[0]], out.tokens[0][tmask[0]])
    assert torch.allclose(other.tokens[1], out.tokens[1])  # sample 1 has no knowledge
    tkp.use_knowledge = False
    assert torch.allclose(tkp(tokens, tmask, patches, knowledge + 1.0, kmask).tokens,
                          tkp(tokens, tmask, patches, knowledge, kmask).tokens)


def test_tkp_gradients_do_not_reach_padding_and_sample_without_tokens_is_finite():
    torch.manual_seed(1)
    tkp = TKPAttention(dim=8, heads=2, token_dim=8, knowledge_dim=6, patch_dim=10)
    tokens, tmask, patches, knowledge, kmask = _tkp_inputs(seed=1)
    tmask[2] = False  # a report with no real token
    tokens.requires_grad_()
    out = tkp(tokens, tmask, patches, knowledge, kmask)
    loss = local_alignment_loss(out.tokens, out.contexts, tmask, None, out.patches, out.patch_contexts)
    assert torch.isfinite(loss)
    loss.backward()
    assert (tokens.grad[~tmask] == 0).all() and tokens.grad[tmask].abs().sum() > 0


# ----------------------------------------------------------------------------- prototypes
def test_prototypes_are_normalised_and_freezable():
    protos = Prototypes(dim=4, num_prototypes=6)
    assert torch.allclose(protos.weight.norm(dim=1), torch.ones(6))
    x = torch.randn(3, 4)
    scores = protos(x * 7.0)
    assert scores.shape == (3, 6) and scores.abs().max() <= 1 + 1e-6
    assert torch.allclose(scores, protos(x))  # cosine: the feature scale does not matter
    xg = x.clone().requires_grad_()
    protos.freeze(True)(xg).sum().backward()
    assert protos.weight.grad is None and xg.grad is not None  # features still learn
    protos.freeze(False)(x).sum().backward()
    assert protos.weight.grad is not None
    with torch.no_grad():
        protos.weight.mul_(3.0)
    protos.normalize_()
    assert torch.allclose(protos.weight.norm(dim=1), torch.ones(6))


def test_frozen_prototypes_deliver_no_gradient_under_compile():
    """DeepSpeed's ZeRO-2 hooks each parameter's gradient when the engine starts, before MGCA's
    first-epoch freeze. Compiled (AOTAutograd), a merely detached weight still had its hook called
    with no gradient, which DeepSpeed cannot reduce (``--compile`` with MLIP failed in step 1)."""
    protos, calls = Prototypes(dim=8, num_prototypes=4), []
    protos.weight.register_post_accumulate_grad_hook(lambda p: calls.append(p.grad))
    compiled = torch.compile(protos.freeze(True), backend="aot_eager")
    x = torch.randn(3, 8, requires_grad=True)
    compiled(x).sum().backward()
    assert calls == [] and protos.weight.grad is None and x.grad is not None
    compiled.freeze(False)
    compiled(x).sum().backward()
    assert len(calls) == 1 and calls[0].shape == (4, 8)


# ----------------------------------------------------------------------------- Tucker fusion
def test_tucker_fusion_equals_the_explicit_tensor_contraction():
    torch.manual_seed(0)
    fusion = TuckerFusion(5, 4, 3, ranks=(3, 2, 2), out_dim=4, activation=None, input_norm=False)
    v, t, k = torch.randn(2, 5), torch.randn(2, 4), torch.randn(2, 3)
    z = fusion(v, t, k)
    a, b, c = fusion.wv(v), fusion.wt(t), fusion.wk(k)
    core = fusion.core
    for n in range(2):  # loops over every index of z_o = sum_ijk core_ijko a_i b_j c_k
        for o in range(4):
            s = sum(core[i, j, l, o] * a[n, i] * b[n, j] * c[n, l]
                    for i in range(3) for j in range(2) for l in range(2))
            assert torch.allclose(z[n, o], s, atol=1e-5)
    # Mode products with tensordot: core x1 a x2 b x3 c.
    for n in range(2):
        r = torch.tensordot(a[n], core, dims=([0], [0]))
        r = torch.tensordot(b[n], r, dims=([0], [0]))
        r = torch.tensordot(c[n], r, dims=([0], [0]))
        assert torch.allclose(z[n], r, atol=1e-5)
    default = TuckerFusion(16, 16, 8)
    assert default.core.shape == (32, 32, 16, 256)
    assert default(torch.randn(3, 16), torch.randn(3, 16), torch.randn(3, 8)).shape == (3, 256)
    tanh = TuckerFusion(5, 4, 3, ranks=(3, 2, 2), out_dim=4)
    fa, fb, fc = tanh.factors(v, t, k)
    assert torch.allclose(fa, torch.tanh(tanh.wv(torch.nn.functional.layer_norm(v, (5,)))))
    assert torch.allclose(tanh(v, t, k), torch.einsum("bi,bj,bk,ijko->bo", fa, fb, fc, tanh.core))


def test_heads_give_two_logits():
    z = torch.randn(5, 16)
    assert ITMHead(16)(z).shape == (5, 2) and SwapHead(16, hidden=8)(z).shape == (5, 2)
