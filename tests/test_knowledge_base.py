"""The chest-radiograph knowledge base: packaged file, loader/validation, build reproducibility, UMLS import."""
import hashlib
import json
import re
import subprocess
import sys

import pytest

from conftest import ROOT, SHARED_DATA
from mlip_ds.data.schema import FINDINGS, NO_FINDING
from mlip_ds.knowledge import umls
from mlip_ds.knowledge.kb import (CHEXPERT_LABELS, DEFAULT_KB_PATH, KNOWN_LABELS, RELATION_TYPES, SEMANTIC_TYPES,
                                  KBFormatError, KnowledgeBase, default_kb, load_kb, meta_path_for,
                                  normalize_alias)

KB_DATA = DEFAULT_KB_PATH.parent


@pytest.fixture(scope="module")
def kb():
    return load_kb()


# ---- the packaged KB -------------------------------------------------------------------------------
def test_packaged_kb_loads_with_enough_valid_concepts(kb):
    assert len(kb) >= 200
    assert kb.version == "1.0.0"
    counts = kb.counts()
    assert set(counts) == set(SEMANTIC_TYPES) and all(counts[t] > 0 for t in SEMANTIC_TYPES)
    ids = [c.id for c in kb]
    assert len(ids) == len(set(ids)) and ids == sorted(ids)
    for c in kb:
        assert re.fullmatch(r"C\d{7}|MLIP:[a-z0-9_]+", c.id), c.id
        assert c.semantic_type in SEMANTIC_TYPES
        assert c.name and c.definition and "\n" not in c.definition, c.id
        assert c.label is None or c.label in KNOWN_LABELS, (c.id, c.label)
        assert c.sources and "mlip_curated" in c.sources
        for r in c.relations:
            assert r.type in RELATION_TYPES and r.target in kb and r.target != c.id


def test_aliases_unique_after_lowercasing(kb):
    owner = {}
    for c in kb:
        for form in c.surface_forms():
            key = normalize_alias(form)
            assert owner.setdefault(key, c.id) == c.id, f"{form!r} is claimed by {owner[key]} and {c.id}"
    assert not kb.duplicate_names


def test_is_a_hierarchy_is_acyclic(kb):
    for c in kb:
        assert c.id not in {a.id for a in kb.ancestors(c)}, c.id


def test_meta_file_matches_kb():
    meta = json.loads(meta_path_for(DEFAULT_KB_PATH).read_text())
    assert meta["sha256"] == hashlib.sha256(DEFAULT_KB_PATH.read_bytes()).hexdigest()
    assert meta["n_concepts"] == len(load_kb())
    assert (KB_DATA / "ATTRIBUTION.md").is_file()


@pytest.mark.parametrize("alias,expected", [
    ("PTX", "C0032326"), ("ptx", "C0032326"), ("pneumothorax", "C0032326"), ("CHF", "C0018802"),
    ("COPD", "C0024117"), ("CABG", "C0010055"), ("ARDS", "C0035222"), ("CXR", "C0039985"),
    ("ETT", "MLIP:endotracheal_tube"), ("NGT", "MLIP:nasogastric_tube"), ("PICC", "MLIP:picc"),
    ("Effusion", "C0032227"), ("edema", "C0034063"), ("nodule", "C0034079"), ("  Pleural   Effusion ", "C0032227"),
])
def test_key_aliases_resolve(kb, alias, expected):
    assert kb.by_alias(alias).id == expected
    assert kb.lookup(alias).id == expected


def test_lookup_by_id_and_unknown(kb):
    assert kb.lookup("C0018800").name == "cardiomegaly"
    assert kb.by_alias("no such finding") is None
    with pytest.raises(KeyError, match="C9999999"):
        kb["C9999999"]


def test_every_label_has_a_concept(kb):
    for label in list(FINDINGS) + [NO_FINDING] + list(CHEXPERT_LABELS):
        assert kb.concepts_for_label(label), label
    assert "C0032326" in {c.id for c in kb.concepts_for_label("pneumothorax")}


def test_synthetic_generator_cuis_are_in_the_kb(kb):
    from mlip_ds.sources.synthetic import CUIS
    for label, cui in CUIS.items():
        assert cui in kb and kb[cui].label == label, (label, cui)


