"""MLIPModel: the CLIP baseline is the plain open_clip model, only the enabled parts are built and
run, output shapes for all terms and each subset, the grounding maps; the batch preparation
(knowledge linking, categories, swapping), the loader's extra keys, text augmentation, the flags."""
import random

import pytest
import torch
from PIL import Image

from mlip_ds.config import build_parser, config_from_args, objective_preset
from mlip_ds.data.pipeline import LoaderSpec, make_train_loader
from mlip_ds.data.text_augment import augment_report
from mlip_ds.data.transforms import train_transform
from mlip_ds.losses.divergence import divergence_loss
from mlip_ds.losses.objective import TERMS, total_loss
from mlip_ds.losses.swap import negation_words
from mlip_ds.model.concepts import ConceptVocab, load_concepts, unique_rows
from mlip_ds.model.knowledge_encoder import pad_mentions
from mlip_ds.model.mlip import MLIPModel, mlip_state
from mlip_ds.model.towers import build_model, build_tokenizer, load_model_config
from mlip_ds.objective.batch import BatchPreparer
from mlip_ds.objective.terms import compute_terms
from mlip_ds.sources.synthetic import generate_sample

from mlip_ds.bench.meta_step import to_meta, training_step

# Small heads: the tests are about wiring, not capacity.
SMALL = dict(local_dim=32, local_heads=2, num_prototypes=16, tucker_rank_v=4, tucker_rank_t=4, tucker_rank_k=2,
             tucker_out=16)
PARTS = {"divergence": ("ema_visual", "ema_text"), "local": ("tkp", "knowledge"), "category": ("prototypes", "prior"),
         "itm": ("itm_head", "fusion", "knowledge"), "swap": ("swap_head", "fusion", "knowledge")}
ALL_PARTS = {p for parts in PARTS.values() for p in parts}


@pytest.fixture(scope="module")
def setup():
    cfg = load_model_config("tiny")
    tok = build_tokenizer(cfg)
    vocab = load_concepts("", [])
    transform = train_transform(64, (0.5,) * 3, (0.25,) * 3)
    samples = [generate_sample(i, seed=1, size=64) for i in range(6)]
    images = [Image.fromarray(s.image) if not isinstance(s.image, Image.Image) else s.image for s in samples]
    torch.manual_seed(0)
    batch = {"image": torch.stack([transform(im) for im in images]),
             "text": tok([s.report for s in samples]),
             "image2": torch.stack([transform(im) for im in images]),
             "text2": tok([augment_report(s.report, random.Random(i)) for i, s in enumerate(samples)]),
             "report": [s.report for s in samples], "entities": [s.entities for s in samples],
             "labels": [s.labels for s in samples]}
    return cfg, tok, vocab, batch


def _model(setup, objective):
    cfg, tok, vocab, _ = setup
    torch.manual_seed(0)
    return MLIPModel(build_model(cfg), objective, len(vocab), len(vocab.categories), tok.tokenizer.all_special_ids)


def test_clip_preset_is_the_plain_open_clip_model(setup):
    cfg, tok, vocab, batch = setup
    torch.manual_seed(0)
    clip = build_model(cfg)
    reference = {k: v.clone() for k, v in clip.state_dict().items()}
    torch.manual_seed(0)
    model = MLIPModel(build_model(cfg), objective_preset("clip"))
    # Same parameters, same names, same order: checkpoints of the CLIP trainer load, and nothing else is built.
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in clip.named_parameters()]
    assert model.state_dict().keys() == reference.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.items())
    assert not any(hasattr(model, p) for p in ALL_PARTS)
    prep = BatchPreparer(objective_preset("clip"), tok)
    inputs = prep.prepare(batch, "cpu")
    assert set(inputs) == {"image", "text"}  # no knowledge work, no second view
    clip.eval(), model.eval()
    with torch.no_grad():
        img, txt, scale = clip(batch["image"], batch["text"])
        out = model(**inputs)
    assert torch.equal(out["image_features"], img) and torch.equal(out["text_features"], txt)
    assert torch.equal(out["logit_scale"], scale)
    assert set(out) == {"image_features", "text_features", "logit_scale"}


