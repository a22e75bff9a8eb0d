"""Report linking: sections, mentions, abbreviations, negation/uncertainty, labels, the link CLI.

Needs spaCy + scispacy (+ nmslib, scikit-learn); the whole file is skipped without them. The last
test reads the real Open-i reports from ../shared/data (skipped when absent).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("spacy", reason="spaCy is not installed (pip install spacy scispacy); linker not testable")
pytest.importorskip("scispacy", reason="scispacy is not installed (pip install scispacy); linker not testable")
pytest.importorskip("nmslib", reason="nmslib (nmslib-metabrainz) is not installed; linker not testable")

from mlip_ds.data.schema import ENTITY_FIELDS  # noqa: E402
from mlip_ds.knowledge.kb import load_kb  # noqa: E402
from mlip_ds.knowledge.linker import (ReportLinker, labels_from_entities, load_overrides,  # noqa: E402
                                      surface_forms)
from mlip_ds.knowledge.sections import sections_dict, split_sections  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OPENI = ROOT.parent / "shared" / "data" / "openi_reports"

MIMIC_STYLE = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough, r/o pneumonia

 TECHNIQUE:  Chest PA and lateral

 COMPARISON:  ___

 FINDINGS:

 There is no focal consolidation, pleural effusion or pneumothorax.  The
 cardiomediastinal silhouette is normal.

 IMPRESSION:

 No acute cardiopulmonary process.
"""

OPENI_STYLE = ("COMPARISON: None.\nINDICATION: Positive TB test\n"
               "FINDINGS: The heart is normal in size. There is no pneumothorax.\n"
               "IMPRESSION: Normal chest x-XXXX.")


@pytest.fixture(scope="module")
def kb():
    return load_kb()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("linker_cache")


@pytest.fixture(scope="module")
def linker(kb, cache_dir):
    return ReportLinker(kb, cache_dir=cache_dir)


def by_text(text, ents):
    return {text[e["start"]:e["end"]].lower(): e for e in ents}


# -- sections ------------------------------------------------------------------------------------
def test_sections_mimic_style():
    secs = split_sections(MIMIC_STYLE)
    names = [s.name for s in secs]
    assert names == ["preamble", "examination", "indication", "technique", "comparison", "findings",
                     "impression"]
    got = {s.name: MIMIC_STYLE[s.start:s.end] for s in secs}
    assert got["preamble"] == "FINAL REPORT"
    assert got["indication"] == "___F with cough, r/o pneumonia"
    assert got["findings"].startswith("There is no focal consolidation") and got["findings"].endswith("normal.")
    assert got["impression"] == "No acute cardiopulmonary process."
    assert sections_dict(MIMIC_STYLE)["impression"] == "No acute cardiopulmonary process."


def test_sections_openi_style_case_typos_and_inline():
    secs = {s.name: OPENI_STYLE[s.start:s.end] for s in split_sections(OPENI_STYLE)}
    assert secs == {"comparison": "None.", "indication": "Positive TB test",
                    "findings": "The heart is normal in size. There is no pneumothorax.",
                    "impression": "Normal chest x-XXXX."}
    text = "Findings: lungs clear.\nimpresson: normal.  WET READ: ok"
    assert [(s.name, text[s.start:s.end]) for s in split_sections(text)] == [
        ("findings", "lungs clear."), ("impression", "normal."), ("wet_read", "ok")]
    # no header at all: one body section; prose "the findings: x" mid-line is not a header
    plain = "Heart size normal, the findings: none. No effusion."
    assert [(s.name, s.start, s.end) for s in split_sections(plain)] == [("body", 0, len(plain))]
    # "FINAL REPORT" followed by prose without headers: the prose is the body
    t2 = "FINAL REPORT\nCHEST RADIOGRAPH\n\nThe lungs are clear. No pneumothorax."
    assert [s.name for s in split_sections(t2)] == ["preamble", "body"]


# -- mentions, abbreviations, negation -----------------------------------------------------------
def test_entities_schema_offsets_and_names(linker, kb):
    text = ("FINDINGS:  No  pneumothorax.\r\nPossible small effusion.\r\nCardiomegaly — stable.\n"
            "IMPRESSION: Ünchanged.")
    ents = linker.link(text)
    assert ents, "no entities"
    for e in ents:
        assert tuple(e) == ENTITY_FIELDS
        assert 0 <= e["start"] < e["end"] <= len(text)
        assert e["name"] == kb[e["cui"]].name
        assert not (e["negated"] and e["uncertain"])
    assert [e["start"] for e in ents] == sorted(e["start"] for e in ents)
    got = by_text(text, ents)
    assert got["pneumothorax"]["cui"] == "C0032326" and got["pneumothorax"]["negated"]
    assert got["small effusion"]["cui"] == "C0032227" and got["small effusion"]["uncertain"]
    assert got["cardiomegaly"]["cui"] == "C0018800"
    assert not got["cardiomegaly"]["negated"] and not got["cardiomegaly"]["uncertain"]