def test_text_for_and_neighbours(kb):
    c = kb["C0032326"]
    assert kb.text_for(c) == kb.text_for("C0032326") == f"{c.name}: {c.definition}"
    assert kb.texts(["C0032326"]) == [kb.text_for(c)]
    assert kb.index_of(kb.ids[5]) == 5
    out = {n.id for n in kb.neighbours("C0032326", direction="out")}
    assert "MLIP:pleural_space" in out and "MLIP:pleural_abnormality" in out
    children = {n.id for n in kb.neighbours("C0032326", relation="is_a", direction="in")}
    assert {"MLIP:tension_pneumothorax", "C0546333"} <= children
    assert "MLIP:chest_tube" in {n.id for n in kb.neighbours("C0032326", relation="associated_with")}
    assert kb["MLIP:pleural_abnormality"] in kb.ancestors("MLIP:tension_pneumothorax")
    with_desc = {c.id for c in kb.concepts_for_label("support_devices", include_descendants=True)}
    assert "C0030163" in with_desc
    assert default_kb() is default_kb()


# ---- reproducible build ----------------------------------------------------------------------------
def test_build_kb_regenerates_byte_identical_output(tmp_path):
    if not (SHARED_DATA / "radlabels").is_dir():
        pytest.skip(f"shared source data not present at {SHARED_DATA}; cannot rebuild the KB")
    out = tmp_path / "kb"
    proc = subprocess.run([sys.executable, str(ROOT / "maintainer" / "build_kb.py"), "--shared-data", str(SHARED_DATA),
                           "--out-dir", str(out), "--quiet"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in ("cxr_kb_v1.jsonl", "cxr_kb_v1.meta.json", "ATTRIBUTION.md"):
        assert (out / name).read_bytes() == (KB_DATA / name).read_bytes(), f"{name} differs: rerun maintainer/build_kb.py"


def test_build_kb_reports_missing_shared_data(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "maintainer" / "build_kb.py"), "--shared-data",
                           str(tmp_path / "nope"), "--out-dir", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "shared data directory not found" in proc.stderr


def test_build_kb_names_a_broken_curation_row(tmp_path):
    """The curation tables are data files (maintainer/kb_curation/): a row with a field missing is
    refused with its file and line, before any source is read."""
    import shutil
    cur = tmp_path / "kb_curation"
    shutil.copytree(ROOT / "maintainer" / "kb_curation", cur)
    lines = (cur / "devices.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    lines[2] = lines[2].rstrip("\n").rsplit(",", 1)[0] + "\n"
    (cur / "devices.csv").write_text("".join(lines), encoding="utf-8")
    proc = subprocess.run([sys.executable, str(ROOT / "maintainer" / "build_kb.py"), "--curation-dir", str(cur),
                           "--shared-data", str(tmp_path / "nope"), "--out-dir", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "devices.csv:3: expected 10 fields" in proc.stderr, proc.stderr


# ---- validation errors name the line and field -------------------------------------------------------
def _corrupt(tmp_path, lineno, edit):
    lines = DEFAULT_KB_PATH.read_text(encoding="utf-8").splitlines()
    lines[lineno - 1] = edit(lines[lineno - 1])
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _set(field, value):
    def edit(line):
        obj = json.loads(line)
        obj[field] = value
        return json.dumps(obj)
    return edit


def test_bad_kb_line_raises_error_naming_line_and_field(tmp_path):
    path = _corrupt(tmp_path, 3, _set("semantic_type", "banana"))
    with pytest.raises(KBFormatError, match=r"bad\.jsonl:3\b.*field 'semantic_type'"):
        load_kb(path)
    with pytest.raises(KBFormatError, match=r"bad\.jsonl:7: invalid JSON"):
        load_kb(_corrupt(tmp_path, 7, lambda line: line[:-5]))
    with pytest.raises(KBFormatError, match=r"bad\.jsonl:4\b.*field 'relations'.*MLIP:does_not_exist"):
        load_kb(_corrupt(tmp_path, 4, _set("relations", [{"type": "is_a", "target": "MLIP:does_not_exist"}])))
    with pytest.raises(KBFormatError, match=r"bad\.jsonl:5\b.*missing field"):
        load_kb(_corrupt(tmp_path, 5, lambda line: json.dumps({k: v for k, v in json.loads(line).items()
                                                               if k != "definition"})))
    with pytest.raises(KBFormatError) as err:  # the clash names both lines
        load_kb(_corrupt(tmp_path, 6, _set("aliases", ["PTX"])))
    assert "field 'aliases': 'PTX' is already an alias of" in str(err.value) and "bad.jsonl:6" in str(err.value)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_kb(tmp_path / "missing.jsonl")


# ---- UMLS import -------------------------------------------------------------------------------------
# Column orders as the UMLS Reference Manual lists them (written out here to cross-check the module).
MRCONSO = "CUI LAT TS LUI STT SUI ISPREF AUI SAUI SCUI SDUI SAB TTY CODE STR SRL SUPPRESS CVF".split()
MRSTY = "CUI TUI STN STY ATUI CVF".split()
MRREL = "CUI1 AUI1 STYPE1 REL CUI2 AUI2 STYPE2 RELA RUI SRUI SAB SL RG DIR SUPPRESS CVF".split()
MRDEF = "CUI AUI ATUI SATUI SAB DEF SUPPRESS CVF".split()


def _rrf(columns, rows):
    assert all(set(r) <= set(columns) for r in rows)
    return "".join("|".join(r.get(c, "") for c in columns) + "|\n" for r in rows)


def _atom(cui, text, sab="MSH", lat="ENG", pref=True, suppress="N"):
    return {"CUI": cui, "LAT": lat, "TS": "P" if pref else "S", "LUI": "L1", "STT": "PF", "SUI": "S1",
            "ISPREF": "Y" if pref else "N", "AUI": "A1", "SAB": sab, "TTY": "PT", "CODE": "X1", "STR": text,
            "SRL": "0", "SUPPRESS": suppress}


def _rel(cui1, rel, cui2, rela="", sab="SNOMEDCT_US", suppress="N"):
    return {"CUI1": cui1, "AUI1": "A1", "STYPE1": "AUI", "REL": rel, "CUI2": cui2, "AUI2": "A2", "STYPE2": "AUI",
            "RELA": rela, "RUI": "R1", "SAB": sab, "SL": sab, "SUPPRESS": suppress}


@pytest.fixture
def umls_dir(tmp_path):
    meta = tmp_path / "2099AA" / "META"
    meta.mkdir(parents=True)
    sty = [("C0032326", "T047", "Disease or Syndrome"), ("C9000002", "T023", "Body Part, Organ, or Organ Component"),
           ("C9000003", "T047", "Disease or Syndrome"), ("C9000004", "T074", "Medical Device"),
           ("C9000005", "T109", "Organic Chemical"), ("C9000006", "T047", "Disease or Syndrome"),
           ("C9000007", "T033", "Finding"), ("C9000008", "T047", "Disease or Syndrome"),
           ("C9000003", "T033", "Finding")]
    (meta / "MRSTY.RRF").write_text(_rrf(MRSTY, [{"CUI": c, "TUI": t, "STN": "B2", "STY": s, "ATUI": "AT1",
                                                  "CVF": "256"} for c, t, s in sty]), encoding="utf-8")
    atoms = [
        _atom("C0032326", "Pneumothorax"),
        _atom("C0032326", "PTX", sab="SNOMEDCT_US", pref=False),
        _atom("C0032326", "Pneumothorax (francais)", sab="MSHFRE", lat="FRE"),       # not English
        _atom("C0032326", "Obsolete pneumothorax name", pref=False, suppress="O"),     # suppressed
        _atom("C9000002", "Pleura"),
        _atom("C9000002", "pleura", sab="SNOMEDCT_US", pref=False),                    # same after lower-casing
        _atom("C9000003", "Pneumothorax, tension", sab="SNOMEDCT_US", pref=False),
        _atom("C9000003", "Tension pneumothorax", sab="SNOMEDCT_US"),
        _atom("C9000004", "Chest tube"),
        _atom("C9000004", "PTX", pref=False),                                          # clash with C0032326
        _atom("C9000005", "Sodium chloride"),                                          # filtered semantic type
        _atom("C9000006", "Neumotórax", sab="MSHSPA", lat="SPA"),                      # no English atom
        _atom("C9000007", "Retired finding", suppress="E"),                            # only suppressed atoms
        _atom("C9000008", "Effusion"),
        _atom("C9000008", "Fluid collection", pref=False),
    ]
    (meta / "MRCONSO.RRF").write_text(_rrf(MRCONSO, atoms), encoding="utf-8")
    defs = [{"CUI": "C0032326", "AUI": "A2", "ATUI": "AT2", "SAB": "SNOMEDCT_US", "DEF": "Second choice.",
             "SUPPRESS": "N"},
            {"CUI": "C0032326", "AUI": "A1", "ATUI": "AT1", "SAB": "MSH",
             "DEF": "Air in the <b>pleural</b>\tspace.", "SUPPRESS": "N"},
            {"CUI": "C9000003", "AUI": "A3", "ATUI": "AT3", "SAB": "NCI", "DEF": "Pneumothorax under pressure.",
             "SUPPRESS": "N"},
            {"CUI": "C9000003", "AUI": "A4", "ATUI": "AT4", "SAB": "MSH", "DEF": "Suppressed definition.",
             "SUPPRESS": "O"},
            {"CUI": "C9000005", "AUI": "A5", "ATUI": "AT5", "SAB": "MSH", "DEF": "Filtered.", "SUPPRESS": "N"}]
    (meta / "MRDEF.RRF").write_text(_rrf(MRDEF, defs), encoding="utf-8")
    rels = [_rel("C0032326", "CHD", "C9000003", "isa"),                # C9000003 is_a C0032326
            _rel("C9000003", "PAR", "C0032326", "inverse_isa"),        # the same, seen from the child
            _rel("C9000002", "RO", "C0032326", "has_finding_site"),    # C0032326 finding_site C9000002
            _rel("C0032326", "RO", "C9000004", "associated_with", sab="MSH"),  # C9000004 associated_with C0032326
            _rel("C9000002", "PAR", "C9000008"),                       # no RELA: C9000002 is_a C9000008
            _rel("C0032326", "CHD", "C9000005", "isa"),                # target not kept
            _rel("C9000002", "CHD", "C9000003", "isa", suppress="O"),  # suppressed
            _rel("C0032326", "SY", "C9000004")]                        # unmapped relation
    (meta / "MRREL.RRF").write_text(_rrf(MRREL, rels), encoding="utf-8")
    (tmp_path / "2099AA" / "release.dat").write_text("umls.release.name=2099AA\n")
    return meta


def test_rrf_column_orders_match_the_reference_manual():
    assert list(umls.MRCONSO_COLUMNS) == MRCONSO and len(MRCONSO) == 18
    assert list(umls.MRSTY_COLUMNS) == MRSTY and len(MRSTY) == 6
    assert list(umls.MRREL_COLUMNS) == MRREL and len(MRREL) == 16
    assert list(umls.MRDEF_COLUMNS) == MRDEF and len(MRDEF) == 8


def test_umls_import_produces_expected_kb(umls_dir):
    result = umls.read_umls(umls_dir.parent)  # the release dir: META/ is found
    got = {c.id: c for c in result.concepts}
    assert sorted(got) == ["C0032326", "C9000002", "C9000003", "C9000004", "C9000008"]
    ptx = got["C0032326"]
    assert (ptx.name, ptx.aliases, ptx.semantic_type) == ("Pneumothorax", ("PTX",), "disease")
    assert ptx.definition == "Air in the pleural space."
    assert [(r.type, r.target) for r in ptx.relations] == [("finding_site", "C9000002")]
    assert ptx.label is None and ptx.sources == ("umls", "umls:MSH", "umls:SNOMEDCT_US")
    assert (got["C9000002"].name, got["C9000002"].aliases, got["C9000002"].semantic_type) == ("Pleura", (), "anatomy")
    assert [(r.type, r.target) for r in got["C9000002"].relations] == [("is_a", "C9000008")]
    tension = got["C9000003"]
    assert tension.name == "Tension pneumothorax" and tension.aliases == ("Pneumothorax, tension",)
    assert tension.semantic_type == "disease" and tension.definition == "Pneumothorax under pressure."
    assert [(r.type, r.target) for r in tension.relations] == [("is_a", "C0032326")]
    tube = got["C9000004"]
    assert tube.semantic_type == "device" and tube.aliases == () and tube.definition == ""
    assert [(r.type, r.target) for r in tube.relations] == [("associated_with", "C0032326")]
    assert result.stats["alias_clashes"] == 1 and result.clashes[0]["alias"] == "ptx"
    assert result.stats["mrconso_skipped"] == {"language": 2, "suppressed": 2, "sab": 0}
    kb = KnowledgeBase(result.concepts)
    assert kb.text_for("C9000004") == "Chest tube" and kb.by_alias("ptx").id == "C0032326"


def test_umls_import_filters_by_sab_and_tui(umls_dir):
    only_msh = {c.id: c for c in umls.read_umls(umls_dir, sabs=["MSH"]).concepts}
    assert sorted(only_msh) == ["C0032326", "C9000002", "C9000004", "C9000008"]
    assert only_msh["C0032326"].aliases == () and only_msh["C9000004"].aliases == ("PTX",)
    assert only_msh["C0032326"].relations == () and only_msh["C9000004"].relations[0].target == "C0032326"
    anatomy = umls.read_umls(umls_dir, tuis=["T023"]).concepts
    assert [c.id for c in anatomy] == ["C9000002"] and anatomy[0].relations == ()
    with pytest.raises(umls.UMLSError, match="T999"):
        umls.read_umls(umls_dir, tuis=["T999"])


def test_umls_cli_writes_and_merges(umls_dir, tmp_path):
    out = tmp_path / "umls_kb.jsonl"
    cmd = [sys.executable, str(ROOT / "maintainer" / "umls_to_kb.py"), "--umls-dir", str(umls_dir), "--out", str(out),
           "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    kb = load_kb(out)
    assert len(kb) == 5 and kb.version == "umls-2099AA"
    assert [c.to_json() for c in kb] == [c.to_json() for c in umls.read_umls(umls_dir).concepts]

    proc = subprocess.run(cmd + ["--merge-packaged"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    merged, packaged = load_kb(out), load_kb()
    assert len(merged) == len(packaged) + 4
    ptx = merged["C0032326"]
    assert ptx.name == "pneumothorax" and ptx.label == "pneumothorax"            # packaged fields win
    assert ("finding_site", "C9000002") in {(r.type, r.target) for r in ptx.relations}
    assert merged.by_alias("effusion").id == "C0032227"                           # packaged alias kept ...
    assert merged["C9000008"].name == "Fluid collection"                          # ... UMLS concept renamed
    assert merged.by_alias("PTX").id == "C0032326"


def test_umls_missing_file_and_malformed_line(umls_dir, tmp_path):
    (umls_dir / "MRDEF.RRF").unlink()
    with pytest.raises(umls.UMLSError, match=r"missing.*MRDEF\.RRF"):
        umls.read_umls(umls_dir)
    proc = subprocess.run([sys.executable, str(ROOT / "maintainer" / "umls_to_kb.py"), "--umls-dir", str(umls_dir),
                           "--out", str(tmp_path / "x.jsonl")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "MRDEF.RRF" in proc.stderr and not (tmp_path / "x.jsonl").exists()
    with pytest.raises(umls.UMLSError, match="UMLS directory not found"):
        umls.read_umls(tmp_path / "nowhere")

    (umls_dir / "MRDEF.RRF").write_text("", encoding="utf-8")
    lines = (umls_dir / "MRCONSO.RRF").read_text(encoding="utf-8").splitlines()
    lines[2] = lines[2].replace("|MSH", "", 1) if "|MSH" in lines[2] else lines[2][:-1]
    (umls_dir / "MRCONSO.RRF").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(umls.UMLSError, match=r"MRCONSO\.RRF:3: malformed line: expected 18"):
        umls.read_umls(umls_dir)