@pytest.mark.parametrize("terms", [("global",)] + [("global", t) for t in TERMS[1:]] + [TERMS])
def test_forward_shapes_and_only_enabled_parts_built(setup, terms):
    cfg, tok, vocab, batch = setup
    objective = objective_preset("clip", **SMALL, **{f"use_{t}": True for t in terms},
                                 false_negatives="drop" if len(terms) == len(TERMS) else "off")
    model = _model(setup, objective).train()
    built = {p for p in ALL_PARTS if hasattr(model, p)}
    wanted = {p for t in terms for p in PARTS.get(t, ())}
    assert built == wanted, (terms, built, wanted)
    prep = BatchPreparer(objective, tok, vocab)
    inputs = prep.prepare(batch, "cpu", seed=3)
    out = model(**inputs)
    b, e = batch["image"].shape[0], cfg["embed_dim"]
    assert out["image_features"].shape == out["text_features"].shape == (b, e)
    if "divergence" in terms:
        assert out["image_features_ema"].shape == (b, e) and not out["image_features_ema"].requires_grad
    if "local" in terms:
        t, p = batch["text"].shape[1] - 1, (64 // 8) ** 2
        assert out["text_tokens"].shape == (b, t, 64) and out["patch_tokens"].shape == (b, p, 64)
        assert out["token_patch_attn"] is None and out["token_mask"].shape == (b, t)  # training: not computed
    if "category" in terms:
        assert out["proto_image"].shape == out["proto_text"].shape == (b, SMALL["num_prototypes"])
    if "itm" in terms:
        assert out["itm_logits"].shape == (3 * b, 2) and out["itm_labels"].tolist() == [1] * b + [0] * 2 * b
    if "swap" in terms:
        assert out["swap_logits"].shape == (b, 2) and out["swap_labels"].shape == (b,)
    terms_out = compute_terms(out, inputs, objective, getattr(model, "prior", None))
    assert set(terms_out) == set(terms)
    loss, named = total_loss(terms_out, objective)
    assert all(torch.isfinite(v) for v in named.values())
    loss.backward()
    frozen_ok = {"ema_visual", "ema_text"}
    # The pooled knowledge (and its "no knowledge" vector) feeds the fusion only (ITM, swap).
    unused = set() if {"itm", "swap"} & set(terms) else {"knowledge.no_knowledge"}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert name.split(".")[0] in frozen_ok, name
        elif name not in unused:
            assert param.grad is not None, name  # every trainable part takes part in the loss


def test_grounding_maps_and_importance_weights(setup):
    cfg, tok, vocab, batch = setup
    objective = objective_preset("clip", use_local=True, **SMALL)
    model = _model(setup, objective).eval()
    with torch.no_grad():
        out = model(**BatchPreparer(objective, tok, vocab).prepare(batch, "cpu"))
    attn, mask = out["token_patch_attn"], out["token_mask"]
    assert torch.allclose(attn.sum(-1)[mask], torch.ones(int(mask.sum())), atol=1e-5)  # a map per real token
    assert (attn[~mask] == 0).all()
    # Token weights: the last layer's CLS attention, as the eager BERT attention computes it.
    bert = model.text.transformer
    impl = bert.config._attn_implementation
    bert.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            ref = bert(input_ids=batch["text"], attention_mask=(batch["text"] != 0).long(),
                       output_attentions=True).attentions[-1][:, :, 0, :].mean(1)[:, 1:]
    finally:
        bert.config._attn_implementation = impl
    assert torch.allclose(out["token_weights"], ref, atol=1e-5)
    # Patch weights: the ViT's last-block CLS attention over the patches.
    pw = out["patch_weights"]
    assert pw.shape == (batch["image"].shape[0], 64) and (pw >= 0).all() and (pw.sum(-1) <= 1 + 1e-5).all()
    # ... as nn.MultiheadAttention itself returns it when asked for weights (row 0, patches only).
    attn = model.visual.transformer.resblocks[-1].attn
    seen = {}
    handle = attn.register_forward_hook(lambda m, args, output: seen.update(x=args[0]))
    try:
        with torch.no_grad():
            model.visual(batch["image"])
        handle.remove()
        with torch.no_grad():
            ref = attn(seen["x"], seen["x"], seen["x"], need_weights=True, average_attn_weights=True)[1]
    finally:
        handle.remove()
    assert torch.allclose(pw, ref[:, 0, 1:], atol=1e-5)
    # Training mode leaves the grounding maps out unless asked for.
    model.train()
    with torch.no_grad():
        inputs = BatchPreparer(objective, tok, vocab).prepare(batch, "cpu")
        assert model(**inputs)["token_patch_attn"] is None
        asked = model(**inputs, return_attention=True)
    assert torch.allclose(asked["token_patch_attn"].sum(-1)[mask], torch.ones(int(mask.sum())), atol=1e-5)


def test_ema_step_and_mlip_state(setup):
    objective = objective_preset("mlip", **SMALL)
    model = _model(setup, objective)
    with torch.no_grad():
        for p in model.visual.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in model.ema_visual.state_dict().items()}
    m = model.ema_step(0, 100)
    assert m == pytest.approx(objective.ema_m0)
    name = "conv1.weight"
    expected = m * before[name] + (1 - m) * model.visual.state_dict()[name]
    assert torch.allclose(model.ema_visual.state_dict()[name], expected)
    state = mlip_state(model)
    assert any(k.startswith("ema_visual.") for k in state) and "prototypes.weight" in state
    assert not any(k.startswith(("visual.", "text.")) or k == "logit_scale" for k in state)


