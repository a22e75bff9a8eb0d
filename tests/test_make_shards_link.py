"""make_shards --link: CSV reports are linked to the knowledge base; entities fill the shard json
and, for rows without label values, the labels are derived from them."""
import json
import subprocess
import sys

import pytest
import webdataset as wds
from PIL import Image

from conftest import ROOT

pytest.importorskip("scispacy", reason="scispacy is not installed (pip install -e .)")


def test_csv_reports_are_linked_and_labelled(tmp_path):
    for name in ("a", "b"):
        Image.new("L", (40, 40), 90).save(tmp_path / f"{name}.png")
    (tmp_path / "studies.csv").write_text(
        "image,report\n"
        "a.png,FINDINGS: Small left pleural effusion. No pneumothorax. IMPRESSION: Effusion.\n"
        "b.png,FINDINGS: The lungs are clear. Heart size is normal. IMPRESSION: No acute process.\n")
    out = tmp_path / "shards"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "make_shards.py"), "csv", "--csv",
                        str(tmp_path / "studies.csv"), "--out", str(out), "--image-size", "32", "--link", "--quiet"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    docs = {}
    for sample in wds.WebDataset(str(out / "shard-000000.tar"), shardshuffle=False):
        doc = json.loads(sample["json"])
        docs[doc["id"]] = (doc, sample["txt"].decode())
    doc, text = docs["a"]
    names = {(e["name"], e["negated"]) for e in doc["entities"]}
    assert ("pleural effusion", False) in names and ("pneumothorax", True) in names
    for e in doc["entities"]:
        assert text[e["start"]:e["end"]]  # spans index the stored report text
    assert doc["labels"]["pleural_effusion"] == 1 and doc["labels"]["pneumothorax"] == 0
    assert doc["labels"]["no_finding"] == 0
    assert docs["b"][0]["labels"]["no_finding"] == 1
    assert "pleural_effusion" in json.loads((out / "manifest.json").read_text())["label_names"]
