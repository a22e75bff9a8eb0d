"""The ablation runner (mlip_ds/eval/ablation.py, tools/ablate.py): each variant switches on exactly its
terms through the real trainer's parser, every variant shares steps/seed/data, the table writer on
hand-made results, and one end-to-end run of tools/ablate.py (clip + mlip, 1 rank, a few steps) whose
rerun skips what is done."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT, train_env

from mlip_ds.config import build_parser, config_from_args
from mlip_ds.eval import ablation as ab
from mlip_ds.losses.objective import TERMS


def _objective(flags):
    args, _ = build_parser().parse_known_args(flags)
    return config_from_args(args).objective


@pytest.mark.parametrize("variant,on,fn", [
    ("clip", {"global"}, "off"),
    ("+divergence", {"global", "divergence"}, "off"),
    ("+local", {"global", "local"}, "off"),
    ("+category", {"global", "category"}, "off"),
    ("+itm", {"global", "itm"}, "off"),
    ("+swap", {"global", "swap"}, "off"),
    ("mlip", set(TERMS), "drop"),
    ("+fn", {"global"}, "drop"),
    ("+local+itm", {"global", "local", "itm"}, "off"),
    ("mlip-swap", set(TERMS) - {"swap"}, "drop"),
    ("mlip-fn", set(TERMS), "off"),
])
def test_each_variant_turns_on_exactly_its_terms_in_the_trainer(variant, on, fn):
    v = ab.parse_variant(variant)
    assert set(v.terms) == on and v.false_negatives == fn
    o = _objective(ab.variant_train_args(variant))  # what train.py's own parser makes of the flags
    assert {t for t in TERMS if o.enabled(t)} == on
    assert o.false_negatives == fn
    assert all(o.weight(t) == 1.0 for t in TERMS)


def test_variants_share_steps_seed_data_and_heads(tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "manifest.json").write_text(json.dumps({"num_samples": 1000}))
    s = ab.Settings(train_shards=str(tmp_path / "shards"), probe_train="p", probe_test="q", out=str(tmp_path / "o"),
                    steps=70, seeds=(0, 1), ranks=2, batch_size=8)
    assert ab.schedule(s) == {"samples_per_epoch": 1000, "steps_per_epoch": 62, "epochs": 2, "global_batch": 16}
    for seed in s.seeds:
        shared = None
        for v in ab.DEFAULT_VARIANTS:
            args = ab.train_args(s, v, seed)
            variant_flags = ab.variant_train_args(v)
            i = args.index("--out-dir")
            assert args[i + 1] == str(ab.run_dir(s, v, seed))
            rest = args[:i] + args[i + 2:]
            assert rest[-len(variant_flags) - 2:] == variant_flags + ["--resume", "latest"]
            common = rest[:-len(variant_flags) - 2]
            assert common[common.index("--max-steps") + 1] == "70" and common[common.index("--seed") + 1] == str(seed)
            assert "--local-dim" in common  # tiny heads for the tiny model, for every variant alike
            shared = shared or common
            assert common == shared, v
    assert len({ab.run_dir(s, v, 0) for v in ab.DEFAULT_VARIANTS}) == len(ab.DEFAULT_VARIANTS)


@pytest.mark.parametrize("bad", ["bert", "+foo", "+", "mlip-global-divergence-local-category-itm-swap"])
def test_unknown_or_empty_variants_are_refused(bad):
    with pytest.raises(ab.AblationError):
        ab.parse_variant(bad)


def _hand_made():
    def run(seed, aucs, sps, losses):
        return {"seed": seed, "steps": 10, "samples_per_s": sps, "final_losses": losses,
                "probe": {"0.01": dict(enumerate(aucs[0])), "0.1": dict(enumerate(aucs[1]))}}
    return {"settings": {"steps": 10, "seeds": [0], "probe_seeds": [0, 1]}, "fractions": ["0.01", "0.1"],
            "variants": {
                "clip": {"terms": ["global"], "false_negatives": "off",
                         "runs": [run(0, ([0.60, 0.64], [0.70, 0.72]), 100.0, {"global": 2.5, "total": 2.5})]},
                "+itm": {"terms": ["global", "itm"], "false_negatives": "off",
                         "runs": [run(0, ([0.62, 0.67], [0.69, 0.72]), 80.0,
                                      {"global": 2.4, "itm": 0.6, "total": 3.0})]},
                "mlip": {"terms": list(TERMS), "false_negatives": "drop",
                         "runs": [run(0, ([0.50, None], [0.75, 0.77]), 40.0, {"total": 9.0, "global": 2.0})]}},
            "random_init": {"probe": {"0.01": {0: 0.5, 1: 0.52}, "0.1": {0: 0.55, 1: 0.57}}}}


def test_table_writer_on_hand_made_results(tmp_path):
    r = ab.summarize(_hand_made())
    itm = r["variants"]["+itm"]["summary"]
    assert itm["auc"]["0.01"]["mean"] == pytest.approx(0.645) and itm["auc"]["0.01"]["n"] == 2
    d = itm["delta_vs_clip"]["0.01"]  # paired: (0.02, 0.03)
    assert d["mean"] == pytest.approx(0.025) and d["std"] == pytest.approx(0.00707107, abs=1e-6)
    assert r["variants"]["mlip"]["summary"]["delta_vs_clip"]["0.01"]["n"] == 1  # the None seed is left out
    md = ab.format_table(r)
    lines = md.splitlines()
    assert lines[0].startswith("| variant | terms on | steps | final losses | train samples/s | AUC 1% | AUC 10% |"
                               " Δ vs CLIP 1% | Δ vs CLIP 10% |")
    itm_row = next(x for x in lines if x.startswith("| +itm |"))
    assert "global, itm" in itm_row and "g 2.40 / itm 0.60 / total 3.00" in itm_row and "| 80.0 |" in itm_row
    assert "0.645 ± 0.035" in itm_row and "+0.025 ± 0.007" in itm_row and "-0.005 ± 0.007" in itm_row
    mlip_row = next(x for x in lines if x.startswith("| **mlip** |"))
    assert "(+fn)" in mlip_row and "g 2.00 / total 9.00" in mlip_row and "0.500 ± 0.000" in mlip_row
    clip_row = next(x for x in lines if x.startswith("| **clip** |"))
    assert clip_row.count("—") == 2
    assert any(x.startswith("| random init (no training) |") and "0.510 ± 0.014" in x for x in lines)
    paths = ab.write_outputs(r, str(tmp_path))
    assert [p.name for p in paths] == ["ablation.json", "ablation.md", "ablation.png"]
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[2].stat().st_size > 5000
    assert json.loads(paths[0].read_text())["variants"]["+itm"]["summary"]["auc"]["0.1"]["mean"] == \
        pytest.approx(0.705)


def _ablate(args, timeout=240):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "ablate.py")] + [str(a) for a in args], cwd=ROOT,
                          env=train_env(), capture_output=True, text=True, timeout=timeout)


def _cli():
    import importlib.util
    spec = importlib.util.spec_from_file_location("ablate_cli", ROOT / "tools" / "ablate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_missing_shards_and_bad_flags_fail_clearly_before_training(tmp_path, capsys):
    main = _cli().main
    base = ["--probe-train", str(tmp_path), "--probe-test", str(tmp_path), "--out", str(tmp_path / "o"), "--steps", "2"]
    assert main(["--train-shards", str(tmp_path / "nope")] + base) == 2
    err = capsys.readouterr().err
    assert "--train-shards" in err and "not found" in err and "make_shards" in err
    assert main(["--train-shards", str(tmp_path)] + base) == 2
    assert "no *.tar shards" in capsys.readouterr().err
    assert main(["--train-shards", str(tmp_path / "nope")] + base + ["--variants", "clip,+bogus"]) == 2
    assert "unknown term(s) ['bogus']" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_end_to_end_two_variants_then_a_rerun_skips_what_is_done(synthetic_shards, tmp_path):
    out = tmp_path / "abl"
    args = ["--train-shards", synthetic_shards["train"], "--probe-train", synthetic_shards["train"],
            "--probe-test", synthetic_shards["test"], "--out", out, "--steps", 3, "--variants", "clip,mlip",
            "--ranks", 1, "--batch-size", 4, "--samples-per-epoch", 48, "--warmup-steps", 1, "--log-every", 1,
            "--save-every", 2, "--fractions", "0.5", "--probe-seeds", "0", "--no-random-baseline"]
    r = _ablate(args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "1/2 variant 'clip' seed 0" in r.stdout and "2/2 variant 'mlip' seed 0" in r.stdout
    for name in ("ablation.json", "ablation.md", "ablation.png"):
        assert (out / name).stat().st_size > 0
    res = json.loads((out / "ablation.json").read_text())
    for v, terms in (("clip", ["global"]), ("mlip", list(TERMS))):
        run = res["variants"][v]["runs"][0]
        assert res["variants"][v]["terms"] == terms and run["steps"] == 3
        assert set(run["final_losses"]) == set(terms) | {"total"}
        assert run["samples_per_s"] > 0 and 0.0 < run["probe"]["0.5"]["0"] <= 1.0
        cfg = json.loads((out / "runs" / v / "seed0" / "train_config.json").read_text())["cfg"]
        assert cfg["run"]["max_steps"] == 3 and cfg["run"]["seed"] == 0
    assert "| **mlip** |" in (out / "ablation.md").read_text() and "Δ vs CLIP 50%" in r.stdout

    r2 = _ablate(args)  # the rerun after everything is done: nothing is trained or probed again
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    assert r2.stdout.count("training: done already") == 2 and "trained in" not in r2.stdout
    assert r2.stdout.count("probe: done already") == 2 and "probed in" not in r2.stdout
    assert json.loads((out / "ablation.json").read_text())["variants"] == res["variants"]

    s = _cli().settings_from_args(_cli().build_parser().parse_args([str(a) for a in args] + ["--lr", "0.01"]))
    with pytest.raises(ab.AblationError, match=r"other settings \(lr\)"):
        ab.run_one(s, "clip", 0, log=lambda m: None)  # the same --out with other settings is refused
