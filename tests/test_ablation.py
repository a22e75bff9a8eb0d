"""The ablation runner (mlip_ds/ablation.py, tools/ablate.py): each variant switches on exactly its
terms through the real trainer's parser, every variant shares steps/seed/data, the table writer on
hand-made results, and one end-to-end run of tools/ablate.py (clip + mlip, 1 rank, a few steps) whose
rerun skips what is done."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, train_env

from mlip_ds.config import build_parser, config_from_args
from mlip_ds import ablation as ab
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
            assert "--local-dim" not in common  # the trainer's own head sizes (its recipe), for every variant
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


@pytest.mark.slow
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


# ---------------------------------------------------------------------------------------------
# the paired statistics and the per-task tables (--probe NAME=TRAIN,TEST)


def test_paired_se_is_the_std_of_the_differences_over_sqrt_n():
    d = [0.01, 0.03, 0.02, 0.04, 0.00]
    st = ab.paired_stats(d)
    mean = sum(d) / 5
    std = (sum((x - mean) ** 2 for x in d) / 4) ** 0.5  # ddof 1
    assert st["n"] == 5 and st["mean"] == pytest.approx(0.02) and st["std"] == pytest.approx(std)
    assert st["se"] == pytest.approx(std / 5 ** 0.5) and st["se"] == pytest.approx(0.0070711, abs=1e-6)
    assert st["beyond_2se"] is True                       # 0.02 > 2 x 0.00707
    st = ab.paired_stats([0.01, -0.01, 0.02, -0.015])      # mean 0.00125, se 0.0081
    assert st["beyond_2se"] is False
    assert ab.paired_stats([0.05]) == {"mean": 0.05, "std": 0.0, "n": 1, "se": None, "beyond_2se": None}
    assert ab.paired_stats([None, None])["se"] is None
    # pairing removes what both encoders share: a seed-to-seed swing of 0.1 common to both leaves se 0
    assert ab.paired_stats([0.7 - 0.6, 0.8 - 0.7, 0.6 - 0.5])["se"] == pytest.approx(0.0, abs=1e-12)


def _task_run(seed, tasks):
    """A hand-made run with per-task probe means; 100% repeats seed 0's fit for the other seeds."""
    probes, reused = {}, {}
    for t, (low, full) in tasks.items():
        probes[t] = {"0.01": dict(enumerate(low)), "1": {k: full for k in range(len(low))}}
        reused[t] = {"0.01": [], "1": list(range(1, len(low)))}
    first = next(iter(tasks))
    return {"seed": seed, "steps": 10, "samples_per_s": 50.0, "final_losses": {"global": 2.0, "total": 2.0},
            "train_wall_s": 12.0, "probe": probes[first], "probes": probes, "probe_reused": reused}


