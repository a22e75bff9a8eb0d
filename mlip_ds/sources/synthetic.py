"""Seeded synthetic chest radiographs (PA phantoms) with free-text reports: the built-in demo/test data.

Why a phantom rather than a toy: the pipeline (shards -> batches -> contrastive pretraining -> linear
probe) should be exercised on data whose image content and report text agree the way real CXR
data does, so a model that learns something here learns the right kind of thing. Every finding is
drawn as its radiographic pattern (meniscus, lucent rim with pleural line, bat-wing haze, ...), with
laterality and severity that the report states in words, and labels that follow the CheXpert
convention (1 stated, -1 stated with uncertainty, 0 absent) so the "U-Ones" mapping gives the truth.

Determinism: a sample depends only on (seed, index, size). All random draws come from
``np.random.default_rng([seed, index])`` and the draws that decide anatomy, findings and text are
made before (and independently of) anything that depends on ``size``, so the same (seed, index) at
64, 128 or 256 px has the same findings, labels and report.

Conventions: patient's left is image right (radiographic convention). Geometry is built in
normalised coordinates (u to the right, v down, both in [0, 1]) and rasterised at an internal
resolution of at least 160 px (supersampled, then box-reduced) so small sizes stay anti-aliased.
A bbox is [x0, y0, x1, y1] in output pixels with exclusive ends (``seg[y0:y1, x0:x1]``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from mlip_ds.data.schema import FINDINGS, NO_FINDING

GENERATOR_VERSION = 1

# UMLS concept ids of the canonical finding names (entity "cui").
CUIS = {
    "atelectasis": "C0004144",
    "cardiomegaly": "C0018800",
    "consolidation": "C0521530",
    "edema": "C0034063",
    "nodule": "C0034079",
    "pleural_effusion": "C0032227",
    "pneumonia": "C0032285",
    "pneumothorax": "C0032326",
}

# Visual patterns the sampler picks from (pneumonia rides on consolidation) and their weights.
PATTERNS = ("atelectasis", "cardiomegaly", "consolidation", "edema", "nodule", "pleural_effusion", "pneumothorax")
PATTERN_WEIGHTS = (1.0, 1.0, 1.1, 0.7, 0.8, 1.2, 0.7)
P_NORMAL = 0.33
N_FINDINGS_P = (0.5, 0.32, 0.18)  # P(1, 2, 3 findings) for abnormal studies
SEVERITIES = ("mild", "moderate", "severe")
SEVERITY_P = (0.4, 0.35, 0.25)
P_UNCERTAIN_MILD = 0.4  # a mild finding is hedged this often (label -1)
# laterality choices: (right, left, bilateral) probabilities; None = no laterality
LATERALITY_P = {
    "atelectasis": (0.35, 0.35, 0.3),
    "consolidation": (0.42, 0.4, 0.18),
    "nodule": (0.5, 0.5, 0.0),
    "pleural_effusion": (0.38, 0.37, 0.25),
    "pneumothorax": (0.5, 0.5, 0.0),
    "edema": (0.0, 0.0, 1.0),
    "cardiomegaly": None,
}

# ---------------------------------------------------------------------------------------------
# Report vocabulary. Templates: "{sev}" severity adjective, "{sevly}" adverb, "{side}" laterality
# word, "{zone}" lung zone, "{mm}" nodule size; "[...]" marks the entity mention (span recorded).
# ---------------------------------------------------------------------------------------------
SEVERITY_ADJ = {
    "pleural_effusion": {"mild": ("small",), "moderate": ("moderate", "moderate-sized"), "severe": ("large",)},
    "pneumothorax": {"mild": ("small",), "moderate": ("moderate", "moderate-sized"), "severe": ("large",)},
    "cardiomegaly": {"mild": ("mild",), "moderate": ("moderate",), "severe": ("marked", "severe")},
    "consolidation": {"mild": ("mild", "small"), "moderate": ("moderate",), "severe": ("extensive", "dense")},
    "edema": {"mild": ("mild",), "moderate": ("moderate",), "severe": ("severe", "marked")},
    "atelectasis": {"mild": ("mild", "minimal"), "moderate": ("moderate",), "severe": ("extensive", "severe")},
    "nodule": {"mild": ("small",), "moderate": ("moderate-sized", "medium-sized"), "severe": ("large",)},
}
SEVERITY_ADV = {"mild": ("mildly",), "moderate": ("moderately",), "severe": ("markedly", "severely")}
# Every word that signals a severity level (adjectives, adverbs, hedges); used by tests / consumers.
SEVERITY_CUES = {
    f: {s: tuple(adj[s]) + SEVERITY_ADV[s] + (("minimal", "early", "subtle", "borderline", "small", "mild")
                                               if s == "mild" else ())
        for s in SEVERITIES}
    for f, adj in SEVERITY_ADJ.items()
}
SEVERITY_CUES["pneumonia"] = SEVERITY_CUES["consolidation"]
LATERALITY_CUES = {"left": ("left",), "right": ("right",), "bilateral": ("bilateral", "bibasilar", "both")}
ZONE_WORDS = {
    "upper": ("upper zone", "upper lobe", "upper lung"),
    "mid": ("mid zone", "mid lung"),
    "lower": ("lower zone", "lower lobe", "lung base"),
}
# Words of each finding that an entity span contains (canonical name -> lower-case stems).
FINDING_TERMS = {
    "atelectasis": ("atelecta",),
    "cardiomegaly": ("cardiomegaly", "heart", "cardiac", "cardiomediastinal"),
    "consolidation": ("consolidation", "airspace opacit"),
    "edema": ("edema",),
    "nodule": ("nodul",),
    "pleural_effusion": ("effusion",),
    "pneumonia": ("pneumonia",),
    "pneumothorax": ("pneumothorax",),
}

POSITIVE = {  # certain statements, FINDINGS section
    ("pleural_effusion", "uni"): (
        "There is a {sev} {side} [pleural effusion].",
        "{sev} {side} [pleural effusion] with blunting of the costophrenic angle.",
        "Blunting of the {side} costophrenic angle with a meniscus, consistent with a {sev} [pleural effusion].",
        "A {sev} {side} [effusion] layers at the lung base.",
    ),
    ("pleural_effusion", "bi"): (
        "There are {sev} bilateral [pleural effusions].",
        "{sev} bilateral [pleural effusions] blunt both costophrenic angles.",
        "Bilateral {sev} [effusions] are present.",
    ),
    ("pneumothorax", "uni"): (
        "There is a {sev} {side} [pneumothorax].",
        "A {sev} {side} apical [pneumothorax] is present with a visible pleural line.",
        "{sev} {side} [pneumothorax]; the visceral pleural line is separated from the chest wall.",
        "Visible pleural line at the {side} apex with absent lung markings peripherally, consistent with a {sev} [pneumothorax].",
    ),
    ("cardiomegaly", "any"): (
        "The [heart is {sevly} enlarged].",
        "There is {sev} [cardiomegaly].",
        "{sev} [cardiomegaly].",
        "The [cardiac silhouette is {sevly} enlarged].",
        "{sev} enlargement of the [cardiac silhouette].",
    ),
    ("consolidation", "uni"): (
        "There is {sev} patchy airspace [consolidation] in the {side} {zone}.",
        "{sev} patchy [airspace opacity] in the {side} {zone}.",
        "Focal {sev} [consolidation] is seen in the {side} {zone}.",
        "{sev} [consolidation] involving the {side} {zone}.",
    ),
    ("consolidation", "bi"): (
        "{sev} patchy bilateral [airspace opacities] in the {zone}s.",
        "There is {sev} bilateral [consolidation] in the {zone}s.",
        "{sev} [consolidation] in both {zone}s.",
    ),
    ("edema", "bi"): (
        "{sev} bilateral perihilar haziness consistent with [pulmonary edema].",
        "There is {sev} [pulmonary edema] with bilateral perihilar opacities.",
        "Hazy bilateral perihilar opacities in a bat-wing distribution, consistent with {sev} [pulmonary edema].",
        "{sev} [interstitial edema] with bilateral indistinct vascular markings.",
    ),
    ("atelectasis", "uni"): (
        "{sev} plate-like [atelectasis] in the {side} {zone}.",
        "There is {sev} linear [atelectasis] in the {side} {zone}.",
        "Band-like opacity in the {side} {zone}, consistent with {sev} [atelectasis].",
        "{sev} [subsegmental atelectasis] in the {side} {zone}.",
    ),
    ("atelectasis", "bi"): (
        "{sev} bibasilar [atelectasis].",
        "{sev} bilateral plate-like [atelectasis].",
        "There is {sev} bilateral linear [atelectasis] in the {zone}s.",
    ),
    ("nodule", "uni"): (
        "There is a {sev} {mm} mm [nodule] in the {side} {zone}.",
        "A {sev} {mm} mm [pulmonary nodule] projects over the {side} {zone}.",
        "{sev} rounded [nodular opacity] in the {side} {zone}, measuring {mm} mm.",
        "Well-circumscribed {sev} [nodule] in the {side} {zone}, {mm} mm.",
    ),
}
UNCERTAIN = {  # hedged statements (mild findings only), FINDINGS section
    ("pleural_effusion", "uni"): (
        "Possible small {side} [pleural effusion].",
        "Minimal blunting of the {side} costophrenic angle may reflect a small [pleural effusion].",
        "Cannot exclude a small {side} [pleural effusion].",
    ),
    ("pleural_effusion", "bi"): (
        "Possible small bilateral [pleural effusions].",
        "Minimal blunting of both costophrenic angles, possibly small bilateral [effusions].",
    ),
    ("pneumothorax", "uni"): (
        "Possible small {side} apical [pneumothorax].",
        "Questionable small {side} apical [pneumothorax]; a skin fold could look similar.",
    ),
    ("cardiomegaly", "any"): (
        "Possible mild [cardiomegaly].",
        "The [heart size is borderline], possibly mildly enlarged.",
    ),
    ("consolidation", "uni"): (
        "Cannot exclude subtle early [consolidation] in the {side} {zone}.",
        "Possible mild [airspace opacity] in the {side} {zone}.",
    ),
    ("consolidation", "bi"): (
        "Possible mild bilateral [airspace opacities] in the {zone}s.",
        "Cannot exclude early bilateral [consolidation] in the {zone}s.",
    ),
    ("edema", "bi"): (
        "Possible mild bilateral [interstitial edema].",
        "Mild bilateral perihilar haziness may represent early [pulmonary edema].",
    ),
    ("atelectasis", "uni"): (
        "Possible minimal [atelectasis] in the {side} {zone}.",
        "Mild {side} {zone} opacity, likely [atelectasis].",
    ),
    ("atelectasis", "bi"): (
        "Possible mild bibasilar [atelectasis].",
    ),
    ("nodule", "uni"): (
        "Possible small {mm} mm [nodule] in the {side} {zone}; a nipple shadow could look similar.",
        "Questionable small [nodular opacity] in the {side} {zone}, measuring {mm} mm.",
    ),
}
IMPRESSION_POSITIVE = {
    ("pleural_effusion", "uni"): ("{sev} {side} [pleural effusion].", "{sev} {side} [effusion]."),
    ("pleural_effusion", "bi"): ("{sev} bilateral [pleural effusions].",),
    ("pneumothorax", "uni"): ("{sev} {side} [pneumothorax].", "{sev} {side} [pneumothorax]; clinical correlation advised."),
    ("cardiomegaly", "any"): ("{sev} [cardiomegaly].", "{sev} [cardiac enlargement]."),
    ("consolidation", "uni"): ("{sev} {side} {zone} [consolidation]{pna}.", "{sev} [airspace opacity] in the {side} {zone}{pna}."),
    ("consolidation", "bi"): ("{sev} bilateral {zone} [consolidation]{pna}.",),
    ("edema", "bi"): ("{sev} [pulmonary edema] with bilateral perihilar haziness.", "{sev} bilateral [pulmonary edema]."),
    ("atelectasis", "uni"): ("{sev} {side} {zone} [atelectasis].",),
    ("atelectasis", "bi"): ("{sev} bibasilar [atelectasis].",),
    ("nodule", "uni"): (
        "{sev} {mm} mm {side} {zone} [nodule]; recommend CT for further characterization.",
        "{sev} {side} [pulmonary nodule] ({mm} mm); nonemergent chest CT recommended.",
    ),
}
IMPRESSION_UNCERTAIN = {
    ("pleural_effusion", "uni"): ("Possible small {side} [pleural effusion].",),
    ("pleural_effusion", "bi"): ("Possible small bilateral [pleural effusions].",),
    ("pneumothorax", "uni"): ("Possible small {side} [pneumothorax]; recommend repeat radiograph.",),
    ("cardiomegaly", "any"): ("Borderline [heart size], possibly mild [cardiomegaly].",),
    ("consolidation", "uni"): ("Possible early {side} {zone} [consolidation]; [pneumonia] cannot be excluded.",),
    ("consolidation", "bi"): ("Possible early bilateral [consolidation]; [pneumonia] cannot be excluded.",),
    ("edema", "bi"): ("Possible mild bilateral [pulmonary edema].",),
    ("atelectasis", "uni"): ("Possible minimal {side} {zone} [atelectasis].",),
    ("atelectasis", "bi"): ("Possible mild bibasilar [atelectasis].",),
    ("nodule", "uni"): ("Possible small {side} [nodule]; consider repeat PA view with nipple markers.",),
}
PNEUMONIA_SUFFIX = {  # appended to a certain consolidation statement; label of pneumonia -> phrasings
    1: (", consistent with [pneumonia]", ", compatible with [pneumonia]"),
    -1: (", which may represent [pneumonia]", ", concerning for [pneumonia]", "; [pneumonia] is a consideration"),
}
NEGATION = {  # statements about absent findings; keys are the findings they negate
    ("pleural_effusion", "pneumothorax"): (
        "No [pleural effusion] or [pneumothorax].",
        "There is no [pleural effusion] or [pneumothorax].",
        "No [pneumothorax] or [pleural effusion] is seen.",
    ),
    ("pleural_effusion",): ("No [pleural effusion].", "There is no [pleural effusion].",
                            "The costophrenic angles are sharp; no [pleural effusion]."),
    ("pneumothorax",): ("No [pneumothorax].", "There is no [pneumothorax].", "No evidence of [pneumothorax]."),
    ("cardiomegaly",): ("[Heart size] is normal.", "The [cardiac silhouette] is normal in size.", "Normal [heart size].",
                        "The [cardiomediastinal silhouette] is within normal limits."),
    ("consolidation", "pneumonia"): ("No focal [consolidation] to suggest [pneumonia].",
                                     "No [consolidation] or other findings of [pneumonia]."),
    ("consolidation",): ("No focal [consolidation].", "There is no focal [consolidation]."),
    ("pneumonia",): ("No radiographic evidence of [pneumonia].",),
    ("edema",): ("No [pulmonary edema].", "No evidence of [pulmonary edema].",
                 "Pulmonary vascularity is normal without [edema]."),
    ("atelectasis",): ("No [atelectasis].", "No focal [atelectasis]."),
    ("nodule",): ("No suspicious pulmonary [nodules].", "No focal [nodule] or mass is identified."),
}
P_NEGATE = {"pleural_effusion": 0.75, "pneumothorax": 0.75, "cardiomegaly": 0.8, "consolidation": 0.6,
            "pneumonia": 0.25, "edema": 0.4, "atelectasis": 0.15, "nodule": 0.2}
NORMAL_STATEMENTS = {
    "intro": ("PA view of the chest.", "Frontal view of the chest.", "PA radiograph of the chest."),
    "lungs_clear": ("The lungs are clear.", "Lungs are clear bilaterally.", "The lungs are well expanded and clear."),
    "mediastinum": ("The mediastinal contours are normal.", "Mediastinal and hilar contours are unremarkable.",
                    "Mediastinal contours are within normal limits."),
    "bones": ("The osseous structures are intact.", "No acute osseous abnormality.",
              "Visualized osseous structures are unremarkable."),
    "abdomen": ("The visualized upper abdomen is unremarkable.", "No free air under the diaphragm."),
}
IMPRESSION_NORMAL = (
    "No acute cardiopulmonary process.", "No acute cardiopulmonary abnormality.", "Normal chest radiograph.",
    "No acute intrathoracic process.", "No radiographic evidence of acute cardiopulmonary disease.",
)
NODULE_MM = {"mild": (10, 14), "moderate": (15, 20), "severe": (21, 28)}  # range per severity, ~ drawn size


@dataclass
class SyntheticSample:
    key: str
    image: np.ndarray
    report: str
    sections: dict
    labels: dict
    entities: list
    findings: list
    seg: np.ndarray
    meta: dict = field(default_factory=dict)


# =============================================================================================
# Scene sampling (size-independent)
# =============================================================================================
def _choice(rng, seq, p=None):
    """rng.choice that returns the element itself (also for tuples of strings)."""
    return seq[int(rng.choice(len(seq), p=p))]


def _lung_polygon(side: int, a: dict, n: int = 14) -> np.ndarray:
    """Outline of one lung (side 0 = image left = patient right) as (k, 2) normalised points.

    Apex arc -> lateral wall -> sharp costophrenic angle -> diaphragm dome -> medial border."""
    L, M, Mb, ax = a["lat"], a["med"], a["med_base"], a["apex_x"]
    va, vcp, dh = a["v_apex"], a["v_cp"][side], a["dome_h"][side]
    vmed = vcp - 0.035 - 0.75 * dh  # medial end of the dome meets the heart (cardiophrenic angle)
    vw = a["v_widest"]
    t = np.linspace(0.0, 1.0, n)
    th = t * np.pi / 2
    p1 = np.stack([ax - (ax - L) * np.sin(th), va + (vw - va) * (1 - np.cos(th))], 1)          # apex -> widest
    p2 = np.stack([L + 0.018 * t[1:] ** 2, vw + (vcp - vw) * t[1:]], 1)                          # lateral wall
    xd = L + 0.018 + (Mb - L - 0.018) * t[1:]
    p3 = np.stack([xd, vcp + (vmed - vcp) * t[1:] - dh * np.sin(np.pi * t[1:] * 0.9) ** 0.6], 1)  # dome
    vtop = va + 0.07
    p4 = np.stack([Mb - (Mb - M) * t[1:] - 0.012 * np.sin(np.pi * t[1:]), vmed + (vtop - vmed) * t[1:]], 1)
    p5 = np.stack([M - (M - ax) * np.sin(th[1:-1]), vtop - (vtop - va) * np.sin(th[1:-1])], 1)  # medial apex
    pts = np.concatenate([p1, p2, p3, p4, p5])
    if side == 1:
        pts = pts.copy()
        pts[:, 0] = 1.0 - pts[:, 0]
    return pts


def _inside(poly: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Vectorised even-odd point-in-polygon test (pts (m, 2), poly (k, 2))."""
    x, y = pts[:, 0:1], pts[:, 1:2]
    x0, y0 = poly[:, 0][None], poly[:, 1][None]
    x1, y1 = np.roll(poly[:, 0], -1)[None], np.roll(poly[:, 1], -1)[None]
    cond = (y0 > y) != (y1 > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        xi = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
    return (np.sum(cond & (x < xi), axis=1) % 2) == 1


def _in_heart(a: dict, pts: np.ndarray, margin: float = 0.02) -> np.ndarray:
    h = a["heart"]
    c, s = math.cos(h["theta"]), math.sin(h["theta"])
    dx, dy = pts[:, 0] - h["cx"], pts[:, 1] - h["cy"]
    xr, yr = c * dx + s * dy, -s * dx + c * dy
    return (xr / (h["a"] + margin)) ** 2 + (yr / (h["b"] + margin)) ** 2 <= 1.0


def _zone_of(a: dict, side: int, v: float) -> str:
    r = (v - a["v_apex"]) / (a["v_cp"][side] - a["v_apex"])
    return "upper" if r < 0.36 else ("mid" if r < 0.64 else "lower")


def _place(rng, a: dict, side: int, zone: str | None, n: int = 24, avoid_heart: bool = True):
    """A point inside one lung (optionally a given zone), away from the heart: fixed number of draws."""
    va, vcp = a["v_apex"], a["v_cp"][side]
    h = vcp - va
    lo, hi = {"upper": (0.1, 0.33), "mid": (0.38, 0.62), "lower": (0.67, 0.8), None: (0.1, 0.8)}[zone]
    cand = np.stack([rng.uniform(a["lat"] + 0.04, a["med"] - 0.03, n), va + h * rng.uniform(lo, hi, n)], 1)
    if side == 1:
        cand[:, 0] = 1.0 - cand[:, 0]
    poly = a["lungs"][side]
    ok = _inside(poly, cand) & _inside(poly, cand + [0.03, 0.0]) & _inside(poly, cand - [0.03, 0.0])
    ok &= _inside(poly, cand + [0.0, 0.03])
    if avoid_heart:
        ok &= ~_in_heart(a, cand)
    idx = np.flatnonzero(ok)
    if len(idx):
        return cand[idx[0]]
    u = a["lat"] + 0.08 if side == 0 else 1.0 - a["lat"] - 0.08
    return np.array([u, va + h * (lo + hi) / 2])


def _sample_anatomy(rng) -> dict:
    """Patient build, pose and acquisition parameters (all normalised / unitless)."""
    a = {}
    tw = rng.uniform(0.335, 0.375)  # half thoracic width (inner rib margins at 0.5 +- tw)
    a["tw"] = tw
    a["lat"] = 0.5 - tw
    a["med"] = rng.uniform(0.445, 0.46)
    a["med_base"] = rng.uniform(0.475, 0.49)
    a["rib_gap"] = rng.uniform(0.052, 0.058)
    a["apex_x"] = rng.uniform(0.33, 0.36)
    a["v_apex"] = rng.uniform(0.10, 0.14)
    a["v_widest"] = rng.uniform(0.48, 0.56)
    vcp = rng.uniform(0.76, 0.82)
    a["v_cp"] = (vcp, vcp + rng.uniform(0.0, 0.03))  # left hemidiaphragm usually a little lower
    a["dome_h"] = (rng.uniform(0.07, 0.11), rng.uniform(0.06, 0.10))
    a["ctr"] = rng.uniform(0.39, 0.48)
    a["heart_b"] = rng.uniform(0.105, 0.125)
    a["heart_theta"] = math.radians(rng.uniform(20, 32))
    a["heart_dy"] = rng.uniform(-0.01, 0.015)
    a["body_w"] = rng.uniform(0.45, 0.49)
    a["stomach"] = rng.uniform() < 0.6
    a["stomach_xy"] = (rng.uniform(0.64, 0.72), rng.uniform(0.03, 0.07))
    a["pose"] = dict(dx=rng.uniform(-0.03, 0.03), dy=rng.uniform(-0.03, 0.03),
                     rot=rng.uniform(-3.0, 3.0), scale=rng.uniform(0.96, 1.04))
    a["acq"] = dict(gamma=rng.uniform(0.8, 1.25), contrast=rng.uniform(0.85, 1.15), offset=rng.uniform(-0.05, 0.05),
                    blur=rng.uniform(0.5, 1.2), noise=rng.uniform(0.008, 0.028), mottle=rng.uniform(0.0, 0.03),
                    bone=rng.uniform(0.8, 1.2), vessel=rng.uniform(0.8, 1.2))
    a["lungs"] = (_lung_polygon(0, a), _lung_polygon(1, a))
    return a


def _set_heart(a: dict, ctr: float) -> None:
    """Heart ellipse with a given cardiothoracic ratio (horizontal extent / thoracic width).

    The base rests just below the diaphragm, so an enlarged heart grows up and out into the lungs."""
    th = a["heart_theta"]
    b = a["heart_b"] * (max(ctr, 0.44) / 0.44) ** 0.5
    wx = max(ctr * a["tw"], b * math.sin(th) + 0.01)  # half of the heart's horizontal extent
    ea = math.sqrt(wx ** 2 - (b * math.sin(th)) ** 2) / math.cos(th)
    hy = math.sqrt((ea * math.sin(th)) ** 2 + (b * math.cos(th)) ** 2)  # half vertical extent
    vmed = (a["v_cp"][0] + a["v_cp"][1]) / 2 - 0.035 - 0.75 * (a["dome_h"][0] + a["dome_h"][1]) / 2
    cy = vmed + 0.06 - hy + a["heart_dy"]
    cx = 0.5 + 0.34 * wx  # about a third of the heart right of the midline (patient's right)
    a["heart"] = dict(cx=cx, cy=cy, a=ea, b=b, theta=th, wx=wx, ctr=ctr)


def _vessel_segments(rng) -> list:
    """Branching vessel trees from each hilum: list of (side, level, x0, y0, x1, y1) arrays."""
    out = []
    for side in (0, 1):
        n0 = 6
        ang = np.radians(np.linspace(105, 262, n0) + rng.uniform(-10, 10, n0))
        ln = rng.uniform(0.05, 0.075, n0)
        x = np.zeros(n0)
        y = rng.uniform(-0.03, 0.03, n0)
        for lvl in range(5):
            x1, y1 = x + ln * np.cos(ang), y + ln * np.sin(ang)
            out.append((side, lvl, x, y, x1, y1))
            k = len(ang)
            spread = np.radians(rng.uniform(14, 34, (k, 2))) * np.array([1, -1])
            ang = (ang[:, None] + spread).ravel()
            ln = np.repeat(ln, 2) * rng.uniform(0.62, 0.86, 2 * k)
            x, y = np.repeat(x1, 2), np.repeat(y1, 2)
    return out


def _sample_findings(rng, a: dict) -> list:
    """Pick 0-3 visual patterns and their laterality / severity / placement parameters."""
    if rng.uniform() < P_NORMAL:
        names = []
    else:
        k = 1 + int(rng.choice(3, p=N_FINDINGS_P))
        w = np.array(PATTERN_WEIGHTS) / sum(PATTERN_WEIGHTS)
        names = sorted(rng.choice(len(PATTERNS), size=k, replace=False, p=w).tolist())
        names = [PATTERNS[i] for i in names]
    out = []
    for name in names:
        sev = _choice(rng, SEVERITIES, SEVERITY_P)
        lp = LATERALITY_P[name]
        lat = None if lp is None else _choice(rng, ("right", "left", "bilateral"), lp)
        sides = {"right": (0,), "left": (1,), "bilateral": (0, 1), None: ()}[lat]
        f = dict(name=name, laterality=lat, severity=sev, sides=sides, uncertain=False)
        if sev == "mild" and rng.uniform() < P_UNCERTAIN_MILD:
            f["uncertain"] = True
        if name == "cardiomegaly":
            f["ctr"] = rng.uniform(*((0.54, 0.58), (0.59, 0.64), (0.65, 0.72))[SEVERITIES.index(sev)])
            a["ctr"] = f["ctr"]
        out.append(f)
    _set_heart(a, a["ctr"])  # before placing lesions, which keep off the heart
    for f in out:
        name, sides, lat = f["name"], f["sides"], f["laterality"]
        si = SEVERITIES.index(f["severity"])
        sev = f["severity"]
        if name == "pleural_effusion":
            f["rise"] = [rng.uniform(0.05, 0.08) + 0.015 * si for _ in (0, 1)]
            f["level"] = [rng.uniform(*((0.055, 0.075), (0.13, 0.17), (0.25, 0.32))[si]) for _ in (0, 1)]
        elif name == "pneumothorax":
            f["scale"] = rng.uniform(*((0.86, 0.9), (0.76, 0.82), (0.6, 0.68))[si])
        elif name == "consolidation":
            zone = _choice(rng, ("upper", "mid", "lower"), (0.25, 0.3, 0.45))
            f["zone"] = zone
            f["blobs"] = []
            for side in sides:
                c = _place(rng, a, side, zone)
                nb = 6 + 3 * si
                spread = (0.03, 0.042, 0.056)[si]
                f["blobs"].append(dict(
                    c=c, off=rng.normal(0, spread, (nb, 2)), sig=rng.uniform(0.6, 1.0, nb) * spread,
                    amp=(0.6, 0.78, 0.9)[si] * rng.uniform(0.9, 1.05)))
            f["pneumonia"] = -1 if (f["uncertain"] or rng.uniform() < 0.45) else 1
        elif name == "edema":
            f["amp"] = (0.35, 0.55, 0.75)[si] * rng.uniform(0.9, 1.1)
            f["sx"] = (0.07, 0.095, 0.12)[si] * rng.uniform(0.9, 1.1)
            f["sy"] = (0.09, 0.11, 0.14)[si] * rng.uniform(0.9, 1.1)
            f["kerley"] = rng.uniform(size=(2, 7, 2))
        elif name == "atelectasis":
            zone = "lower" if lat == "bilateral" else _choice(rng, ("mid", "lower"), (0.35, 0.65))
            f["zone"] = zone
            f["bands"] = []
            for side in sides:
                c = _place(rng, a, side, zone)
                f["bands"].append(dict(c=c, len=rng.uniform(0.1, 0.16) + 0.03 * si,
                                       ang=math.radians(rng.uniform(-14, 14)),
                                       thick=(0.014, 0.021, 0.03)[si] * rng.uniform(0.9, 1.1),
                                       bend=rng.uniform(-0.012, 0.012)))
        elif name == "nodule":
            side = sides[0]
            c = _place(rng, a, side, None)
            f["zone"] = _zone_of(a, side, c[1])
            f["c"] = c
            lo, hi = NODULE_MM[sev]
            f["mm"] = int(rng.integers(lo, hi + 1))
            f["r"] = f["mm"] * 0.00075  # radius; the image spans ~ 33 cm
    return out


# =============================================================================================
# Report text (size-independent)
# =============================================================================================
def _fill(template: str, fields: dict, ents: list) -> tuple:
    """Format a template, strip "[...]" entity markers, capitalise; return (text, [(s, e, name, neg, unc)])."""
    text = template.format(**fields)
    spans, out, pos, k = [], [], 0, 0
    while True:
        i = text.find("[", pos)
        if i < 0:
            out.append(text[pos:])
            break
        j = text.index("]", i)
        out.append(text[pos:i])
        start = sum(len(s) for s in out)
        out.append(text[i + 1:j])
        name, neg, unc = ents[k]
        spans.append((start, start + j - i - 1, name, neg, unc))
        k += 1
        pos = j + 1
    text = "".join(out)
    text = text[:1].upper() + text[1:]
    return text, spans


def _fields(rng, f: dict) -> dict:
    name, sev = f["name"], f["severity"]
    d = {"sev": _choice(rng, SEVERITY_ADJ[name][sev]), "sevly": _choice(rng, SEVERITY_ADV[sev]),
         "side": f["laterality"] or "", "pna": ""}
    if "zone" in f:
        d["zone"] = _choice(rng, ZONE_WORDS[f["zone"]])
    if "mm" in f:
        d["mm"] = f["mm"]
    return d


def _statement(rng, f: dict, section: str, pna_label: int | None) -> tuple:
    """One sentence stating a present finding (certain or hedged) in FINDINGS or IMPRESSION."""
    name = f["name"]
    kind = "any" if f["laterality"] is None else ("bi" if f["laterality"] == "bilateral" else "uni")
    unc = f["uncertain"]
    table = {("findings", False): POSITIVE, ("findings", True): UNCERTAIN,
             ("impression", False): IMPRESSION_POSITIVE, ("impression", True): IMPRESSION_UNCERTAIN}[section, unc]
    tpl = _choice(rng, table[name, kind])
    if "{pna}" in tpl:  # certain consolidation in the impression always names pneumonia (certain or not)
        tpl = tpl.replace("{pna}", _choice(rng, PNEUMONIA_SUFFIX[pna_label]))
    elif name == "consolidation" and not unc and section == "findings" and rng.uniform() < 0.3:
        tpl = tpl[:-1] + _choice(rng, PNEUMONIA_SUFFIX[pna_label]) + "."
    ents = []
    for m in tpl.split("[")[1:]:
        if "pneumonia" in m.split("]")[0]:
            ents.append(("pneumonia", False, pna_label == -1))
        else:
            ents.append((name, False, unc))
    return _fill(tpl, _fields(rng, f), ents)


def _join(sentences: list) -> tuple:
    """Join (text, spans) sentences with single spaces, shifting spans."""
    text, spans = "", []
    for s, sp in sentences:
        if text:
            text += " "
        off = len(text)
        text += s
        spans += [(a + off, b + off, n, g, u) for a, b, n, g, u in sp]
    return text, spans


def _write_report(rng, findings: list) -> tuple:
    """FINDINGS + IMPRESSION text and entity spans for the sampled findings."""
    present = {f["name"]: f for f in findings}
    pna = present["consolidation"]["pneumonia"] if "consolidation" in present else None
    absent = [n for n in FINDINGS if n not in present and not (n == "pneumonia" and pna is not None)]
    groups = {"lungs": [], "pleura": [], "heart": [], "other": []}
    group_of = {"consolidation": "lungs", "edema": "lungs", "atelectasis": "lungs", "nodule": "lungs",
                "pleural_effusion": "pleura", "pneumothorax": "pleura", "cardiomegaly": "heart", "pneumonia": "lungs"}
    for f in findings:
        groups[group_of[f["name"]]].append(_statement(rng, f, "findings", pna))
    # negations of absent findings
    neg = [n for n in absent if rng.uniform() < P_NEGATE[n]]
    for combo in (("pleural_effusion", "pneumothorax"), ("consolidation", "pneumonia")):
        if all(c in neg for c in combo) and rng.uniform() < 0.6:
            neg = [n for n in neg if n not in combo] + [combo]
    for item in neg:
        key = item if isinstance(item, tuple) else (item,)
        tpl = _choice(rng, NEGATION[key])
        ents = [(n, True, False) for n in _entity_order(tpl, key)]
        groups[group_of[key[0]]].append(_fill(tpl, {}, ents))
    lung_findings = {"consolidation", "edema", "atelectasis", "nodule"} & set(present)
    if not lung_findings and rng.uniform() < 0.7:
        groups["lungs"].insert(0, (_choice(rng, NORMAL_STATEMENTS["lungs_clear"]), []))
    if rng.uniform() < 0.5:
        groups["heart"].append((_choice(rng, NORMAL_STATEMENTS["mediastinum"]), []))
    if rng.uniform() < 0.6:
        groups["other"].append((_choice(rng, NORMAL_STATEMENTS["bones"]), []))
    if rng.uniform() < 0.15:
        groups["other"].append((_choice(rng, NORMAL_STATEMENTS["abdomen"]), []))
    for g in groups.values():
        if len(g) > 1:
            order = rng.permutation(len(g))
            g[:] = [g[i] for i in order]
    order = ["lungs", "pleura", "heart", "other"]
    r = rng.uniform()
    if r < 0.25:
        order = ["heart", "lungs", "pleura", "other"]
    elif r < 0.4:
        order = ["pleura", "lungs", "heart", "other"]
    sentences = [s for g in order for s in groups[g]]
    if rng.uniform() < 0.4:
        sentences.insert(0, (_choice(rng, NORMAL_STATEMENTS["intro"]), []))
    if not sentences:
        sentences = [(_choice(rng, NORMAL_STATEMENTS["lungs_clear"]), [])]
    findings_text, f_spans = _join(sentences)

    # impression
    if not findings:
        imp = [(_choice(rng, IMPRESSION_NORMAL), [])]
    else:
        order = rng.permutation(len(findings))
        imp = [_statement(rng, findings[i], "impression", pna) for i in order]
        if len(imp) > 1 and rng.uniform() < 0.3:
            imp = [(f"{k + 1}. {t}", [(a + len(f"{k + 1}. "), b + len(f"{k + 1}. "), n, g, u) for a, b, n, g, u in sp])
                   for k, (t, sp) in enumerate(imp)]
        for n in ("pneumothorax", "pleural_effusion"):
            if n in absent and rng.uniform() < 0.2:
                tpl = _choice(rng, NEGATION[(n,)])
                imp.append(_fill(tpl, {}, [(n, True, False)]))
    impression_text, i_spans = _join(imp)
    head = "FINDINGS: "
    mid = "\n\nIMPRESSION: "
    report = head + findings_text + mid + impression_text
    off_i = len(head) + len(findings_text) + len(mid)
    entities = []
    for (s, e, n, g, u), off in [(sp, len(head)) for sp in f_spans] + [(sp, off_i) for sp in i_spans]:
        entities.append({"cui": CUIS[n], "name": n, "start": s + off, "end": e + off,
                         "negated": bool(g), "uncertain": bool(u)})
    return report, {"findings": findings_text, "impression": impression_text}, entities


def _entity_order(template: str, key: tuple) -> list:
    """Which finding each "[...]" marker of a negation template refers to, in text order."""
    out = []
    for m in template.split("[")[1:]:
        phrase = m.split("]")[0].lower()
        for n in key:
            if any(t in phrase for t in FINDING_TERMS[n]):
                out.append(n)
                break
        else:
            raise ValueError(f"template marker '{phrase}' matches none of {key}")
    return out


def _labels(findings: list) -> dict:
    labels = {n: 0 for n in FINDINGS}
    for f in findings:
        labels[f["name"]] = -1 if f["uncertain"] else 1
        if f["name"] == "consolidation":
            labels["pneumonia"] = f["pneumonia"]
    labels[NO_FINDING] = 0 if findings else 1
    return labels


# =============================================================================================
# Rendering (vectorised numpy + PIL drawing/blur)
# =============================================================================================
@lru_cache(maxsize=8)
def _grid(R: int):
    c = (np.arange(R, dtype=np.float32) + 0.5) / R
    return c[None, :], c[:, None]  # u (1, R), v (R, 1): broadcast instead of materialising


def _new_mask(R: int):
    im = Image.new("L", (R, R), 0)
    return im, ImageDraw.Draw(im)


def _arr(im) -> np.ndarray:
    return np.asarray(im, dtype=np.float32) * (1.0 / 255.0)


def _blur(im, sigma_px: float):
    return im.filter(ImageFilter.GaussianBlur(sigma_px)) if sigma_px > 0.05 else im


def _soften(im, radius_px: float):
    """One-pass box blur: enough to anti-alias drawn edges, ~3x cheaper than a Gaussian."""
    return im.filter(ImageFilter.BoxBlur(radius_px)) if radius_px > 0.05 else im


def _px(pts: np.ndarray, R: int) -> list:
    return [tuple(p) for p in (np.asarray(pts) * R).tolist()]


def _smooth(x, lo, hi):
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _g2(U, V, cx, cy, sx, sy):
    """Separable 2-D Gaussian bump (outer product of two 1-D profiles: cheap)."""
    return np.exp(-((V - float(cy)) / float(sy)) ** 2) * np.exp(-((U - float(cx)) / float(sx)) ** 2)


def _render(rng, a: dict, findings: list, R: int, vessels: list):
    """Canonical-frame brightness (float32 R x R, ~[0, 1]) and per-finding boolean region masks.

    Brightness is built like a radiograph: soft-tissue thickness adds, lung air subtracts, and
    findings act by replacing lung air ("opacity") or adding air (pneumothorax)."""
    U, V = _grid(R)
    k = R / 256.0
    acq = a["acq"]
    regions = {}
    left_half = U < 0.5  # image left = patient right (side 0)

    # body: boxy superellipse with a neck; soft tissue thicker centrally
    r = np.abs((U - 0.5) / a["body_w"]) ** 2.6 + np.abs((V - 0.64) / 0.62) ** 2.2
    neck = np.exp(-((U - 0.5) / 0.085) ** 4) * (V < 0.3)
    body_edge = np.maximum(_smooth(1.0 - r, 0.0, 0.04), neck)
    b = 0.035 + body_edge * (0.36 + 0.3 * np.sqrt(np.clip(1.0 - r, 0.0, 1.0)))

    # lungs: both polygons in one mask (they never touch), split by the midline
    lim, ld = _new_mask(R)
    for side in (0, 1):
        ld.polygon(_px(a["lungs"][side], R), fill=255)
    lung_u8 = np.asarray(lim)
    lung_any = lung_u8 > 127
    lung_hard = (lung_any & left_half, lung_any & ~left_half)
    lung = _arr(_soften(lim, 1.3 * k))
    lung_soft = (lung * left_half, lung * ~left_half)
    q = max(1, R // 64)  # the depth profile is smooth: blur at low resolution
    small = lim.reduce(q) if q > 1 else lim
    depth = _arr(_blur(small, 9.0 * k / q).resize((R, R), Image.BILINEAR))
    air = lung * (0.5 + 0.5 * np.sqrt(depth))  # thinner lung near the chest wall

    # heart (rotated ellipse), mediastinum, aortic knob
    h = a["heart"]
    c, s = math.cos(h["theta"]), math.sin(h["theta"])
    dx, dy = U - h["cx"], V - h["cy"]
    er = ((c * dx + s * dy) * (1.0 / h["a"])) ** 2 + ((c * dy - s * dx) * (1.0 / h["b"])) ** 2
    heart = np.clip((1.0 - er) * (1.0 / 0.12), 0.0, 1.0)
    vmed = (a["v_cp"][0] + a["v_cp"][1]) / 2
    med_band = np.exp(-np.abs((U - 0.5) / 0.058) ** 3) * _smooth(vmed + 0.05 - V, 0.0, 0.05)
    knob = _g2(U, V, 0.555, a["v_apex"] + 0.22, 0.029, 0.025)
    solid = np.maximum(np.maximum(heart, med_band * 0.9), knob * 0.9)
    if any(f["name"] == "cardiomegaly" for f in findings):
        regions["cardiomegaly"] = er <= 1.0
    air *= 1.0 - solid

    # vessels (lung markings) from both hila
    vim, vd = _new_mask(R)
    hila = ((a["med"] - 0.045, a["v_apex"] + 0.34), (1.0 - a["med"] + 0.045, a["v_apex"] + 0.32))
    widths = (0.009, 0.007, 0.005, 0.0037, 0.0028)
    fills = (170, 150, 125, 100, 80)
    for side, lvl, x0, y0, x1, y1 in vessels:
        sx = 1.0 if side == 0 else -1.0
        hx, hy = hila[side]
        w = max(1, int(round(widths[lvl] * R)))
        for p in zip(((hx + sx * x0) * R).tolist(), ((hy + y0) * R).tolist(),
                     ((hx + sx * x1) * R).tolist(), ((hy + y1) * R).tolist()):
            vd.line(p, fill=fills[lvl], width=w)

    opacity = np.zeros((R, R), np.float32)  # fraction of lung air replaced by fluid / tissue
    vessel_keep = np.ones((R, R), np.float32)
    extra = np.zeros((R, R), np.float32)  # direct brightness changes (pleural line, lucent rim, ...)
    no_markings = None
    for f in findings:
        name, si = f["name"], SEVERITIES.index(f["severity"])
        if name == "pleural_effusion":  # basal opacity under a meniscus that climbs the lateral wall
            m = np.zeros((R, R), bool)
            for side in f["sides"]:
                latx = a["lat"] if side == 0 else 1.0 - a["lat"]
                ve = a["v_cp"][side] - f["level"][side] - f["rise"][side] * np.exp(-np.abs(U - latx) / 0.07)
                dv = V - ve
                eff = _smooth(dv, -0.004, 0.012 + 0.01 * si) * (0.8 + 0.2 * _smooth(dv, 0.0, 0.1))
                opacity = 1.0 - (1.0 - opacity) * (1.0 - eff * lung_soft[side])
                m |= (eff > 0.5) & lung_hard[side]
            regions[name] = m
        elif name == "pneumothorax":  # lung collapses toward the hilum: lucent rim + pleural line
            side = f["sides"][0]
            poly = a["lungs"][side]
            anchor = np.array([poly[:, 0].max() if side == 0 else poly[:, 0].min(), a["v_cp"][side] - 0.06])
            coll = anchor + f["scale"] * (poly - anchor)
            cim, cd = _new_mask(R)
            cd.polygon(_px(coll, R), fill=255)
            inner = np.asarray(cim) > 127
            rim = lung_hard[side] & ~inner & (solid < 0.5)  # only seen against the lung, not the heart
            rim_im = Image.fromarray(rim.astype(np.uint8) * 255)
            rim_soft = _arr(_soften(rim_im, 1.5 * k))
            pim, pd = _new_mask(R)
            pd.line(_px(np.vstack([coll, coll[:1]]), R), fill=255, width=max(1, int(round(0.0045 * R))))
            pl = (np.asarray(pim) > 127) & (rim_soft > 0.08) & lung_hard[side] & (V < anchor[1] - 0.04)
            pl &= solid < 0.3
            extra += pl.astype(np.float32) * 0.16 - rim_soft * (1.0 - solid) * (0.06 + 0.015 * si)
            opacity = 1.0 - (1.0 - opacity) * (1.0 - (0.06 + 0.08 * si) * (inner * lung_soft[side]))
            no_markings = rim if no_markings is None else (no_markings | rim)
            regions[name] = rim
        elif name == "consolidation":  # patchy, ill-defined airspace opacity (clustered fluffy blobs)
            m = np.zeros((R, R), bool)
            mot = _lowfreq(rng, R, 10)
            fine = _lowfreq(rng, R, 28)
            for side, bl in zip(f["sides"], f["blobs"]):
                acc = np.zeros((R, R), np.float32)
                for (ox, oy), sg in zip(bl["off"], bl["sig"]):
                    acc += _g2(U, V, bl["c"][0] + ox, bl["c"][1] + oy, sg * 1.4142, sg * 1.4142)
                dens = 1.0 - np.exp(-1.6 * acc * (0.5 + mot))
                patch = dens * (0.55 + 0.45 * fine) * (bl["amp"] * lung_soft[side])
                opacity = 1.0 - (1.0 - opacity) * (1.0 - patch)
                m |= (patch > 0.3 * bl["amp"]) & lung_hard[side]
            vessel_keep *= 1.0 - 0.7 * opacity
            regions[name] = m
            regions["pneumonia"] = m
        elif name == "edema":  # bilateral perihilar (bat-wing) haze, blurred markings, Kerley lines
            mot = _lowfreq(rng, R, 12)
            haze = np.maximum(*[_g2(U, V, hx, hy + 0.03, f["sx"], f["sy"]) for hx, hy in hila])
            haze = np.clip(haze * (0.8 + 0.4 * mot), 0.0, 1.0) * (f["amp"] * lung)
            opacity = 1.0 - (1.0 - opacity) * (1.0 - haze)
            vessel_keep *= np.clip(1.0 - 1.2 * haze, 0.0, 1.0)
            regions[name] = (haze > 0.3 * f["amp"]) & lung_any
            if si >= 1:
                for side in (0, 1):
                    latx = a["lat"] if side == 0 else 1.0 - a["lat"]
                    sx = 1.0 if side == 0 else -1.0
                    for p, qq in f["kerley"][side]:
                        y = (a["v_cp"][side] - 0.05 - 0.15 * p) * R
                        x0 = (latx + sx * (0.005 + 0.01 * qq)) * R
                        vd.line([(x0, y), (x0 + sx * 0.03 * R, y)], fill=110, width=max(1, int(round(0.004 * R))))
        elif name == "atelectasis":  # plate-like band
            im, d = _new_mask(R)
            for bd in f["bands"]:
                cx, cy = bd["c"]
                ex, ey = 0.5 * bd["len"] * math.cos(bd["ang"]), 0.5 * bd["len"] * math.sin(bd["ang"])
                bx, by = -ey / bd["len"] * 2 * bd["bend"], ex / bd["len"] * 2 * bd["bend"]  # gentle curve
                tt = np.linspace(-1.0, 1.0, 7)
                xs, ys = cx + ex * tt + bx * (1 - tt ** 2), cy + ey * tt + by * (1 - tt ** 2)
                d.line(_px(np.stack([xs, ys], 1), R), fill=255, width=max(1, int(round(bd["thick"] * R))))
            line = _arr(_blur(im, 1.6 * k))
            line *= 1.0 / max(float(line.max()), 1e-3)  # thin bands keep full strength
            opacity = 1.0 - (1.0 - opacity) * (1.0 - line * lung * (0.55 + 0.13 * si))
            regions[name] = (line > 0.4) & lung_any
        elif name == "nodule":  # small round, fairly sharp solid opacity
            cx, cy = float(f["c"][0]), float(f["c"][1])
            dist = np.sqrt((U - cx) ** 2 + (V - cy) ** 2)
            disk = np.clip((f["r"] - dist) * (1.0 / 0.004) + 0.5, 0.0, 1.0)
            opacity = 1.0 - (1.0 - opacity) * (1.0 - 0.85 * disk)
            extra += 0.06 * disk
            regions[name] = disk > 0.5

    ves = _arr(_soften(vim, 0.8 * k)) * vessel_keep
    if no_markings is not None:
        ves[no_markings] = 0.0
    air *= 1.0 - np.clip(opacity, 0.0, 1.0)
    hil = (_g2(U, V, hila[0][0], hila[0][1], 0.03, 0.05) + _g2(U, V, hila[1][0], hila[1][1], 0.03, 0.05))
    vis = lung * (1.0 - solid)  # where markings and ribs show against air
    b += extra - 0.46 * air + acq["vessel"] * vis * (0.14 * ves + 0.06 * hil) + 0.02 * heart

    # trachea (dark column), gastric bubble under the left hemidiaphragm
    tr = np.exp(-np.abs((U - 0.5) / 0.016) ** 3) * _smooth(a["v_apex"] + 0.22 - V, 0.0, 0.03)
    b -= 0.09 * tr * body_edge
    if a["stomach"]:
        sx0, sy0 = a["stomach_xy"]
        b -= 0.12 * _g2(U, V, sx0, a["v_cp"][1] + sy0, 0.05, 0.03) * (V > a["v_cp"][1] - 0.02)

    # bones: posterior + anterior ribs, clavicles, faint vertebral bodies
    bim, bd = _new_mask(R)
    t = np.linspace(0.0, 1.0, 10)
    for side in (0, 1):
        sx = 1.0 if side == 0 else -1.0
        mx, lx = 0.475, a["lat"] - 0.03
        v0 = a["v_apex"] - 0.025
        for i in range(10):  # posterior ribs: rise from the spine, arc laterally, drop along the wall
            xs = 0.5 + sx * (mx - (mx - lx) * t - 0.5)
            ys = v0 - 0.045 * np.sin(np.pi * t * 0.7) + (0.13 + 0.008 * i) * t ** 2.6
            bd.line(_px(np.stack([xs, ys], 1), R), fill=120, width=max(1, int(round(0.019 * R))))
            v0 += a["rib_gap"] + 0.0025 * i
        for i in range(6):  # anterior ribs: from the lateral wall down and medially, fading out
            tt = t[:8]
            xs = 0.5 + sx * (lx + 0.01 + 0.24 * tt - 0.5)
            ys = a["v_apex"] + 0.1 + i * 0.078 + 0.12 * tt - 0.025 * np.sin(np.pi * tt)
            bd.line(_px(np.stack([xs, ys], 1), R), fill=55, width=max(1, int(round(0.024 * R))))
        xs = 0.5 + sx * (np.linspace(0.455, 0.17, 10) - 0.5)  # clavicle
        ys = a["v_apex"] + 0.02 - 0.07 * t + 0.02 * np.sin(2 * np.pi * t)
        bd.line(_px(np.stack([xs, ys], 1), R), fill=255, width=max(1, int(round(0.028 * R))))
    bones = _arr(_soften(bim, 1.0 * k))
    spine = np.exp(-np.abs((U - 0.5) / 0.04) ** 4) * (0.8 + 0.2 * np.cos(2 * np.pi * (V - a["v_apex"]) / 0.045))
    b += acq["bone"] * body_edge * (0.13 * bones * (0.4 + 0.6 * vis) + 0.05 * spine)
    return b, regions


def _lowfreq(rng, R: int, n: int) -> np.ndarray:
    """Smooth random field in [0, 1] (bicubic-upsampled n x n noise); draws n*n numbers."""
    g = rng.uniform(0.0, 1.0, (n, n)).astype(np.float32)
    im = Image.fromarray(g).resize((R, R), Image.BICUBIC)
    return np.asarray(im)


def _pose_matrix(a: dict, R: int):
    """PIL AFFINE coefficients mapping output pixels to canonical pixels (small shift/rotation/zoom)."""
    p = a["pose"]
    th = math.radians(p["rot"])
    c, s = math.cos(th) / p["scale"], math.sin(th) / p["scale"]
    cx = cy = R / 2.0
    tx, ty = p["dx"] * R, p["dy"] * R
    # in = C + Rot(-th)/scale * (out - C - t)
    a0, b0 = c, s
    d0, e0 = -s, c
    ox, oy = -cx - tx, -cy - ty
    return (a0, b0, cx + a0 * ox + b0 * oy, d0, e0, cy + d0 * ox + e0 * oy)


def generate_sample(index: int, seed: int = 0, size: int = 256) -> SyntheticSample:
    """Render study ``index`` of the synthetic set ``seed`` at ``size`` x ``size`` pixels."""
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    rng = np.random.default_rng([seed, index])
    # --- size-independent draws: anatomy, findings, report, vessel trees ---
    a = _sample_anatomy(rng)
    findings = _sample_findings(rng, a)
    report, sections, entities = _write_report(rng, findings)
    labels = _labels(findings)
    vessels = _vessel_segments(rng)
    # --- rendering (size-dependent draws only from here on) ---
    f_ss = max(1, math.ceil(160 / size))
    R = size * f_ss
    canon, regions = _render(rng, a, findings, R, vessels)
    acq = a["acq"]
    canon += acq["mottle"] * (_lowfreq(rng, R, 16) - 0.5)
    x = np.clip(canon, 0.0, 1.0) ** acq["gamma"]
    x = np.clip((x - 0.5) * acq["contrast"] + 0.5 + acq["offset"], 0.0, 1.0)
    coeffs = _pose_matrix(a, R)
    bg = float(np.clip((0.035 ** acq["gamma"] - 0.5) * acq["contrast"] + 0.5 + acq["offset"], 0, 1))
    img = Image.fromarray(x.astype(np.float32)).transform((R, R), Image.AFFINE, coeffs, Image.BILINEAR,
                                                                  fillcolor=bg)
    img = Image.fromarray(np.clip(np.asarray(img) * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if f_ss > 1:
        img = img.reduce(f_ss)
    img = _blur(img, acq["blur"] * size / 256.0)  # detector blur scales with the field of view
    noise = acq["noise"] * 255.0 * min(1.0, size / 256.0) ** 0.5  # bigger pixels average more quanta
    # uniform noise with the same std: looks alike after 8-bit quantisation, 4x cheaper than normal
    out = np.asarray(img, dtype=np.float32) + (rng.random((size, size), dtype=np.float32) - 0.5) * (3.4641 * noise)
    image = np.clip(out + 0.5, 0, 255).astype(np.uint8)

    # segmentation bits, transformed like the image, then OR-pooled to the output grid
    seg_hr = np.zeros((R, R), np.uint8)
    for i, n in enumerate(FINDINGS):
        if n in regions:
            seg_hr |= regions[n].astype(np.uint8) << i
    seg_im = Image.fromarray(seg_hr).transform((R, R), Image.AFFINE, coeffs, Image.NEAREST, fillcolor=0)
    seg = np.asarray(seg_im)
    if f_ss > 1:
        seg = np.bitwise_or.reduce(np.bitwise_or.reduce(seg.reshape(size, f_ss, size, f_ss), axis=3), axis=1)
    seg = np.array(seg, dtype=np.uint8)  # writable copy

    out_findings = []
    names_present = [f["name"] for f in findings] + (["pneumonia"] if "consolidation" in regions else [])
    for i, n in enumerate(FINDINGS):
        if n not in names_present:
            continue
        src = next(f for f in findings if f["name"] == ("consolidation" if n == "pneumonia" else n))
        ys, xs = np.nonzero(seg & np.uint8(1 << i))
        if len(xs) == 0:  # region lost (tiny or shifted out): keep one pixel at its mapped centroid
            yy, xx = np.nonzero(regions[n]) if regions[n].any() else (np.array([R // 2]), np.array([R // 2]))
            px, py = _canon_to_out(coeffs, float(xx.mean()), float(yy.mean()))
            px = int(np.clip(px / f_ss, 0, size - 1))
            py = int(np.clip(py / f_ss, 0, size - 1))
            seg[py, px] |= np.uint8(1 << i)
            ys, xs = np.array([py]), np.array([px])
        out_findings.append({"name": n, "laterality": src["laterality"], "severity": src["severity"],
                             "bbox": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]})
    meta = {"source": "synthetic", "seed": seed, "index": index, "view": "PA", "findings": out_findings,
            "generator_version": GENERATOR_VERSION}
    return SyntheticSample(key=f"syn-{seed:04d}-{index:07d}", image=image, report=report, sections=sections,
                           labels=labels, entities=entities, findings=out_findings, seg=seg, meta=meta)


def _canon_to_out(coeffs, x: float, y: float):
    """Invert the AFFINE output->canonical map for one point."""
    a0, b0, c0, d0, e0, f0 = coeffs
    det = a0 * e0 - b0 * d0
    x -= c0
    y -= f0
    return (e0 * x - b0 * y) / det, (-d0 * x + a0 * y) / det


def generate(n: int, seed: int = 0, size: int = 256, start: int = 0) -> Iterator[SyntheticSample]:
    """Samples ``start`` .. ``start + n - 1`` of set ``seed`` (each one independent of the others)."""
    for i in range(start, start + n):
        yield generate_sample(i, seed=seed, size=size)


def contact_sheet(samples, cols: int = 4) -> Image.Image:
    """Grid of sample images (for eyeballing the generator)."""
    samples = list(samples)
    s = samples[0].image.shape[0]
    rows = math.ceil(len(samples) / cols)
    sheet = Image.new("L", (cols * s, rows * s), 0)
    for i, smp in enumerate(samples):
        sheet.paste(Image.fromarray(smp.image), ((i % cols) * s, (i // cols) * s))
    return sheet