@pytest.mark.parametrize("sentence,mention,state", [
    ("No pneumothorax.", "pneumothorax", "negated"),
    ("There is no evidence of pleural effusion or pneumothorax.", "pneumothorax", "negated"),
    ("The lungs are clear of focal airspace disease, pneumothorax, or pleural effusion.", "pneumothorax", "negated"),
    ("The left apical pneumothorax has resolved.", "apical pneumothorax", "negated"),
    ("Possible small effusion.", "small effusion", "uncertain"),
    ("Cannot exclude pneumonia.", "pneumonia", "uncertain"),
    ("Opacity which may represent atelectasis.", "atelectasis", "uncertain"),
    ("No new consolidation.", "consolidation", "uncertain"),   # CheXpert: "no new X" is uncertain
    ("Mild pulmonary vascular congestion.", "pulmonary vascular congestion", "uncertain"),
    ("Moderate cardiomegaly with small bilateral pleural effusions.", "cardiomegaly", "positive"),
    ("No change in the moderate pleural effusion.", "pleural effusion", "positive"),  # pseudo-negation
    ("No pneumothorax, but there is a small pleural effusion.", "pleural effusion", "positive"),
    ("Heart size is mildly enlarged.", "heart size is mildly enlarged", "positive"),
])
def test_negation_uncertainty(linker, sentence, mention, state):
    ents = by_text(sentence, linker.link(sentence))
    assert mention in ents, (sentence, list(ents))
    e = ents[mention]
    assert (("negated" if e["negated"] else "uncertain" if e["uncertain"] else "positive") == state), (sentence, e)


def test_abbreviations(linker):
    ents = by_text("No PTX.", linker.link("No PTX."))
    assert ents["ptx"]["cui"] == "C0032326" and ents["ptx"]["negated"]
    text = "Findings consistent with congestive heart failure (CHF). CHF is worse."
    chf = [e for e in linker.link(text) if text[e["start"]:e["end"]] == "CHF"]
    assert len(chf) == 2 and {e["cui"] for e in chf} == {"C0018802"}
    # an abbreviation defined in the report and absent from the KB: linked through its long form
    text = "Bilateral ground-glass opacities (GGOs). The GGOs are new."
    ggos = [e for e in linker.link(text) if text[e["start"]:e["end"]] == "GGOs"]
    assert len(ggos) == 2 and {e["cui"] for e in ggos} == {"MLIP:ground_glass_opacity"}
    assert "GGOs" not in surface_forms(linker.kb, linker.overrides)


def test_only_clinical_sections_are_linked(linker):
    text = "INDICATION: r/o pneumonia.\nFINDINGS: Small left pleural effusion."
    cuis = {e["cui"] for e in linker.link(text)}
    assert "C0032285" not in cuis and "C0032227" in cuis
    everything = ReportLinker(linker.kb, sections=None, cache_dir=None, use_cache=False)
    assert "C0032285" in {e["cui"] for e in everything.link(text)}


def test_index_cache_and_overrides(kb, cache_dir, tmp_path):
    again = ReportLinker(kb, cache_dir=cache_dir)
    assert again.index_info["cached"] is True
    # curation: an added alias links, an ignored phrase blocks a shorter alias, bad ids fail
    ov = tmp_path / "ov.json"
    ov.write_text(json.dumps({"changes": [{"name": "t", "add_aliases": {"C0032326": ["air in the pleura"]},
                                           "ignore": ["cystic fibrosis"]}]}), encoding="utf-8")
    custom = ReportLinker(kb, overrides=ov, cache_dir=tmp_path / "c")
    text = "Air in the pleura. Known cystic fibrosis."
    assert [(text[e["start"]:e["end"]], e["cui"]) for e in custom.link(text)
            if e["cui"] in ("C0032326", "C0016059")] == [("Air in the pleura", "C0032326")]
    ov.write_text(json.dumps({"add_aliases": {"C9999999": ["x"]}}), encoding="utf-8")
    with pytest.raises(ValueError, match="C9999999"):
        load_overrides(ov, kb)


def test_negex_method(kb, cache_dir):
    pytest.importorskip("negspacy", reason="negspacy is not installed")
    negex = ReportLinker(kb, negation="negex", cache_dir=cache_dir)
    ents = by_text("No pneumothorax. Possible small effusion. Cardiomegaly.",
                   negex.link("No pneumothorax. Possible small effusion. Cardiomegaly."))
    assert ents["pneumothorax"]["negated"] and ents["small effusion"]["uncertain"]
    assert not ents["cardiomegaly"]["negated"] and not ents["cardiomegaly"]["uncertain"]