def test_per_task_summary_pairs_by_seed_and_counts_the_full_fit_once(tmp_path):
    res = {"settings": {"steps": 10, "seeds": [0], "probe_seeds": [0, 1, 2, 3]}, "fractions": ["0.01", "1"],
           "tasks": {"pneumonia": {"train": "a", "test": "b"}, "bacteria_virus": {"train": "c", "test": "d"}},
           "variants": {
               "clip": {"terms": ["global"], "false_negatives": "off",
                        "runs": [_task_run(0, {"pneumonia": ([0.70, 0.80, 0.60, 0.75], 0.90),
                                               "bacteria_virus": ([0.55, 0.60, 0.50, 0.58], 0.65)})]},
               "mlip": {"terms": list(TERMS), "false_negatives": "drop",
                        "runs": [_task_run(0, {"pneumonia": ([0.72, 0.83, 0.61, 0.78], 0.92),
                                               "bacteria_virus": ([0.54, 0.61, 0.49, 0.58], 0.64)})]}},
           "random_init": {"probes": {"pneumonia": {"0.01": {0: 0.5, 1: 0.6, 2: 0.55, 3: 0.52}, "1": {0: 0.7}},
                                      "bacteria_virus": None},
                           "probe_reused": {"pneumonia": {"0.01": [], "1": []}}}}
    r = ab.summarize(res)
    pn = r["variants"]["mlip"]["summary"]["tasks"]["pneumonia"]
    d = pn["delta_vs_clip"]["0.01"]  # paired differences 0.02, 0.03, 0.01, 0.03
    assert d["n"] == 4 and d["mean"] == pytest.approx(0.0225)
    assert d["se"] == pytest.approx(0.0095743 / 2, abs=1e-6) and d["beyond_2se"] is True
    full = pn["delta_vs_clip"]["1"]  # one fit at 100% (the other seeds repeat it): one value, no SE
    assert full["n"] == 1 and full["mean"] == pytest.approx(0.02) and full["se"] is None
    assert pn["auc"]["1"] == {"mean": pytest.approx(0.92), "std": 0.0, "n": 1}
    bv = r["variants"]["mlip"]["summary"]["tasks"]["bacteria_virus"]["delta_vs_clip"]["0.01"]
    assert bv["mean"] == pytest.approx(-0.0025) and bv["beyond_2se"] is False
    # the first task is also the legacy summary (the old single-table keys keep their meaning)
    assert r["variants"]["mlip"]["summary"]["delta_vs_clip"]["0.01"]["mean"] == pytest.approx(0.0225)
    assert r["random_init"]["tasks"]["pneumonia"]["auc"]["0.01"]["mean"] == pytest.approx(0.5425)
    assert "bacteria_virus" not in r["random_init"]["tasks"]

    assert ab.task_mode(r)
    md = ab.format_task_tables(r)
    assert "## Training" in md and "## Probe task `pneumonia`" in md and "## Probe task `bacteria_virus`" in md
    pn_table = md.split("## Probe task `pneumonia`")[1].split("## Probe task")[0]
    assert ("| variant | AUC 1% | AUC 100% | Δ vs CLIP 1% (± SE) | Δ vs CLIP 100% (± SE) | Δ beyond 2 SE at |"
            in pn_table)
    mlip_row = next(x for x in pn_table.splitlines() if x.startswith("| **mlip** |"))
    assert "+0.022 ± 0.005 (n=4)" in mlip_row and "+0.020 (n=1, no SE)" in mlip_row and mlip_row.endswith("| 1% |")
    assert any(x.startswith("| random init (no training) | 0.542 ± 0.043 |") for x in pn_table.splitlines())
    bv_row = next(x for x in md.split("## Probe task `bacteria_virus`")[1].splitlines()
                  if x.startswith("| **mlip** |"))
    assert bv_row.endswith("| none |")
    assert ("| **mlip** | global, divergence, local, category, itm, swap (+fn) | 10 | g 2.00 / total 2.00 | 50.0 "
            "| 12 |") in md
    paths = ab.write_outputs(r, str(tmp_path))
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Probe tasks: pneumonia, bacteria_virus" in paths[1].read_text()
    back = json.loads(paths[0].read_text())  # probe seeds are strings after JSON: summarize gives the same
    assert ab.summarize(back)["variants"]["mlip"]["summary"]["tasks"] == r["variants"]["mlip"]["summary"]["tasks"]


@pytest.mark.parametrize("spec,msg", [("pn", "NAME=TRAIN,TEST"), ("pn=a", "NAME=TRAIN,TEST"),
                                      ("pn=a,b,c", "NAME=TRAIN,TEST"), ("p n=a,b", "letters, digits"),
                                      ("probe=a,b", "taken by --probe-train")])
def test_bad_probe_specs_are_refused(spec, msg):
    with pytest.raises(ab.AblationError, match=msg):
        ab.parse_probe_spec(spec)