def test_batch_preparer_links_knowledge_and_swaps_reproducibly(setup):
    cfg, tok, vocab, batch = setup
    objective = objective_preset("mlip", **SMALL, swap_prob=1.0)
    prep = BatchPreparer(objective, tok, vocab)
    a, b = prep(dict(batch), seed=7), prep(dict(batch), seed=7)
    for key in ("mention_ids", "cats", "swap_tokens", "swap_labels", "concept_tokens"):
        assert torch.equal(a[key], b[key]), key
    assert a["itm_seed"] == b["itm_seed"]
    ids, neg, mask = pad_mentions(batch["entities"], vocab.index)
    assert torch.equal(a["mention_ids"], ids) and torch.equal(a["mention_neg"], neg)
    assert torch.equal(a["mention_mask"], mask)
    # The rows point at the right concepts, whose token ids are their "name: definition".
    concept_rows = vocab.tokens(tok, 32)
    picked = a["concept_tokens"][a["mention_rows"]][mask]
    full = concept_rows[ids[mask]][:, :picked.shape[1]]
    assert torch.equal(picked, full)
    # Swapped rows: the tokens the model reads changed, exactly where the label says so.
    labels, rows = a["swap_labels"], a["swap_rows"]
    assert labels.sum() == len(rows) > 0 and set(rows.tolist()) == set(labels.nonzero().flatten().tolist())
    for j, i in enumerate(rows.tolist()):
        assert not torch.equal(a["swap_tokens"][j], batch["text"][i])
    # Categories: non-negated findings, "no_finding" otherwise.
    cats = a["cats"]
    for i, ents in enumerate(batch["entities"]):
        names = {vocab.categories[c] for c in cats[i].nonzero().flatten().tolist()}
        affirmed = {e["name"] for e in ents if not e["negated"]}
        assert names == (affirmed or {"no_finding"}), (names, affirmed)
    other = prep(dict(batch), seed=8)
    assert not (torch.equal(other["swap_labels"], labels) and torch.equal(other["swap_tokens"], a["swap_tokens"])) \
        or other["itm_seed"] != a["itm_seed"]


