"""Objective, the one object the training loop asks about the objective: its loss is the weighed
terms, the prototypes are frozen during their window, a step moves the EMA towers and puts the
prototypes back on the sphere, a skipped micro-step leaves the co-occurrence prior as it was, and
the CLIP preset is the same object doing the plain CLIP step."""
import json
import os

import torch

from mlip_ds.config import KnowledgeConfig, objective_preset
from mlip_ds.losses.objective import TERMS, total_loss
from mlip_ds.model.divergence import momentum_schedule
from mlip_ds.model.mlip import MLIPModel
from mlip_ds.model.towers import build_model
from mlip_ds.objective import Objective
from mlip_ds.objective.terms import compute_terms
from test_mlip_model import SMALL as HEADS, setup  # noqa: F401  (setup: tiny config, tokenizer, KB vocabulary, a batch)

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # after_step imports DeepSpeed (its fp32 master copy)

SMALL = dict(HEADS, freeze_prototypes_steps=2, aux_start_steps=3, aux_warmup_steps=0)


def _objective(setup, preset, **overrides):
    cfg, tok, vocab, _ = setup
    o = objective_preset(preset, **SMALL, **overrides)
    torch.manual_seed(0)
    model = MLIPModel(build_model(cfg), o, len(vocab), len(vocab.categories), tok.tokenizer.all_special_ids).train()
    return Objective(o, model, tok, vocab, KnowledgeConfig()), model


def test_loss_is_the_weighed_active_terms_and_the_prototypes_freeze_in_their_window(setup):
    objective, model = _objective(setup, "mlip")
    inputs = objective.prepare_batch(setup[3], "cpu", seed=5)
    assert objective.active(0) == {"global"} and objective.active(3) == set(TERMS)  # aux_start_steps=3
    seen = []
    for step in (0, 1, 2, 3):
        objective.before_step(step)
        seen.append(model.prototypes.frozen)
        assert model.prototypes.weight.requires_grad == (not model.prototypes.frozen)
    assert seen == [True, True, False, False]  # freeze_prototypes_steps=2
    model.eval()  # no dropout: the two forwards below see the same outputs
    with torch.no_grad():
        out = model(**inputs, active=objective.active(3))
    counts = model.prior.counts.clone()
    loss, named = objective.loss(out, inputs, 3)
    model.prior.counts.copy_(counts)  # the reference updates the prior from the same start
    ref, ref_named = total_loss(compute_terms(out, inputs, objective.cfg, model.prior), objective.cfg, step=3)
    assert torch.equal(loss, ref) and named.keys() == ref_named.keys() == {f"loss/{t}" for t in TERMS + ("total",)}


def test_a_skipped_micro_step_leaves_the_prior_as_it_was(setup):
    objective, model = _objective(setup, "mlip")
    inputs = objective.prepare_batch(setup[3], "cpu", seed=5)
    prior = model.prior.counts
    for _ in range(2):  # a first step puts counts in the table
        loss, _ = objective.loss(model(**inputs, active=objective.active(5)), inputs, 5)
    before = prior.clone()
    loss, _ = objective.loss(model(**inputs, active=objective.active(5)), inputs, 5)
    updated = prior.clone()
    assert not torch.equal(updated, before)
    objective.discard()  # the host check skipped the step
    assert torch.equal(prior, before)
    prior.copy_(updated)
    objective.discard_if_non_finite(loss.detach())  # finite: kept
    assert torch.equal(prior, updated)
    objective.discard_if_non_finite(loss.detach() * float("nan"))  # non-finite: taken back, on the device
    assert torch.equal(prior, before)


def test_after_step_moves_the_ema_and_renormalises_unfrozen_prototypes(setup):
    objective, model = _objective(setup, "mlip")
    with torch.no_grad():
        for p in model.visual.parameters():
            p.add_(1.0)
        model.prototypes.weight.mul_(3.0)
    ema_before = model.ema_visual.conv1.weight.clone()
    objective.before_step(0)  # frozen: the prototypes stay as they are
    objective.after_step(1, 100)
    norms = model.prototypes.weight.norm(dim=-1)
    assert torch.allclose(norms, torch.full_like(norms, 3.0))
    m = momentum_schedule(1, 100, objective.cfg.ema_m0, objective.cfg.ema_m1)
    expected = m * ema_before + (1 - m) * model.visual.conv1.weight
    assert torch.allclose(model.ema_visual.conv1.weight, expected, atol=1e-6)
    objective.before_step(2)  # past the window: renormalised after the step
    objective.after_step(3, 100)
    norms = model.prototypes.weight.norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-6)


def test_clip_is_the_same_object_with_the_mlip_terms_off(setup, tmp_path):
    objective, model = _objective(setup, "clip")
    options = objective.loader_options()
    assert options == {"second_view": False, "raw": False, "batch_fn": None}  # the plain CLIP batches
    inputs = objective.prepare_batch(setup[3], "cpu", seed=5)
    assert set(inputs) == {"image", "text"}
    objective.before_step(0)
    loss, named = objective.loss(model(**inputs, active=objective.active(0)), inputs, 0)
    assert set(named) == {"loss/global", "loss/total"} and torch.isfinite(loss)
    objective.after_step(1, 10)
    objective.export(tmp_path)
    assert list(tmp_path.iterdir()) == []  # the two-tower export is all there is
    mlip, _ = _objective(setup, "mlip")
    assert mlip.loader_options()["batch_fn"] is mlip.preparer
    mlip.export(tmp_path)
    info = json.loads((tmp_path / "mlip.json").read_text())
    assert info["objective"]["num_prototypes"] == 16 and info["knowledge"] == KnowledgeConfig().__dict__
    assert (tmp_path / "mlip_state.safetensors").exists()


def test_check_objective_refuses_a_weight_that_would_be_ignored_and_a_head_without_a_vit():
    """Settings that would be silently ignored or cannot run end in one message naming the flag."""
    import pytest

    from mlip_ds.config import build_parser, config_from_args
    from mlip_ds.model.towers import load_model_config
    from mlip_ds.objective.checks import ObjectiveSetupError, check_objective

    def check(*flags, model="tiny"):
        cfg = config_from_args(build_parser().parse_args(["--objective", "mlip", "--kb", "", *flags]))
        return check_objective(cfg, load_model_config(model), [])

    with pytest.raises(ObjectiveSetupError, match="--false-negative-weight 0.25 .* --false-negatives soft"):
        check("--false-negatives", "soft", "--false-negative-weight", "0.25")
    with pytest.raises(ObjectiveSetupError, match="--image-head .* ResNet"):
        check("--image-head", "64", model="rn50")
    check("--false-negative-weight", "0.25", "--image-head", "64")  # drop and a ViT: fine