def test_probe_flags_old_and_new(tmp_path, capsys):
    cli = _cli()
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "shard-000000.tar").write_bytes(b"")
    (shards / "manifest.json").write_text(json.dumps({"num_samples": 100}))
    data = tmp_path / "d"
    data.mkdir()
    base = ["--train-shards", str(shards), "--out", str(tmp_path / "o"), "--steps", "2"]
    old = cli.settings_from_args(cli.build_parser().parse_args(base + ["--probe-train", str(data), "--probe-test",
                                                                       str(data)]))
    assert [t.folder for t in ab.probe_tasks(old)] == ["probe"] and "probe_tasks" not in old.shared()
    assert old.shared()["probe_train"] == str(data)  # the old flags stay part of the resume check
    ab.check_settings(old)
    new = cli.settings_from_args(cli.build_parser().parse_args(
        base + ["--probe", f"pn={data},{data}", "--probe", f"bv={data},{data}"]))
    assert [(t.name, t.folder) for t in ab.probe_tasks(new)] == [("pn", "probe_pn"), ("bv", "probe_bv")]
    assert "probe_tasks" not in new.shared()  # tasks may be added to an existing --out
    ab.check_settings(new)
    cmd = ab.probe_command(new, "clip=x", tmp_path / "p", ab.probe_tasks(new)[1])
    assert cmd[cmd.index("--train-data") + 1] == str(data) and cmd[cmd.index("--out") + 1] == str(tmp_path / "p")
    assert cli.main(base) == 2 and "no probe data" in capsys.readouterr().err
    assert cli.main(base + ["--probe", f"pn={data},{tmp_path / 'nope'}"]) == 2
    assert f"--probe pn (test) {tmp_path / 'nope'}: not found" in capsys.readouterr().err
    assert cli.main(base + ["--probe", f"pn={data},{data}", "--probe", f"pn={data},{data}"]) == 2
    assert "used twice" in capsys.readouterr().err
    assert cli.main(base + ["--probe-train", str(data)]) == 2 and "go together" in capsys.readouterr().err


def _fake_probe_json(out: Path, fractions, seeds, auc, train="", test=""):
    rows = []
    for f in fractions:
        for s in seeds:
            row = {"fraction": f, "seed": s, "label": "POS", "metric": auc(f, s)}
            if f >= 1.0 and s != seeds[0]:
                row.update(metric=auc(f, seeds[0]), reused_from_seed=seeds[0])
            rows.append(row)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps({"fractions": fractions, "seeds": seeds, "train_data": train,
                                                "test_data": test, "encoders": {
        "e": {"label_names": ["POS"], "per_seed": rows}}}))


