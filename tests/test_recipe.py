"""The effective recipe: fractions of the run become steps, K follows the global batch, pretrained
towers get their own learning rate, and settings known to hurt are warned about."""
import torch

from mlip_ds import recipe
from mlip_ds.config import TrainConfig, build_parser, config_from_args
from mlip_ds.losses.objective import aux_scale


def _cfg(*argv):
    return config_from_args(build_parser().parse_args(["--objective", "mlip", *argv]))


def test_fractions_become_steps_and_explicit_steps_win():
    cfg = recipe.resolve(_cfg(), total_steps=1000, global_batch=64)
    o = cfg.objective
    assert (o.aux_start_steps, o.aux_warmup_steps, o.freeze_prototypes_steps) == (200, 100, 50)
    assert o.num_prototypes == 32
    # The same fractions scale with the run: a run 10x longer delays 10x longer.
    assert recipe.resolve(_cfg(), 10000, 64).objective.aux_start_steps == 2000
    o = recipe.resolve(_cfg("--aux-start-steps", "7", "--num-prototypes", "500"), 1000, 64).objective
    assert o.aux_start_steps == 7 and o.aux_warmup_steps == 100 and o.num_prototypes == 500
    assert aux_scale(o, 6) == 0.0 and aux_scale(o, 57) == 0.5 and aux_scale(o, 500) == 1.0


def test_prototypes_follow_the_global_batch():
    assert [recipe.num_prototypes(b) for b in (4, 64, 144, 512, 4096)] == [8, 32, 72, 256, 500]


def test_describe_and_warnings():
    cfg = recipe.resolve(_cfg(), 500, 64)
    text = "\n".join(recipe.describe(cfg, 500, 64))
    for part in ("global (false negatives: drop", "image-image", "K=32", "off for steps 0-99",
                 "steps 100-149", "lr 0.0005"):
        assert part in text, (part, text)
    assert recipe.warnings_for(cfg, 500, 64) == []  # the defaults are the recipe: nothing to warn about
    bad = recipe.resolve(_cfg("--aux-start", "0", "--num-prototypes", "500", "--freeze-prototypes", "1.0",
                              "--pretrained-text", "--lr-pretrained", "5e-4", "--intensity-jitter", "0.2"), 500, 64)
    warned = "\n".join(recipe.warnings_for(bad, 500, 64))
    for part in ("start at step 0", "500 prototypes for a global batch of 64", "frozen for the whole run",
                 "pretrained text tower at learning rate 0.0005", "--intensity-jitter 0.2: the image-image"):
        assert part in warned, (part, warned)
    assert recipe.warnings_for(recipe.resolve(_cfg("--objective", "clip"), 500, 64), 500, 64) == []


def test_pretrained_towers_get_their_own_learning_rate():
    from mlip_ds.train import param_groups
    model = torch.nn.Module()
    model.visual, model.text, model.fusion = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    groups = param_groups(model, 0.05, lr=1e-3, pretrained=("text.",), lr_pretrained=2e-5)
    by = {(g["lr"], g["weight_decay"]): sum(p.numel() for p in g["params"]) for g in groups}
    assert by == {(1e-3, 0.05): 18, (1e-3, 0.0): 6, (2e-5, 0.05): 9, (2e-5, 0.0): 3}
    plain = param_groups(model, 0.05)
    assert len(plain) == 2 and all("lr" not in g for g in plain)
    assert TrainConfig().optim.lr_pretrained == 2e-5
