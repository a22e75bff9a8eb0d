"""Tests for the synthetic chest-radiograph + report generator (mlip_ds.sources.synthetic)."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from mlip_ds.data.schema import FINDINGS, NO_FINDING, validate_sample_json
from mlip_ds.sources import synthetic as syn

N_STATS = 300  # samples used for the statistical / consistency checks (at 64 px: a few seconds)

# Words of each finding an entity span must contain (kept independent of the module's own table).
TERMS = {
    "atelectasis": ("atelecta",),
    "cardiomegaly": ("cardiomegaly", "heart", "cardiac", "cardiomediastinal"),
    "consolidation": ("consolidation", "airspace opacit"),
    "edema": ("edema",),
    "nodule": ("nodul",),
    "pleural_effusion": ("effusion",),
    "pneumonia": ("pneumonia",),
    "pneumothorax": ("pneumothorax",),
}
# Every occurrence of these stems in a report must lie inside an entity span of that finding.
STEMS = {
    "atelectasis": r"atelecta\w*",
    "cardiomegaly": r"cardiomegaly",
    "consolidation": r"consolidation\w*",
    "edema": r"edema",
    "nodule": r"nodul\w*",
    "pleural_effusion": r"effusions?",
    "pneumonia": r"pneumonia",
    "pneumothorax": r"pneumothorax",
}
SIDE_WORDS = {"left": ("left",), "right": ("right",), "bilateral": ("bilateral", "bibasilar", "both")}
CUIS = {"atelectasis": "C0004144", "cardiomegaly": "C0018800", "consolidation": "C0521530", "edema": "C0034063",
        "nodule": "C0034079", "pleural_effusion": "C0032227", "pneumonia": "C0032285", "pneumothorax": "C0032326"}


@pytest.fixture(scope="module")
def samples():
    return list(syn.generate(N_STATS, seed=0, size=64))


def _words(text: str) -> set:
    return set(re.findall(r"[a-z][a-z-]*", text.lower()))


def _sentence(report: str, start: int, end: int) -> str:
    """The sentence around a span: from the previous '. ' / ': ' / newline to the next '.'."""
    lo = max(report.rfind(". ", 0, start), report.rfind(": ", 0, start), report.rfind("\n", 0, start))
    hi = report.find(".", end)
    return report[lo + 1: hi if hi >= 0 else len(report)]


def _region_mean(img: np.ndarray, u0, u1, v0, v1) -> float:
    n = img.shape[0]
    return float(img[int(v0 * n):int(v1 * n), int(u0 * n):int(u1 * n)].astype(np.float64).mean())


# ------------------------------------------------------------------------------------------ interface
@pytest.mark.parametrize("size", [64, 128, 256])
def test_interface(size):
    s = syn.generate_sample(7, seed=3, size=size)
    assert s.key == "syn-0003-0000007"
    assert s.image.dtype == np.uint8 and s.image.shape == (size, size)
    assert s.seg.dtype == np.uint8 and s.seg.shape == (size, size)
    assert s.report == f"FINDINGS: {s.sections['findings']}\n\nIMPRESSION: {s.sections['impression']}"
    assert set(s.labels) == set(FINDINGS) | {NO_FINDING}
    assert all(s.labels[n] in (1, 0, -1) for n in FINDINGS) and s.labels[NO_FINDING] in (0, 1)
    assert s.meta == {"source": "synthetic", "seed": 3, "index": 7, "view": "PA", "findings": s.findings,
                      "generator_version": 1}
    for e in s.entities:
        assert set(e) == {"cui", "name", "start", "end", "negated", "uncertain"}
        assert e["cui"] == CUIS[e["name"]]
    for f in s.findings:
        assert set(f) == {"name", "laterality", "severity", "bbox"}
        assert f["severity"] in ("mild", "moderate", "severe")
        assert f["laterality"] in (None, "left", "right", "bilateral")
    doc = {"id": s.key, "sections": s.sections, "entities": s.entities, "labels": s.labels, "meta": s.meta}
    validate_sample_json(doc, s.key)
    assert json.loads(json.dumps(doc)) == doc  # plain Python types only (shards store this as JSON)
    # the image is a radiograph, not a blank: dark corners (air), bright centre-bottom (abdomen)
    assert s.image[: size // 16, : size // 16].mean() < 60
    assert s.image[int(size * 0.85):int(size * 0.95), int(size * 0.45):int(size * 0.55)].mean() > 110


# ------------------------------------------------------------------------------------------ determinism
def test_deterministic_same_args():
    a, b = syn.generate_sample(11, seed=5, size=96), syn.generate_sample(11, seed=5, size=96)
    assert a.image.tobytes() == b.image.tobytes() and a.seg.tobytes() == b.seg.tobytes()
    assert a.report == b.report and a.labels == b.labels and a.entities == b.entities and a.findings == b.findings


def test_different_index_and_seed_differ():
    a, b, c = (syn.generate_sample(i, seed=s, size=64) for i, s in ((0, 0), (1, 0), (0, 1)))
    assert a.image.tobytes() != b.image.tobytes()
    assert a.image.tobytes() != c.image.tobytes()


def test_order_independence():
    seq = list(syn.generate(4, seed=2, size=64, start=10))
    assert [s.key for s in seq] == [f"syn-0002-{i:07d}" for i in range(10, 14)]
    for s in reversed(seq):  # regenerate alone, in reverse order, after other work
        syn.generate_sample(999, seed=7, size=64)
        alone = syn.generate_sample(s.meta["index"], seed=2, size=64)
        assert alone.image.tobytes() == s.image.tobytes() and alone.report == s.report


def test_text_and_labels_do_not_depend_on_size():
    a, b = syn.generate_sample(21, size=64), syn.generate_sample(21, size=256)
    assert a.report == b.report and a.labels == b.labels and a.entities == b.entities
    assert [(f["name"], f["laterality"], f["severity"]) for f in a.findings] == \
           [(f["name"], f["laterality"], f["severity"]) for f in b.findings]


# ------------------------------------------------------------------------------------------ report/labels
def test_labels_match_entities(samples):
    for s in samples:
        for n in FINDINGS:
            ents = [e for e in s.entities if e["name"] == n]
            pos = [e for e in ents if not e["negated"]]
            if s.labels[n] == 1:
                assert any(not e["uncertain"] for e in pos), (s.key, n, s.report)
            elif s.labels[n] == -1:
                assert pos and all(e["uncertain"] for e in pos), (s.key, n, s.report)
            else:
                assert not pos, (s.key, n, s.report)  # absent: only ever negated
        assert s.labels[NO_FINDING] == int(all(s.labels[n] == 0 for n in FINDINGS))
        # pneumonia rides on consolidation
        assert (s.labels["pneumonia"] != 0) == (s.labels["consolidation"] != 0)


def test_entity_spans(samples):
    for s in samples:
        for e in s.entities:
            assert 0 <= e["start"] < e["end"] <= len(s.report)
            phrase = s.report[e["start"]:e["end"]].lower()
            assert any(t in phrase for t in TERMS[e["name"]]), (s.key, e, phrase)
            assert phrase == phrase.strip() and "[" not in phrase and "]" not in phrase
        # no un-annotated mention: each finding word lies inside an entity of that finding
        for n, pat in STEMS.items():
            for m in re.finditer(pat, s.report, flags=re.I):
                assert any(e["name"] == n and e["start"] <= m.start() and m.end() <= e["end"] for e in s.entities), \
                    (s.key, n, m.group(0), s.report)
        assert "[" not in s.report and "{" not in s.report


def test_negation_and_uncertainty_wording(samples):
    n_unc = 0
    for s in samples:
        for e in s.entities:
            sent = _sentence(s.report, e["start"], e["end"]).lower()
            if e["negated"]:
                assert re.search(r"\b(no|without|normal)\b", sent), (s.key, sent)
            if e["uncertain"]:
                n_unc += 1
                assert re.search(r"possibl|questionable|cannot|may|borderline|likely|concerning|consideration",
                                 sent), (s.key, sent)
                # hedging is reserved for mild findings (pneumonia: an interpretation of any consolidation)
                if e["name"] != "pneumonia":
                    f = next(f for f in s.findings if f["name"] == e["name"])
                    assert f["severity"] == "mild"
    assert n_unc > 0
    normal = [s for s in samples if s.labels[NO_FINDING] == 1]
    assert normal and all(not any(not e["negated"] for e in s.entities) for s in normal)


def test_laterality_and_severity_words_match(samples):
    for s in samples:
        by_name = {f["name"]: f for f in s.findings}
        for e in s.entities:
            if e["negated"]:
                continue
            f = by_name[e["name"]]
            words = _words(_sentence(s.report, e["start"], e["end"]))
            if f["laterality"] is not None:
                assert words & set(SIDE_WORDS[f["laterality"]]), (s.key, e["name"], words)
                if f["laterality"] in ("left", "right"):
                    other = "right" if f["laterality"] == "left" else "left"
                    assert other not in words, (s.key, e["name"], words)
            cues = syn.SEVERITY_CUES[e["name"]]
            assert words & set(cues[f["severity"]]), (s.key, e["name"], f["severity"], words)
            for lvl, ws in cues.items():
                if lvl != f["severity"]:
                    assert not (words & (set(ws) - set(cues[f["severity"]]))), (s.key, e["name"], lvl, words)


def test_normal_fraction_and_finding_counts(samples):
    frac = np.mean([s.labels[NO_FINDING] for s in samples])
    assert 0.22 <= frac <= 0.42, frac
    counts = [len({f["name"] for f in s.findings} - {"pneumonia"}) for s in samples]
    assert max(counts) <= 3 and min(counts) == 0
    seen = {f["name"] for s in samples for f in s.findings}
    assert seen == set(FINDINGS)  # every finding occurs
    sev = {f["severity"] for s in samples for f in s.findings}
    assert sev == {"mild", "moderate", "severe"}


# ------------------------------------------------------------------------------------------ geometry
def test_bbox_and_seg_match_findings(samples):
    for s in samples:
        size = s.image.shape[0]
        names = [f["name"] for f in s.findings]
        assert len(names) == len(set(names))
        assert set(names) == {n for n in FINDINGS if s.labels[n] != 0}
        for i, n in enumerate(FINDINGS):
            bit = (s.seg >> i) & 1
            assert bit.any() == (n in names), (s.key, n)
        for f in s.findings:
            x0, y0, x1, y1 = f["bbox"]
            assert all(isinstance(v, int) for v in f["bbox"])
            assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size, (s.key, f)
            bit = (s.seg >> FINDINGS.index(f["name"])) & 1
            ys, xs = np.nonzero(bit)
            assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == f["bbox"]
            if f["laterality"] in ("left", "right"):  # patient's left is image right
                cx = (x0 + x1) / 2 / size
                assert (cx > 0.5) == (f["laterality"] == "left"), (s.key, f)
        if "pneumonia" in names:
            assert np.array_equal((s.seg >> FINDINGS.index("pneumonia")) & 1,
                                  (s.seg >> FINDINGS.index("consolidation")) & 1)


# ------------------------------------------------------------------------------------------ physics
def test_cardiomegaly_widens_heart_shadow(samples):
    """Lateral to a normal heart's left border (image right, lower chest) is lung; a big heart fills it."""
    region = (0.70, 0.78, 0.55, 0.68)
    big = [_region_mean(s.image, *region) for s in samples if s.labels["cardiomegaly"] != 0]
    normal = [_region_mean(s.image, *region) for s in samples if s.labels[NO_FINDING] == 1]
    assert len(big) >= 10 and len(normal) >= 50
    assert np.mean(big) > np.mean(normal) + 30, (np.mean(big), np.mean(normal))