def test_runner_probes_every_task_for_every_encoder(tmp_path, monkeypatch):
    """run_all with the trainer and the probe replaced by stubs that write their outputs: every (variant,
    seed) and the random-init encoder are probed once per task, into probe_<task>/, and a rerun skips them."""
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "shard-000000.tar").write_bytes(b"")
    (shards / "manifest.json").write_text(json.dumps({"num_samples": 64}))
    calls = []

    def fake_run(cmd, log_path, what):
        calls.append(what)
        if "-m" in cmd and "mlip_ds.eval.linear_probe" in cmd:
            out = Path(cmd[cmd.index("--out") + 1])
            enc = cmd[cmd.index("--encoder") + 1]
            task_bonus = 0.1 if "bv_train" in cmd[cmd.index("--train-data") + 1] else 0.0
            lift = {"clip": 0.0, "mlip": 0.02}.get(enc.split("=")[0], -0.2)
            _fake_probe_json(out, [0.01, 1.0], [0, 1, 2], lambda f, s: 0.6 + task_bonus + lift + 0.01 * s + 0.1 * f,
                             cmd[cmd.index("--train-data") + 1], cmd[cmd.index("--test-data") + 1])
        else:
            d = Path(cmd[cmd.index("--out-dir") + 1])
            (d / "export").mkdir(parents=True, exist_ok=True)
            (d / "export" / "image_encoder.safetensors").write_bytes(b"x")
            (d / "summary.json").write_text(json.dumps({"step": 2}))
        return 1.0

    monkeypatch.setattr(ab, "_run_logged", fake_run)
    for name in ("pn_train", "pn_test", "bv_train", "bv_test"):
        (tmp_path / name).mkdir()
    s = ab.Settings(train_shards=str(shards), probe_train="", probe_test="", out=str(tmp_path / "o"), steps=2,
                    variants=("clip", "mlip"), ranks=1, batch_size=4, fractions=(0.01, 1.0), probe_seeds=(0, 1, 2),
                    probe_tasks=(("pn", str(tmp_path / "pn_train"), str(tmp_path / "pn_test")),
                                 ("bv", str(tmp_path / "bv_train"), str(tmp_path / "bv_test"))))
    r = ab.run_all(s, log=lambda m: None)
    assert sorted(calls) == sorted(["training of 'clip' seed 0", "training of 'mlip' seed 0",
                                    "linear probe 'pn' of 'clip' seed 0", "linear probe 'bv' of 'clip' seed 0",
                                    "linear probe 'pn' of 'mlip' seed 0", "linear probe 'bv' of 'mlip' seed 0",
                                    "linear probe 'pn' of the random-init encoder",
                                    "linear probe 'bv' of the random-init encoder"])
    for v in ("clip", "mlip", "random-init"):
        for t in ("pn", "bv"):
            p = json.loads((tmp_path / "o" / "runs" / v / ("seed0" if v != "random-init" else "") / f"probe_{t}" /
                            "probe.json").read_text())
            assert p["train_data"] == str(tmp_path / f"{t}_train")
    for t, base in (("pn", 0.6), ("bv", 0.7)):
        m = r["variants"]["mlip"]["summary"]["tasks"][t]
        assert m["auc"]["0.01"]["mean"] == pytest.approx(base + 0.02 + 0.01 + 0.001)
        assert m["delta_vs_clip"]["0.01"]["mean"] == pytest.approx(0.02) and m["delta_vs_clip"]["0.01"]["n"] == 3
        assert m["delta_vs_clip"]["1"]["n"] == 1  # the repeated 100% fits count once
        assert r["random_init"]["tasks"][t]["auc"]["0.01"]["mean"] == pytest.approx(base - 0.2 + 0.011)
    md = (tmp_path / "o" / "ablation.md").read_text()
    assert "## Probe task `pn`" in md and "## Probe task `bv`" in md
    calls.clear()
    ab.run_all(s, log=lambda m: None)
    assert calls == []  # everything was done: nothing trained or probed again
    # a third task added to the same --out: only it is probed; a task whose data changed is probed again
    (tmp_path / "x_train").mkdir()
    s.probe_tasks = s.probe_tasks[:1] + (("bv", str(tmp_path / "bv_train"), str(tmp_path / "pn_test")),
                                         ("x", str(tmp_path / "x_train"), str(tmp_path / "pn_test")))
    r = ab.run_all(s, log=lambda m: None)
    assert sorted(calls) == sorted(f"linear probe '{t}' of {e}" for t in ("bv", "x")
                                   for e in ("'clip' seed 0", "'mlip' seed 0", "the random-init encoder"))
    assert list(r["tasks"]) == ["pn", "bv", "x"] and "## Probe task `x`" in (tmp_path / "o" / "ablation.md").read_text()


# ---------------------------------------------------------------------------------------------
# tools/real_pairs.py: the real-image benchmark data


def _real_pairs():
    import importlib.util
    spec = importlib.util.spec_from_file_location("real_pairs_cli", ROOT / "tools" / "real_pairs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("sentence,status", [
    ("Right lower lobe pneumonia.", "positive"),
    ("Patchy opacity, may represent atelectasis or pneumonia.", "positive"),
    ("There is no focal air space opacity to suggest a pneumonia.", "negated"),
    ("No pneumonia, effusions, edema, pneumothorax.", "negated"),
    ("Emphysema without superimposed pneumonia.", "negated"),
    ("The lungs are clear without focal pneumonic consolidation.", "negated"),
    ("It would be difficult to completely exclude a superimposed pneumonia.", "negated"),
    ("Pneumonia seen on CT is not seen on this radiograph.", "negated"),
    ("No effusion, but right lower lobe pneumonia is present.", "positive"),
    ("Findings consistent with previous tuberculosis pneumonia.", "historical"),
    ("Please correlate clinically for pneumonia.", "recommendation"),
    ("Heart size is normal.", None),
    ("Status post pneumonectomy.", None),
])
def test_pneumonia_mention_rules(sentence, status):
    assert _real_pairs().mention_status(sentence) == status


