"""Evaluation suite: zero-shot prompts and scoring, retrieval recall, full fine-tuning, plots."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mlip_ds.eval import finetune as FT
from mlip_ds.eval import plots as PX
from mlip_ds.eval import retrieval as R
from mlip_ds.eval import zero_shot as ZS

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


def assert_png(path, min_side=50):
    path = Path(path)
    assert path.is_file(), path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert min(im.size) >= min_side


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """A real export of the tiny model (random weights, seeded)."""
    from mlip_ds.export import export_model
    from mlip_ds.model.towers import build_model, load_model_config

    torch.manual_seed(0)
    cfg = load_model_config("tiny")
    return str(export_model(build_model(cfg), cfg, str(tmp_path_factory.mktemp("export") / "export")))


@pytest.fixture(scope="module")
def class_folders(tmp_path_factory, synthetic_shards):
    """A NORMAL / PNEUMONIA class-per-folder tree made from synthetic shard images."""
    import webdataset as wds

    root = tmp_path_factory.mktemp("folders")
    counts = {"NORMAL": 0, "PNEUMONIA": 0}
    for s in wds.WebDataset(str(synthetic_shards["test"] / "shard-000000.tar"), shardshuffle=False, empty_check=False):
        labels = json.loads(s["json"])["labels"]
        cls = "PNEUMONIA" if labels.get("pneumonia") == 1 else "NORMAL" if labels.get("no_finding") == 1 else None
        if cls is None or counts[cls] >= 8:
            continue
        (root / cls).mkdir(exist_ok=True)
        (root / cls / f"{s['__key__']}.png").write_bytes(s["png"])
        counts[cls] += 1
    assert min(counts.values()) >= 3, counts
    return root


# ---------------------------------------------------------------------------------------------
# zero-shot: prompts from the knowledge base


def test_prompts_from_kb_names_aliases_and_negations():
    from mlip_ds.knowledge.kb import default_kb

    kb = default_kb()
    p = ZS.build_class_prompts("pneumothorax")
    concepts = kb.concepts_for_label("pneumothorax")
    assert p.kb_label == "pneumothorax" and p.names[0] == "pneumothorax" and not p.is_normal
    assert set(p.concept_ids) == {c.id for c in concepts}
    forms = {f.casefold() for c in concepts for f in c.surface_forms()}
    assert {n.casefold() for n in p.names} == forms  # every canonical name and alias, nothing else
    assert "PTX" in p.names
    assert "findings consistent with pneumothorax." in p.positive
    assert "no pneumothorax." in p.negative and "no evidence of PTX." in p.negative
    assert len(p.positive) == len(p.names) * len(ZS.DEFAULT_TEMPLATES)
    assert len(p.negative) == len(p.names) * len(ZS.DEFAULT_NEGATION_TEMPLATES)
    assert not any(x.startswith(("no ", "there is no", "negative")) for x in p.positive)

    # canonical names of every concept come before any alias
    concept_names = {c.name for c in concepts}
    assert set(p.names[:len(concepts)]) == concept_names

    only = ZS.build_class_prompts("pleural_effusion", max_names=2, include_aliases=False)
    assert only.names == ["pleural effusion", only.names[1]] and only.names[1] in {
        c.name for c in kb.concepts_for_label("pleural_effusion")}
    assert ZS.build_class_prompts("cardiomegaly", max_names=1, templates=("a {} b",),
                                  negation_templates=("not {}",)).positive == ["a cardiomegaly b"]

    # folder class names: NORMAL -> the KB's no-finding concept, no negation prompts
    normal = ZS.build_class_prompts("NORMAL")
    assert normal.is_normal and normal.kb_label == "no_finding" and normal.negative == []
    assert "no acute cardiopulmonary process." in normal.positive
    pneu = ZS.build_class_prompts("PNEUMONIA")
    assert pneu.kb_label == "pneumonia" and pneu.names[0] == "pneumonia" and "no pneumonia." in pneu.negative

    unknown = ZS.build_class_prompts("foo_bar")
    assert unknown.names == ["foo bar"] and unknown.note and "not in the knowledge base" in unknown.note
    with pytest.raises(ValueError, match="placeholder"):
        ZS.build_class_prompts("edema", templates=("no placeholder",))


# ---------------------------------------------------------------------------------------------
# zero-shot: scoring and metrics on known cases


def test_zero_shot_scores_known_answer():
    e = np.eye(4, dtype=np.float32)
    pos, neg = e[[0, 1]], e[[2, 3]]  # class 0: e0 vs "no" e2; class 1: e1 vs e3
    x = np.stack([e[0], e[3], (e[0] + e[1]) / np.sqrt(2)])
    s = 10.0
    sc = ZS.zero_shot_scores(x, pos, neg, "negation", logit_scale=s)
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    np.testing.assert_allclose(sc[0], [sig(s), 0.5], rtol=1e-6)
    np.testing.assert_allclose(sc[1], [0.5, sig(-s)], rtol=1e-6)
    np.testing.assert_allclose(sc[2], [sig(s / np.sqrt(2))] * 2, rtol=1e-6)
    sm = ZS.zero_shot_scores(x, pos, neg, "softmax", logit_scale=s)
    np.testing.assert_allclose(sm.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(sm[0, 0], 1 / (1 + np.exp(-s)), rtol=1e-6)
    single = ZS.zero_shot_scores(x, pos, neg, "negation", logit_scale=s, single_label=True)
    np.testing.assert_allclose(single.sum(1), 1.0, rtol=1e-6)
    assert single[0].argmax() == 0 and single[1].argmax() == 0  # "no class 1" pushes class 1 down
    with pytest.raises(ValueError):
        ZS.zero_shot_scores(x, pos, None, "negation")

    # the normal class is scored against the other classes' positive prompts
    assert np.allclose(ZS.prompt_set_embedding(np.stack([e[0], e[1]])), (e[0] + e[1]) / np.sqrt(2))


def test_auc_and_accuracy_hand_cases():
    scores = np.array([[0.1, 0.9], [0.4, 0.8], [0.35, 0.7], [0.8, 0.6]])
    labels = np.array([[0, 1], [0, 1], [1, 1], [1, np.nan]])
    auc, notes = ZS.auc_per_label(scores, labels, ["a", "b"])
    assert auc["a"] == pytest.approx(0.75) and auc["b"] is None and "b" in notes[0]
    r = ZS.evaluate_scores(np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]]), np.array([0, 1, 1, 1]),
                           ["N", "P"], "single", class_names=["N", "P"], positive_index=1)
    assert r["accuracy"] == pytest.approx(0.75) and r["majority_accuracy"] == pytest.approx(0.75)
    assert r["per_class_recall"] == {"N": 1.0, "P": pytest.approx(2 / 3)}
    assert r["auc"] == pytest.approx(1.0)


def test_zero_shot_cli_shards_end_to_end(tiny_export, synthetic_shards, tmp_path, capsys):
    out = tmp_path / "zs"
    rc = ZS.main(["--model", f"tiny={tiny_export}", "--model", f"rand=random:{tiny_export}",
                  "--data", str(synthetic_shards["test"]), "--out", str(out), "--max-names", "4",
                  "--no-progress"])
    assert rc == 0
    md = (out / "zero_shot.md").read_text()
    assert "| **mean** |" in md and "tiny with negation" in md and "rand without negation" in md
    payload = json.loads((out / "zero_shot.json").read_text())
    res = payload["models"]["tiny"]
    assert res["task"] == "multilabel" and res["n_samples"] == 96
    assert res["prompts"]["pneumothorax"]["names"][0] == "pneumothorax"
    z = np.load(out / "scores_tiny.npz")
    from sklearn.metrics import roc_auc_score
    for mode in ZS.MODES:
        s, lg = z[f"scores_{mode}"], z[f"logits_{mode}"]
        assert s.shape == lg.shape == (96, len(res["label_names"])) and s.min() >= 0 and s.max() <= 1
        for j, name in enumerate(res["label_names"]):
            got = res["results"][mode]["per_label"][name]
            y = z["labels"][:, j]
            if len(np.unique(y)) == 2:
                assert got == pytest.approx(roc_auc_score(y, lg[:, j]))
                assert roc_auc_score(y, s[:, j]) == pytest.approx(got, abs=0.02)  # same ranking up to rounding
            else:
                assert got is None
    assert_png(out / "roc_tiny.png")

    # the pipeline's scores equal the formula applied to embeddings computed directly with the model
    loaded = ZS.load_export(tiny_export)
    prompts = [ZS.build_class_prompts(n, max_names=4) for n in res["label_names"]]
    pos, neg = ZS.class_embeddings(loaded.model, loaded.tokenizer, prompts)
    from mlip_ds.eval.datasets import open_labelled_dataset
    ds = open_labelled_dataset(str(synthetic_shards["test"]), transform=ZS.eval_transform_for(loaded.preprocess))
    images = torch.stack([next(iter(ds))[0]])
    with torch.no_grad():
        x = torch.nn.functional.normalize(loaded.model.encode_image(images), dim=-1).numpy()
    direct = ZS.zero_shot_scores(x, pos, neg, "negation", loaded.logit_scale)
    np.testing.assert_allclose(direct[0], z["scores_negation"][0], atol=1e-5)
    # a saturating logit scale keeps the ranking: metrics come from the logits, never from rounded probabilities
    lg = ZS.zero_shot_logits(np.stack([x[0], -x[0]]), pos, neg, "negation", logit_scale=1e4)
    assert np.isfinite(lg).all() and (lg[0] != lg[1]).any()


def test_zero_shot_class_folders_accuracy(tiny_export, class_folders, tmp_path):
    out = tmp_path / "zsf"
    assert ZS.main(["--model", tiny_export, "--data", str(class_folders), "--out", str(out),
                    "--max-names", "3", "--no-progress"]) == 0
    res = next(iter(json.loads((out / "zero_shot.json").read_text())["models"].values()))
    assert res["task"] == "single_label" and res["class_names"] == ["NORMAL", "PNEUMONIA"]
    assert res["positive_class"] == "PNEUMONIA"
    assert "no pneumonia." in res["prompts"]["PNEUMONIA"]["negative"]
    assert res["prompts"]["NORMAL"]["negative"] == []
    for mode in ZS.MODES:
        r = res["results"][mode]
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["auc"] <= 1 and set(r["per_class_recall"]) == {"NORMAL", "PNEUMONIA"}
    assert "accuracy" in (out / "zero_shot.md").read_text()


def test_eval_clis_fail_clearly_on_missing_inputs(tiny_export, synthetic_shards, tmp_path, capsys):
    missing = str(tmp_path / "nope")
    cases = [
        (ZS.main, ["--model", tiny_export, "--data", missing, "--out", str(tmp_path / "a")]),
        (ZS.main, ["--model", missing, "--data", str(synthetic_shards["test"]), "--out", str(tmp_path / "a")]),
        (R.main, ["--model", tiny_export, "--data", missing, "--out", str(tmp_path / "b")]),
        (R.main, ["--model", f"m={missing}", "--data", str(synthetic_shards["test"]), "--out", str(tmp_path / "b")]),
        (FT.main, ["--encoder", tiny_export, "--train-data", missing, "--test-data", str(synthetic_shards["test"]),
                   "--out", str(tmp_path / "c")]),
        (FT.main, ["--encoder", missing, "--train-data", str(synthetic_shards["train"]),
                   "--test-data", str(synthetic_shards["test"]), "--out", str(tmp_path / "c")]),
    ]
    for fn, argv in cases:
        capsys.readouterr()
        assert fn(argv) == 2, argv
        assert missing in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    rc = subprocess.run([sys.executable, str(ROOT / "tools" / "plot_training.py"), missing], capture_output=True,
                        text=True, cwd=ROOT).returncode
    assert rc == 2


# ---------------------------------------------------------------------------------------------
# retrieval


def test_recall_on_hand_made_similarity_matrix():
    sim = np.array([[0.9, 0.1, 0.2, 0.0],    # own match first
                    [0.8, 0.5, 0.1, 0.0],    # own match second
                    [0.3, 0.6, 0.1, 0.7],    # own match last (rank 4)
                    [0.1, 0.2, 0.3, 0.4]])   # own match first
    st = R.rank_stats(sim, np.eye(4, dtype=bool), ks=(1, 2, 3, 4))
    assert st["recall"] == {1: 0.5, 2: 0.75, 3: 0.75, 4: 1.0}
    np.testing.assert_allclose(st["per_query_rank"], [1, 2, 4, 1])
    # ties: the match ties with one other candidate -> a coin flip at K=1
    tie = R.rank_stats(np.array([[0.5, 0.5, 0.1]]), np.array([[True, False, False]]), ks=(1, 2))
    assert tie["recall"] == {1: 0.5, 2: 1.0} and tie["per_query_rank"][0] == pytest.approx(1.5)
    # several relevant items (same label set): first hit within K, ties in expectation
    many = R.rank_stats(np.array([[0.9, 0.5, 0.5, 0.5, 0.1]]), np.array([[False, True, True, False, False]]),
                        ks=(1, 2, 3))
    assert many["recall"] == {1: 0.0, 2: pytest.approx(2 / 3), 3: 1.0}
    # chance level matches a brute-force average over random orders
    rel = np.array([[True, True, False, False, False], [True, False, False, False, False]])
    ch = R.chance_recall(rel, ks=(1, 2))
    # query 1: 1 - C(3, K) / C(5, K); query 2: K / 5
    assert ch[1] == pytest.approx((2 / 5 + 1 / 5) / 2) and ch[2] == pytest.approx(((1 - 3 / 10) + 2 / 5) / 2)
    # perfect embeddings: R@1 = 1 both ways; the same-label variant is at least as easy
    emb = np.eye(6, dtype=np.float32)
    m = R.retrieval_metrics(emb, emb, [{"a"}, {"a"}, set(), set(), {"b"}, {"a", "b"}], ks=(1, 5))
    assert m["exact"]["image_to_report"]["recall"][1] == 1.0 and m["exact"]["report_to_image"]["recall"][1] == 1.0
    assert m["same_labels"]["image_to_report"]["recall"][1] == 1.0 and m["n_label_sets"] == 4
    assert m["chance"]["exact"][1] == pytest.approx(1 / 6)


def test_retrieval_cli_end_to_end(tiny_export, synthetic_shards, tmp_path):
    out = tmp_path / "ret"
    assert R.main(["--model", f"tiny={tiny_export}", "--data", str(synthetic_shards["test"]), "--same-labels",
                   "--max-samples", "64", "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "retrieval.json").read_text())["models"]["tiny"]
    assert res["n"] == 64 and res["ks"] == [1, 5, 10]
    for variant in ("exact", "same_labels"):
        for d in ("image_to_report", "report_to_image"):
            rec = res[variant][d]["recall"]
            assert 0 <= rec["1"] <= rec["5"] <= rec["10"] <= 1
    assert res["chance"]["exact"]["1"] == pytest.approx(1 / 64)
    md = (out / "retrieval.md").read_text()
    assert "image → report" in md and "same labels" in md and "chance" in md


# ---------------------------------------------------------------------------------------------
# full fine-tuning


def test_finetune_subsample_keeps_both_classes():
    y = np.zeros((200, 3), np.float32)
    y[:3, 0] = 1
    y[10:110, 1] = 1
    y[:, 2] = np.nan
    y[5, 2] = 1
    idx, note = FT.subsample(y, 0.05, seed=0, task="multilabel")
    assert (y[idx, 0] == 1).any() and (y[idx, 0] == 0).any() and (y[idx, 1] == 1).any()
    assert len(idx) >= 10 and len(set(idx.tolist())) == len(idx)
    assert np.array_equal(FT.subsample(y, 1.0, 0, "multilabel")[0], np.arange(200))
    again, _ = FT.subsample(y, 0.05, seed=0, task="multilabel")
    assert np.array_equal(idx, again)


def test_finetune_cli_few_steps(tiny_export, synthetic_shards, tmp_path):
    out = tmp_path / "ft"
    rc = FT.main(["--encoder", f"tiny={tiny_export}", "--train-data", str(synthetic_shards["train"]),
                  "--test-data", str(synthetic_shards["test"]), "--fractions", "0.1,1.0", "--seeds", "0",
                  "--epochs", "2", "--min-steps", "12", "--max-steps", "12", "--batch-size", "16",
                  "--head-lr", "3e-3", "--workers", "0", "--out", str(out), "--no-progress"])
    assert rc == 0
    payload = json.loads((out / "finetune.json").read_text())
    res = payload["encoders"]["tiny"]
    assert res["metric"] == "auc" and res["fractions"] == [0.1, 1.0] and res["n_train"] == 192
    assert [r["steps"] for r in res["runs"]] == [12, 12]
    for run in res["runs"]:
        assert len(run["losses"]) == 12 and run["loss_end"] < run["loss_start"], run
    assert res["runs"][0]["n_train"] < res["runs"][1]["n_train"] == 192
    mean = res["summary"]["1"]["mean_over_labels"]["mean"]
    assert mean is not None and 0 <= mean <= 1
    md = (out / "finetune.md").read_text()
    assert "Full fine-tuning" in md and "tiny 10%" in md and "tiny 100%" in md and "| **mean** |" in md
    assert_png(out / "finetune.png")
    assert_png(out / "roc_tiny.png")
    assert np.load(out / "scores_tiny.npz")["scores"].shape[0] == 96


# ---------------------------------------------------------------------------------------------
# plots


def test_roc_and_embedding_plots(tmp_path):
    rng = np.random.default_rng(0)
    y = (rng.random((80, 3)) < 0.4).astype(np.float32)
    s = y + rng.normal(scale=0.8, size=y.shape)
    y[:, 2] = 0  # one class only: listed as n/a, not drawn
    assert_png(PX.plot_roc_curves(s, y, ["a", "b", "c"], str(tmp_path / "roc.png")))
    with pytest.raises(ValueError):
        PX.plot_roc_curves(s, y, ["a", "b"], str(tmp_path / "bad.png"))
    X = np.concatenate([rng.normal(size=(30, 8)), rng.normal(loc=4, size=(30, 8))]).astype(np.float32)
    Y = np.zeros((60, 3), np.float32)
    Y[:30, 0] = 1
    Y[30:40, 1] = 1
    Y[40:45, :2] = 1
    assert PX.label_categories(Y[[0, 35, 42, 50]], ["a", "b", "no_finding"]) == ["a", "b", "multiple", "no finding"]
    assert_png(PX.plot_embedding_map(X, Y, str(tmp_path / "tsne.png"), label_names=["a", "b", "no_finding"]))
    assert_png(PX.plot_embedding_map(X, np.repeat([0, 1], 30), str(tmp_path / "pca.png"),
                                     class_names=["NORMAL", "PNEUMONIA"], method="pca"))


def test_grounding_heatmap_with_synthetic_attention(tmp_path):
    from mlip_ds.model.towers import build_tokenizer, load_model_config

    tok = build_tokenizer(load_model_config("tiny"))
    text = "Small left pleural effusion. No pneumothorax. Cardiomegaly."
    tokens = PX.tokens_for_attention(tok, text)
    assert len(tokens) == load_model_config("tiny")["text_cfg"]["context_length"] - 1  # rows of token_patch_attn
    side = 8
    T, P = len(tokens), side * side
    attn = np.full((T, P), 1.0 / P)
    yy, xx = np.mgrid[:side, :side]
    for t, w in enumerate(tokens):
        if w == "effusion":  # this word looks at the lower left
            m = np.exp(-((yy - 6) ** 2 + (xx - 1) ** 2)).ravel()
            attn[t] = m / m.sum()
    entries = PX.grounding_entries(attn, tokens, words=["pleural effusion", "pneumothorax"])
    assert [w for w, _ in entries] == ["pleural", "effusion", "pneumothorax"]
    eff = dict(entries)["effusion"].reshape(side, side)
    assert np.unravel_index(eff.argmax(), eff.shape) == (6, 1)
    merged = PX.grounding_entries(np.ones((4, 4)), ["card", "##iom", "##egaly", "[SEP]"])
    assert [w for w, _ in merged] == ["cardiomegaly"]
    image = np.linspace(0, 255, 64 * 64).reshape(64, 64).astype(np.uint8)
    assert_png(PX.plot_grounding(image, attn, tokens, str(tmp_path / "g.png"),
                                 words=["pleural effusion", "pneumothorax", "cardiomegaly"]))
    # a class-token column first (P = side^2 + 1), a normalised 3-channel tensor image, shared scale
    with_cls = np.concatenate([np.zeros((T, 1)), attn], 1)
    assert_png(PX.plot_grounding(torch.randn(3, 64, 64), torch.tensor(with_cls), tokens,
                                 str(tmp_path / "g2.png"), normalize="shared", max_tokens=3))
    with pytest.raises(ValueError, match="square"):
        PX.plot_grounding(image, np.ones((T, 12)), tokens, str(tmp_path / "g3.png"))
    with pytest.raises(ValueError, match="rows"):
        PX.plot_grounding(image, attn[:-1], tokens, str(tmp_path / "g4.png"))


def test_training_curves_from_a_real_event_file(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "run"
    writer = SummaryWriter(str(run / "tb"))
    for step in range(1, 21):
        writer.add_scalar("loss/global", 4.0 - 0.1 * step, step)
        writer.add_scalar("loss/local", 2.0 - 0.05 * step, step)
        writer.add_scalar("loss/total", 6.0 - 0.15 * step, step)
        writer.add_scalar("lr", 1e-3 * step / 20, step)
        writer.add_scalar("temperature", 0.07, step)
        writer.add_scalar("perf/samples_per_s", 100.0 + step, step)
        writer.add_scalar("data/skipped", 0, step)
    writer.close()
    scalars = PX.read_tb_scalars(str(run))
    assert {"loss/global", "loss/local", "loss/total", "lr", "temperature", "perf/samples_per_s"} <= set(scalars)
    steps, values = scalars["loss/global"]
    assert steps.tolist() == list(range(1, 21))
    np.testing.assert_allclose(values, 4.0 - 0.1 * np.arange(1, 21), rtol=1e-6)
    assert_png(PX.plot_training_curves(scalars, str(tmp_path / "c.png"), smooth=0.5))
    with pytest.raises(ValueError, match="match"):
        PX.plot_training_curves(scalars, str(tmp_path / "x.png"), panels=["nothing/*"])
    out = tmp_path / "cli.png"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "plot_training.py"), str(run), str(run / "tb"),
                           "--names", "a,b", "--out", str(out)], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert_png(out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no TensorBoard event files"):
        PX.read_tb_scalars(str(tmp_path / "empty"))