def test_unique_rows_and_shard_vocabulary(synthetic_shards):
    ids = torch.tensor([[5, 3, 0], [3, 9, 9]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    concepts, rows = unique_rows((ids, mask))
    assert concepts.tolist() == [3, 5, 9]
    assert torch.equal(concepts[rows][mask], ids[mask]) and (rows[~mask] == 0).all()
    empty = unique_rows((ids, torch.zeros_like(mask)))
    assert empty[0].tolist() == [0]  # one row anyway: every rank runs the same modules
    vocab = load_concepts("shards", [str(p) for p in sorted(synthetic_shards["train"].glob("*.tar"))])
    assert vocab.source == "shards" and "C0032326" in vocab.index  # pneumothorax
    assert "pneumothorax" in vocab.categories and vocab.categories[-1] == "no_finding"
    with pytest.raises(ValueError, match="empty"):
        ConceptVocab([], [], [])


def test_loader_extras_leave_the_first_view_alone_and_replay_on_resume(synthetic_shards, setup):
    cfg, tok, vocab, _ = setup
    objective = objective_preset("mlip", **SMALL)
    common = dict(batch_size=4, batches_per_epoch=6, image_size=64, mean=(0.5,) * 3, std=(0.25,) * 3,
                  workers=2, shuffle_buffer=20, seed=3)
    plain = list(make_train_loader(LoaderSpec(str(synthetic_shards["train"]), **common), tok, epoch=1))
    spec = LoaderSpec(str(synthetic_shards["train"]), **common, second_view=True, raw=True,
                      batch_fn=BatchPreparer(objective, tok, vocab))
    full = list(make_train_loader(spec, tok, epoch=1))
    for a, b in zip(plain, full):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"]) and torch.equal(a["text"], b["text"])
        assert not torch.equal(b["image"], b["image2"]) and isinstance(b["report"][0], str)
        assert isinstance(b["entities"][0], list) and isinstance(b["labels"][0], dict)
    positions = [0, 0]
    for b in full[:3]:
        positions[int(b["stream"][-1])] = int(b["pos"][-1])
    spec.batches_per_epoch = 3
    rest = list(make_train_loader(spec, tok, epoch=1, start_batch=3, resume_positions=positions))
    for a, b in zip(rest, full[3:]):
        for key in ("image", "image2", "text2", "swap_tokens", "swap_labels", "cats", "mention_ids"):
            assert torch.equal(a[key], b[key]), key
        assert a["itm_seed"] == b["itm_seed"]


def test_text_augmentation_keeps_negations_and_sections():
    report = ("FINDINGS: No pleural effusion or pneumothorax. Possible small left basilar opacity. "
              "The heart is normal in size.\n\nIMPRESSION: 1. No acute process. 2. Possible mild atelectasis.")
    outs = {augment_report(report, random.Random(s), word_dropout=0.3) for s in range(20)}
    assert len(outs) > 5 and augment_report(report, random.Random(3)) == augment_report(report, random.Random(3))
    for out in outs:
        assert sorted(negation_words(out)) == sorted(negation_words(report))
        findings, impression = out.split("IMPRESSION:")
        assert findings.startswith("FINDINGS: ") and "\n\n" in findings
        assert "1. " in impression and "2. " in impression  # list markers stay with their sentence
    assert augment_report(report, random.Random(0), sentence_shuffle=False, word_dropout=0.0) == report


def test_objective_flags_and_presets():
    parse = lambda *argv: config_from_args(build_parser().parse_args(list(argv))).objective  # noqa: E731
    on = lambda o: [t for t in TERMS if o.enabled(t)]  # noqa: E731
    assert on(parse()) == ["global"] and parse().false_negatives == "off"  # the default: the CLIP baseline
    assert on(parse("--objective", "mlip")) == list(TERMS) and parse("--objective", "mlip").false_negatives == "drop"
    o = parse("--objective", "mlip", "--no-use-swap", "--lambda-local", "0.5", "--local-dim", "64")
    assert on(o) == [t for t in TERMS if t != "swap"] and o.lambda_local == 0.5 and o.local_dim == 64
    assert on(parse("--use-local")) == ["global", "local"]


class _CrossDevice(torch.utils._python_dispatch.TorchDispatchMode):
    """Records ops that, on CUDA, would copy host data to the device (a blocking copy, a sync):
    a CPU tensor of any size (0-dim included: a scalar read is free, but ``index_put_`` copies it)
    mixed into device ops, and any CPU -> device copy (``.to(device)`` of a tensor built on the
    host)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        out = func(*args, **(kwargs or {}))
        outs = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        if any(t.device.type == "cpu" for t in tensors) and any(t.is_meta for t in tensors + outs):
            self.ops.append(str(func))
        return out


class _HostValues(torch.overrides.TorchFunctionMode):
    """Records what the dispatch level cannot see on meta: a device tensor built from Python values
    (``torch.tensor(x, device=...)``: a host -> device copy on CUDA), and a Python scalar assigned
    through integer index tensors (``t[rows, cols] = 0``: on CUDA torch makes the scalar a CPU
    tensor and ``index_put_`` copies it to the device; with a bool mask, ``t[mask, 0] = True``, it
    becomes a ``masked_fill_`` of the host value instead, no copy)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor, torch.asarray) and kwargs.get("device") is not None \
                and torch.device(kwargs["device"]).type != "cpu" and not torch.is_tensor(args[0]):
            self.ops.append(f"torch.{func.__name__}(<host values>, device={kwargs['device']})")
        if func is torch.Tensor.__setitem__ and args[0].device.type != "cpu" and not torch.is_tensor(args[2]) \
                and any(torch.is_tensor(i) and i.dtype != torch.bool for i in torch.utils._pytree.tree_leaves(args[1])):
            self.ops.append("Tensor.__setitem__(<index tensors>, <Python scalar>)")
        return func(*args, **kwargs)


@pytest.mark.parametrize("preset", ["clip", "mlip"])
def test_training_step_never_waits_for_the_device(setup, preset):
    """The whole step on the meta device (meta tensors have no values): any read on the host
    (``.item()``, ``bool(t)``, ``nonzero``, the check transformers makes of a 2-D padding mask)
    raises, and any CPU tensor mixed into device ops is recorded. On CUDA each would be a device
    sync inside the step (issue 8)."""
    _, tok, vocab, batch = setup
    objective = objective_preset(preset, **SMALL)
    model = _model(setup, objective).train()
    model, inputs = to_meta(model, BatchPreparer(objective, tok, vocab).prepare(batch, "cpu", seed=3))
    with _CrossDevice() as mode, _HostValues() as values:
        loss, named = training_step(model, objective, inputs)  # with the EMA update after it
    assert loss.is_meta and mode.ops == [] and values.ops == []
    assert set(named) >= {f"loss/{t}" for t in TERMS} if preset == "mlip" else "loss/global" in named
    assert all(p.grad is not None for p in model.visual.parameters())  # the backward ran


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch's sync debug mode)")
def test_training_step_never_syncs_on_cuda(setup):
    """The whole MLIP step on CUDA as the trainer runs it with bf16 (bf16 weights, fp32 EMA towers
    under autocast): forward, every loss term, backward, EMA update, then gradient clipping and
    fused AdamW, under ``torch.cuda.set_sync_debug_mode("error")``: any host <-> device sync in it
    raises (issue 15). The first step is a warm-up (lazy initialisations sync once)."""
    _, tok, vocab, batch = setup
    objective = objective_preset("mlip", **SMALL)
    model = _model(setup, objective).cuda().train()
    for p in model.parameters():  # as DeepSpeed's bf16 casts: the parameters, not the buffers
        p.data = p.data.to(torch.bfloat16)
    model.ema_visual.float(), model.ema_text.float()
    inputs = BatchPreparer(objective, tok, vocab).prepare(batch, "cuda", seed=3)
    inputs = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)

    def step():
        loss, _ = training_step(model, objective, inputs)
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()