def _fabricate(tmp_path, n_normal=4, n_bact=3, n_virus=2, n_test=2):
    from PIL import Image
    data = tmp_path / "data"
    k = data / "kermany_pneumonia_224"
    rows = []
    for split, counts in (("train", (n_normal, n_bact, n_virus)), ("test", (n_test, n_test, n_test))):
        for cls, typ, n in (("NORMAL", "", counts[0]), ("PNEUMONIA", "bacteria", counts[1]),
                            ("PNEUMONIA", "virus", counts[2])):
            for i in range(n):
                name = f"{split}_{typ or 'normal'}_{i}.jpeg"
                p = k / split / cls / name
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (24, 24), (40 * i % 255, 90, 30 if typ else 200)).save(p)
                rows.append(f"{split}/{cls}/{name},{split},{int(cls == 'PNEUMONIA')},{cls},{typ}")
    (k / "labels.csv").write_text("path,split,label,class_name,pneumonia_type\n" + "\n".join(rows) + "\n")
    reps = [
        {"uid": "N1", "findings": "The lungs are clear. No pneumonia.", "impression": "Normal chest.",
         "mesh_major": ["normal"]},
        {"uid": "N2", "findings": "Heart size normal. Lungs clear.", "impression": "No acute disease.",
         "mesh_major": ["normal"]},
        {"uid": "N3", "findings": "", "impression": "", "mesh_major": ["normal"]},            # no text
        {"uid": "P1", "findings": "Right lower lobe consolidation.", "impression": "Right lower lobe pneumonia.",
         "mesh_major": ["Pneumonia/lower lobe/right"]},
        {"uid": "P2", "findings": "Patchy left basilar opacity.", "impression": "May represent early pneumonia.",
         "mesh_major": ["Opacity/lung/base/left"]},
        {"uid": "X1", "findings": "No focal airspace opacity to suggest pneumonia.", "impression": "No acute findings.",
         "mesh_major": ["Granuloma"]},                                                        # negated
        {"uid": "X2", "findings": "Perihilar opacity.", "impression": "May represent viral pneumonia.",
         "mesh_major": ["Opacity"]},                                                          # names a type
    ]
    (data / "openi_reports").mkdir(parents=True)
    (data / "openi_reports" / "openi_reports.jsonl").write_text("\n".join(json.dumps(r) for r in reps) + "\n")
    return data