# -- labels --------------------------------------------------------------------------------------
def test_labels_from_entities_rules(kb):
    def ent(cui, neg=False, unc=False):
        return {"cui": cui, "name": "?", "start": 0, "end": 1, "negated": neg, "uncertain": unc}
    ptx, eff, cmg, ett, lung = "C0032326", "C0032227", "C0018800", "MLIP:endotracheal_tube", "C0024109"
    assert labels_from_entities([], kb) == {"no_finding": 1}
    assert labels_from_entities([ent(ptx, neg=True)], kb) == {"no_finding": 1, "pneumothorax": 0}
    # positive beats uncertain beats negative, whatever the order
    assert labels_from_entities([ent(eff, neg=True), ent(eff, unc=True)], kb)["pleural_effusion"] == -1
    assert labels_from_entities([ent(eff, unc=True), ent(eff), ent(eff, neg=True)], kb)["pleural_effusion"] == 1
    # an uncertain finding clears no_finding; support devices and unlabelled concepts do not
    assert labels_from_entities([ent(cmg, unc=True)], kb) == {"cardiomegaly": -1, "no_finding": 0}
    assert labels_from_entities([ent(ett), ent(lung)], kb) == {"no_finding": 1, "support_devices": 1}
    assert labels_from_entities([ent("C9999999")], kb) == {"no_finding": 1}  # unknown ids are ignored


# -- the link command ----------------------------------------------------------------------------
def test_link_command_order_with_two_workers(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setenv("MLIP_DS_CACHE", str(cache_dir))  # keep the user's cache directory untouched
    texts = ["FINDINGS: No pneumothorax. Small left effusion.", "Heart is enlarged.", "",
             "IMPRESSION: Possible pneumonia.", "FINDINGS: Normal chest."]
    inp = tmp_path / "reports.jsonl"
    with open(inp, "w", encoding="utf-8") as f:
        for i in range(40):
            f.write(json.dumps({"id": f"r{i}", "text": texts[i % len(texts)], "extra": i}) + "\n")
            if i == 10:
                f.write("\n")  # blank lines are skipped
    env = dict(os.environ, MLIP_DS_CACHE=str(cache_dir), OMP_NUM_THREADS="1")
    out2 = tmp_path / "two.jsonl"
    r = subprocess.run([sys.executable, "-m", "mlip_ds.knowledge.linker", "--in", str(inp), "--out", str(out2),
                        "--workers", "2", "--chunk-size", "3", "--labels"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out2.read_text(encoding="utf-8").splitlines()]
    assert [row["id"] for row in rows] == [f"r{i}" for i in range(40)]
    from mlip_ds.knowledge.linker import link_file
    out1 = tmp_path / "one.jsonl"
    assert link_file(inp, out1, workers=1, with_labels=True, progress=False) == 40
    assert out1.read_bytes() == out2.read_bytes()
    assert rows[1]["labels"]["cardiomegaly"] == 1 and rows[0]["labels"]["pneumothorax"] == 0
    # a broken line stops the run with its line number and leaves no output behind
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "text": "ok"}\n{"id": 2}\n', encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "mlip_ds.knowledge.linker", "--in", str(bad), "--out",
                        str(tmp_path / "bad_out.jsonl"), "--no-progress"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "bad.jsonl:2" in r.stderr
    assert not (tmp_path / "bad_out.jsonl").exists()


# -- real reports --------------------------------------------------------------------------------
@pytest.mark.skipif(not (OPENI / "openi_reports.jsonl").is_file(),
                    reason=f"Open-i reports not found at {OPENI} (shared data absent)")
def test_openi_sample_macro_f1(linker):
    import random

    import bench_linker as bench
    reports, gold = bench.load_data(OPENI)
    sample = random.Random(0).sample([r for r in reports if r["uid"] in gold], 200)
    # a sample of 200 has too few positives for the rare findings: score the frequent ones
    ents = linker.link_many([bench.report_text(r) for r in sample])
    by_uid = {r["uid"]: e for r, e in zip(sample, ents)}
    rows, _, _ = bench.evaluate([r["uid"] for r in sample], by_uid, gold, bench.concept_sets(linker.kb),
                                linker.kb, uncertain_positive=False)
    scored = [f for f in bench.FINDINGS if rows[f][0] >= 5]
    macro = sum(rows[f][6] for f in scored) / len(scored)
    assert len(scored) >= 4 and macro > 0.8, {f: round(rows[f][6], 3) for f in scored}