def test_swapped_reports_in_the_reports_forward_change_nothing(setup):
    """The swapped reports share the reports' text forward; encoded apart (another length: one
    more padding column, which the attention mask hides) every output is the same."""
    _, tok, vocab, batch = setup
    objective = objective_preset("mlip", **SMALL, swap_prob=0.5)
    model = _model(setup, objective).eval()  # no dropout: the two paths draw differently
    inputs = BatchPreparer(objective, tok, vocab).prepare(batch, "cpu", seed=3)
    assert inputs["swap_tokens"].shape[1] == inputs["text"].shape[1] and inputs["swap_rows"].numel() > 0
    padded = torch.nn.functional.pad(inputs["swap_tokens"], (0, 1), value=tok.tokenizer.pad_token_id)
    with torch.no_grad():
        merged = model(**inputs, return_attention=True)
        apart = model(**{**inputs, "swap_tokens": padded}, return_attention=True)
    for key in ("text_features", "text_tokens", "token_weights", "swap_logits", "itm_logits", "token_patch_attn"):
        assert torch.allclose(merged[key], apart[key], atol=1e-5), key


def test_relation_aware_knowledge_mixes_kb_neighbours(setup):
    """--knowledge-relations: the batch's concepts are encoded with their KB neighbours, and each
    concept's embedding is normalize((e_c + mean of its neighbours) / 2); without neighbours it is e_c."""
    from mlip_ds.model.mlip import relation_aware
    cfg, tok, vocab, batch = setup
    assert sum(bool(n) for n in vocab.neighbours) > 10  # the packaged KB has relations
    for i, nbs in enumerate(vocab.neighbours):  # undirected
        assert all(i in vocab.neighbours[j] for j in nbs)
    objective = objective_preset("mlip", **SMALL, knowledge_relations=True)
    plain = BatchPreparer(objective_preset("mlip", **SMALL), tok, vocab)(dict(batch), seed=3)
    rel = BatchPreparer(objective, tok, vocab)(dict(batch), seed=3)
    r = plain["concept_tokens"].shape[0]
    assert torch.equal(rel["concept_tokens"][:r, :plain["concept_tokens"].shape[1]], plain["concept_tokens"])
    adj = rel["concept_adj"]
    assert adj.shape[0] == rel["concept_tokens"].shape[0] > r  # neighbours appended
    has = adj.sum(1) > 0
    assert has.any() and torch.allclose(adj.sum(1)[has], torch.ones(int(has.sum())))
    e = torch.nn.functional.normalize(torch.randn(adj.shape[0], 8), dim=-1)
    out = relation_aware(e, adj)
    for c in range(adj.shape[0]):
        nbs = adj[c].nonzero().flatten()
        want = e[c] if len(nbs) == 0 else torch.nn.functional.normalize(0.5 * (e[c] + e[nbs].mean(0)), dim=0)
        assert torch.allclose(out[c], want, atol=1e-6)
    model = _model(setup, objective).train()
    outputs = model(**BatchPreparer(objective, tok, vocab).prepare(batch, "cpu", seed=3))
    loss, _ = total_loss(compute_terms(outputs, rel, objective, getattr(model, "prior", None)), objective)
    loss.backward()
    assert torch.isfinite(loss)