def test_real_pairs_builder_on_fabricated_data(tmp_path):
    rp = _real_pairs()
    data = _fabricate(tmp_path)
    out = tmp_path / "bench"
    s = rp.build(str(data), str(out), seed=0, image_size=16, fmt="png", samples_per_shard=4, log=lambda m: None)
    assert s["pools"] == {"normal": 2, "pneumonia": 2, "rejected_pneumonia_mentions": 1, "rejected_naming_a_type": 1}
    assert s["pairs"] == {"NORMAL": 4, "PNEUMONIA": 5, "total": 9}
    assert s["report_use"]["normal"] == {"reports_used": 2, "min_uses": 2, "max_uses": 2}
    assert s["report_use"]["pneumonia"] == {"reports_used": 2, "min_uses": 2, "max_uses": 3}
    import csv as _csv
    rows = list(_csv.DictReader(open(out / "pairs.csv", newline="")))
    assert list(rows[0]) == ["id", "image", "report", "class_name", "pneumonia_type", "report_uid"]
    assert all(r["image"].startswith("train/") for r in rows) and len(rows) == 9
    for r in rows:  # every image has a report of its own finding
        assert r["report_uid"] in ({"N1", "N2"} if r["class_name"] == "NORMAL" else {"P1", "P2"}), r
        assert r["report"].startswith("FINDINGS: ")
    assert not any("viral" in r["report"] for r in rows)
    # deterministic in the seed
    again = rp.build(str(data), str(tmp_path / "again"), seed=0, shards=False, log=lambda m: None)
    assert (tmp_path / "again" / "pairs.csv").read_text() == (out / "pairs.csv").read_text()
    assert again["pools"] == s["pools"]
    rp.build(str(data), str(tmp_path / "other"), seed=1, shards=False, log=lambda m: None)
    assert (tmp_path / "other" / "pairs.csv").read_text() != (out / "pairs.csv").read_text()
    # shards through tools/make_shards.py csv --link: entities for MLIP, meta kept
    man = json.loads((out / "shards" / "pretrain" / "manifest.json").read_text())
    assert man["num_samples"] == 9 and len(man["shards"]) == 3
    import tarfile
    docs = []
    for sh in sorted((out / "shards" / "pretrain").glob("*.tar")):
        with tarfile.open(sh) as tf:
            docs += [json.load(tf.extractfile(m)) for m in tf.getmembers() if m.name.endswith(".json")]
    assert len(docs) == 9 and all(d["entities"] for d in docs)
    assert {d["meta"]["class_name"] for d in docs} == {"NORMAL", "PNEUMONIA"}
    assert all(d["meta"]["labels_from"] == "linker" for d in docs)
    # probe trees: symlinks to the images
    tr = out / "probe"
    assert s["probe_trees"] == {"pneumonia": {"train": {"NORMAL": 4, "PNEUMONIA": 5}, "test": {"NORMAL": 2,
                                                                                              "PNEUMONIA": 4}},
                                "bacteria_virus": {"train": {"BACTERIA": 3, "VIRUS": 2},
                                                   "test": {"BACTERIA": 2, "VIRUS": 2}}}
    link = next((tr / "bacteria_virus" / "train" / "VIRUS").iterdir())
    assert link.is_symlink() and link.resolve() == (data / "kermany_pneumonia_224" / "train" / "PNEUMONIA" /
                                                    link.name).resolve()
    from mlip_ds.eval.datasets import FolderLabelledDataset
    ds = FolderLabelledDataset(str(tr / "bacteria_virus" / "test"))
    assert ds.label_names == ["VIRUS"] and len(ds) == 4
    assert FolderLabelledDataset(str(tr / "pneumonia" / "train")).label_names == ["PNEUMONIA"]
    # a second build into the same folder needs --overwrite
    with pytest.raises(rp.RealPairsError, match="--overwrite"):
        rp.build(str(data), str(out), shards=False, log=lambda m: None)