def test_effusion_raises_basal_intensity_on_its_side(samples):
    """Lateral lung base of the effusion side vs the other side, compared with normal studies."""
    def base(img, side):
        u = (0.13, 0.30) if side == "right" else (0.70, 0.87)
        return _region_mean(img, *u, 0.62, 0.78)

    diffs = []
    for s in samples:
        f = next((f for f in s.findings if f["name"] == "pleural_effusion"), None)
        if f is not None and f["laterality"] in ("left", "right"):
            other = "left" if f["laterality"] == "right" else "right"
            diffs.append(base(s.image, f["laterality"]) - base(s.image, other))
    normal = [abs(base(s.image, "right") - base(s.image, "left")) for s in samples if s.labels[NO_FINDING] == 1]
    assert len(diffs) >= 15
    assert np.mean(diffs) > np.mean(normal) + 8, (np.mean(diffs), np.mean(normal))


def test_severity_scales_region(samples):
    """Bigger severity -> bigger region, for findings whose extent grows with severity."""
    for name in ("pleural_effusion", "consolidation", "pneumothorax"):
        area = {}
        for s in samples:
            for f in s.findings:
                if f["name"] == name and f["laterality"] != "bilateral":
                    bit = (s.seg >> FINDINGS.index(name)) & 1
                    area.setdefault(f["severity"], []).append(bit.sum())
        if {"mild", "severe"} <= set(area):
            assert np.mean(area["severe"]) > np.mean(area["mild"]), (name, {k: np.mean(v) for k, v in area.items()})