def test_inactive_terms_are_not_computed(setup):
    """``active`` leaves the delayed terms out of the forward: their parts get no gradient."""
    objective = objective_preset("mlip", **SMALL)
    model = _model(setup, objective).train()
    cfg, tok, vocab, batch = setup
    inputs = BatchPreparer(objective, tok, vocab).prepare(batch, "cpu", seed=1)
    out = model(**inputs, active=frozenset({"global"}))
    assert not {"image_features_ema", "knowledge", "tkp", "proto_image", "itm_logits", "swap_logits"} & set(out)
    terms = compute_terms(out, inputs, objective, active=frozenset({"global"}))
    assert set(terms) == {"global"}
    terms["global"].backward()
    for name in ("fusion", "itm_head", "swap_head", "tkp", "prototypes", "knowledge"):
        assert all(p.grad is None for p in getattr(model, name).parameters()), name


def test_divergence_false_negative_switch(setup):
    """--no-false-negatives-divergence: the divergence cross terms are plain InfoNCE (the global term
    keeps its rule); by default they take the global term's false-negative rule."""
    from mlip_ds.losses.divergence import divergence_loss
    objective = objective_preset("mlip", **SMALL)
    model = _model(setup, objective).train()
    cfg, tok, vocab, batch = setup
    inputs = BatchPreparer(objective, tok, vocab).prepare(batch, "cpu", seed=1)
    out = model(**inputs)
    args = (out["image_features"].float(), out["text_features"].float(), out["image_features_ema"].float(),
            out["text_features_ema"].float(), out["logit_scale"].float())
    ii = dict(image_image_scale=1.0 / objective.image_temperature)
    masked = divergence_loss(*args, cats=inputs["cats"], mode="drop", match="overlap", **ii)
    plain = divergence_loss(*args, **ii)
    assert not torch.allclose(masked, plain)  # the batch has same-category pairs
    on = compute_terms(out, inputs, objective)["divergence"]
    off = compute_terms(out, inputs, objective_preset("mlip", **SMALL, false_negatives_divergence=False))["divergence"]
    assert torch.allclose(on, masked) and torch.allclose(off, plain)