def test_real_pairs_names_the_missing_input(tmp_path, capsys):
    rp = _real_pairs()
    assert rp.main(["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"data folder not found: {tmp_path / 'nope'}" in err and "--data" in err
    data = _fabricate(tmp_path)
    (data / "openi_reports" / "openi_reports.jsonl").unlink()
    assert rp.main(["--data", str(data), "--out", str(tmp_path / "o")]) == 2
    assert f"input file not found: {data / 'openi_reports' / 'openi_reports.jsonl'}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.mark.skipif(not (SHARED_DATA / "openi_reports" / "openi_reports.jsonl").exists(),
                    reason=f"real Open-i reports not present at {SHARED_DATA} (see tools/real_pairs.py)")
def test_real_report_pools():
    rp = _real_pairs()
    pools = rp.build_pools(rp.read_reports(SHARED_DATA / "openi_reports" / "openi_reports.jsonl"))
    assert len(pools["normal"]) == 1363          # 1,391 MeSH "normal" reports, 28 of them without text
    assert len(pools["pneumonia"]) == 81
    assert set(pools["rejected_typed"]) == {"CXR991", "CXR3730", "CXR3815"}
    pn = {r["uid"] for r in pools["pneumonia"]}
    assert {"CXR268", "CXR2422", "CXR945"} <= pn                        # stated, bilateral, MeSH "Pneumonia"
    assert not pn & {"CXR8", "CXR136", "CXR2414", "CXR3103", "CXR1160"}  # negated, excluded, historical
    assert not pn & {r["uid"] for r in pools["normal"]}


@pytest.mark.skipif(not (SHARED_DATA / "kermany_pneumonia_224" / "labels.csv").exists(),
                    reason=f"Kermany images not present at {SHARED_DATA} (see tools/real_pairs.py)")
def test_real_pairs_csv_and_trees_from_the_shared_data(tmp_path):
    s = _real_pairs().build(str(SHARED_DATA), str(tmp_path / "b"), shards=False, log=lambda m: None)
    assert s["pairs"] == {"NORMAL": 1341, "PNEUMONIA": 3875, "total": 5216}
    assert s["probe_trees"]["bacteria_virus"] == {"train": {"BACTERIA": 2530, "VIRUS": 1345},
                                                  "test": {"BACTERIA": 242, "VIRUS": 148}}
    assert s["probe_trees"]["pneumonia"]["test"] == {"NORMAL": 234, "PNEUMONIA": 390}


def test_per_seed_table_shows_a_seed_that_loses_and_the_se_over_seeds():
    """Two pretraining seeds: MLIP wins seed 0 by 0.02 at every subsample and loses seed 1 by 0.01 at
    every subsample. The pooled Δ (8 pairs) is +0.005 with a small SE; per seed each Δ is beyond 2 SE
    (SE 0: the differences are constant), one up and one down; over seeds the mean is +0.005 with
    SE = std(0.02, -0.01) / sqrt(2) = 0.015, not significant."""
    def run(seed, low):
        return _task_run(seed, {"pneumonia": (low, 0.9)})
    clip0, clip1 = [0.70, 0.80, 0.60, 0.764], [0.72, 0.82, 0.63, 0.79]
    res = {"settings": {"steps": 10, "seeds": [0, 1], "probe_seeds": [0, 1, 2, 3]}, "fractions": ["0.01"],
           "tasks": {"pneumonia": {"train": "a", "test": "b"}},
           "variants": {"clip": {"terms": ["global"], "false_negatives": "off", "runs": [run(0, clip0), run(1, clip1)]},
                        "mlip": {"terms": list(TERMS), "false_negatives": "drop",
                                 "runs": [run(0, [x + 0.02 for x in clip0]), run(1, [x - 0.01 for x in clip1])]}},
           "random_init": None}
    ts = ab.summarize(res)["variants"]["mlip"]["summary"]["tasks"]["pneumonia"]
    assert ts["delta_vs_clip"]["0.01"]["mean"] == pytest.approx(0.005) and ts["delta_vs_clip"]["0.01"]["n"] == 8
    s0, s1 = ts["per_seed"]["0.01"]
    assert (s0["seed"], s1["seed"]) == (0, 1)
    assert s0["mean"] == pytest.approx(0.02) and s0["clip_auc"] == pytest.approx(0.716)
    assert s0["auc"] == pytest.approx(0.736) and s0["se"] == pytest.approx(0.0, abs=1e-9)
    assert s1["mean"] == pytest.approx(-0.01)
    over = ts["over_seeds"]["0.01"]
    assert over["n"] == 2 and over["mean"] == pytest.approx(0.005)
    assert over["se"] == pytest.approx((0.015 ** 2 * 2) ** 0.5 / 2 ** 0.5) and over["beyond_2se"] is False
    assert "per_seed" not in res["variants"]["clip"]["summary"]["tasks"]["pneumonia"]
    md = ab.format_task_tables(res)
    rows = [x for x in md.splitlines() if x.startswith("| **mlip** |")]
    assert "| **mlip** | 0 | 0.716 | 0.736 | +0.020 ± 0.000 **✓** |" in rows
    assert "| **mlip** | 1 | 0.740 | 0.730 | -0.010 ± 0.000 ✗ |" in rows
    assert "| **mlip** | mean of 2 (± SE over seeds) | 0.728 | 0.733 | +0.005 ± 0.015 |" in rows
    res["settings"]["seeds"] = [0]   # one seed: no per-seed table
    assert ab.format_seed_table(res, "pneumonia") == ""