def test_image_head_takes_the_image_image_term_off_the_shared_embedding(setup):
    """--image-head: the image-image term scores a separate head's embeddings of the pooled features
    before the projection (online with gradient, EMA without); the head and its EMA copy follow
    ema_step, and the shared embedding gets no gradient from that term."""
    cfg, tok, vocab, batch = setup
    objective = objective_preset("clip", **SMALL, use_divergence=True, image_head=32)
    model = _model(setup, objective).train()
    inputs = BatchPreparer(objective, tok, vocab).prepare(batch, "cpu", seed=3)
    out = model(**inputs)
    b, e = batch["image"].shape[0], cfg["embed_dim"]
    assert out["image_ssl"].shape == out["image_ssl_ema"].shape == (b, e)
    assert out["image_ssl"].requires_grad and not out["image_ssl_ema"].requires_grad
    assert torch.allclose(out["image_ssl"].norm(dim=-1), torch.ones(b), atol=1e-5)
    assert not model._trunk_out  # nothing kept after the forward
    # The head sees the pooled features before the projection: the tower's pooled output times proj.
    with torch.no_grad():
        pooled_pre = model.visual._pool(model.visual.transformer(model.visual._embeds(inputs["image"])))[0]
        assert torch.allclose(pooled_pre @ model.visual.proj, model._encode(model.visual, inputs["image"])[0],
                              atol=1e-5)
        expected = torch.nn.functional.normalize(model.image_head(pooled_pre), dim=-1)
    assert torch.allclose(out["image_ssl"], expected, atol=1e-5)
    # The image-image term alone: gradient reaches the head and the trunk, never the projection.
    loss = divergence_loss(out["image_features"], out["text_features"], out["image_features_ema"],
                           out["text_features_ema"], out["logit_scale"], image_image_scale=10.0,
                           image_ssl=out["image_ssl"], image_ssl_div=out["image_ssl_ema"])
    plain = divergence_loss(out["image_features"], out["text_features"], out["image_features_ema"],
                            out["text_features_ema"], out["logit_scale"])
    params = [model.image_head[0].weight, model.visual.conv1.weight, model.visual.proj]
    with_term = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    without = torch.autograd.grad(plain, params, retain_graph=True, allow_unused=True)
    assert without[0] is None and with_term[0].abs().sum() > 0
    assert not torch.allclose(with_term[1], without[1])  # the trunk learns from the term
    assert torch.allclose(with_term[2], without[2], atol=1e-8)  # the projection does not
    with torch.no_grad():
        for p in model.image_head.parameters():
            p.add_(1.0)
    before = model.ema_image_head[0].weight.clone()
    m = model.ema_step(0, 100)
    assert torch.allclose(model.ema_image_head[0].weight, m * before + (1 - m) * model.image_head[0].weight)
