#!/usr/bin/env python
"""Build the packaged chest-radiograph knowledge base from this script's curation tables + shared data.

    python maintainer/build_kb.py [--shared-data DIR] [--out-dir DIR] [--check] [--quiet]

Reads (never copies) the staged third-party data under ``--shared-data`` (default ``../shared/data``
next to the repository):
  radlabels/radlabels_aliases_v1.0.json          aliases + parent map of 49 CXR labels (MIT)
  chexpert_labeler/phrases/mention/*.txt         CheXpert labeler mention phrases (MIT)
  radiology_semantic_dict/imaging_signs.json     radiographic signs (definitions) (MIT)
  radiology_semantic_dict/radiology_synonyms.json  abbreviations (MIT)
  negbio/examples/cuis-cvpr2017.txt              CUIs NegBio used for ChestX-ray8 (public domain)
  PROVENANCE.md + each LICENSE                   versions and licenses for ATTRIBUTION.md
and writes, deterministically (same inputs -> byte-identical files), into ``--out-dir`` (default
``mlip_ds/knowledge/kb_data``):
  cxr_kb_v1.jsonl        the KB (format: mlip_ds/knowledge/kb.py)
  cxr_kb_v1.meta.json    kb_version, sha256, counts, source versions, alias clashes and how they
                         were resolved, unmapped source entries
  ATTRIBUTION.md         sources, versions, licenses

``--check`` builds in memory and exits 1 if the files in --out-dir differ (CI / review aid).

Curation: every concept, its id, canonical name, definition, semantic type, label and relations
come from the CONCEPTS table (definitions written for this project). UMLS CUIs are used only where
we are confident of them (several checked against the ChestX-ray8 paper's CUI table, NegBio's
list and public code); otherwise ids are stable local ones, "MLIP:<slug>". Aliases come from the
table and from the sources. An alias claimed by two concepts is resolved deterministically
(kb.resolve_alias_clashes: a concept's own name wins, then ALIAS_OWNER, then source priority
curated > radlabels > chexpert_labeler > radiology_semantic_dict, then the smaller id); every
clash is listed in the meta file. Clashes between two curated entries are build errors.

Exit codes: 0 ok; 1 --check found differences; 2 missing/invalid input or an inconsistent table.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections import namedtuple
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from mlip_ds.data.schema import FINDINGS, NO_FINDING
from mlip_ds.knowledge.kb import (CHEXPERT_LABELS, KNOWN_LABELS, Concept, KnowledgeBase,
                                  Relation, normalize_alias, resolve_alias_clashes, serialize_kb)

KB_NAME = "cxr_kb_v1"
KB_VERSION = "1.0.0"
FORMAT_VERSION = 1

CURATED = "mlip_curated"
RADLABELS = "radlabels"
CHEXPERT = "chexpert_labeler"
RSD = "radiology_semantic_dict"
NEGBIO = "negbio"
SOURCE_PRIORITY = {CURATED: 0, RADLABELS: 1, CHEXPERT: 2, RSD: 3}


class BuildError(RuntimeError):
    pass


# ================================================================================================
# Curation table. _c(slug, cui, semantic_type, name, definition, aliases "a|b", label,
#                    is_a "slug slug", site "slug" (finding_site), assoc "slug" (associated_with))
# ================================================================================================
Row = namedtuple("Row", "slug cui stype name definition aliases label is_a site assoc")


def _c(slug, cui, stype, name, definition, aliases="", label=None, is_a="", site="", assoc=""):
    return Row(slug, cui, stype, name, definition, tuple(a for a in aliases.split("|") if a),
               label, tuple(is_a.split()), tuple(site.split()), tuple(assoc.split()))


def _dev(slug, cui, name, definition, aliases="", is_a="support_device", site="", assoc="",
         label="support_devices"):
    return _c(slug, cui, "device", name, definition, aliases, label, is_a, site, assoc)


ANATOMY = [
    _c("chest", "C0817096", "anatomy", "chest", "The part of the body between the neck and the abdomen, enclosed by the ribs.", "thorax|thoracic cavity|hemithorax|hemithoraces|intrathoracic"),
    _c("lung", "C0024109", "anatomy", "lung", "Either of the paired air-filled organs of respiration in the chest.", "lungs|lung field|lung fields|lung parenchyma|pulmonary parenchyma", assoc="chest"),
    _c("right_lung", None, "anatomy", "right lung", "The lung in the right hemithorax, made of upper, middle and lower lobes.", "right hemithorax", is_a="lung"),
    _c("left_lung", None, "anatomy", "left lung", "The lung in the left hemithorax, made of an upper lobe with the lingula and a lower lobe.", "left hemithorax", is_a="lung"),
    _c("lung_lobe", None, "anatomy", "lobe of lung", "One of the divisions of a lung bounded by the interlobar fissures.", "lung lobe|lung lobes|pulmonary lobe|lobe", assoc="lung"),
    _c("right_upper_lobe", None, "anatomy", "right upper lobe", "The uppermost lobe of the right lung, above the minor fissure.", "RUL", is_a="lung_lobe", assoc="right_lung"),
    _c("right_middle_lobe", None, "anatomy", "right middle lobe", "The lobe of the right lung between the minor and major fissures, next to the right heart border.", "RML", is_a="lung_lobe", assoc="right_lung"),
    _c("right_lower_lobe", None, "anatomy", "right lower lobe", "The lowest lobe of the right lung, behind and below the major fissure, resting on the right hemidiaphragm.", "RLL", is_a="lung_lobe", assoc="right_lung"),
    _c("left_upper_lobe", None, "anatomy", "left upper lobe", "The upper lobe of the left lung, in front of and above the major fissure, including the lingula.", "LUL", is_a="lung_lobe", assoc="left_lung"),
    _c("left_lower_lobe", None, "anatomy", "left lower lobe", "The lower lobe of the left lung, behind and below the major fissure, resting on the left hemidiaphragm.", "LLL", is_a="lung_lobe", assoc="left_lung"),
    _c("lingula", None, "anatomy", "lingula", "The tongue-shaped lower part of the left upper lobe, next to the left heart border.", "lingular segment|lingular", assoc="left_upper_lobe"),
    _c("lung_apex", None, "anatomy", "lung apex", "The rounded top of a lung, reaching above the clavicle.", "apex|apices|lung apices|apex of lung", assoc="lung"),
    _c("lung_base", None, "anatomy", "lung base", "The lower part of a lung, resting on the diaphragm.", "lung bases|bases|base of lung|bases of the lungs", assoc="lung"),
    _c("pulmonary_hilum", None, "anatomy", "pulmonary hilum", "The medial region of a lung where bronchi, pulmonary vessels and nerves enter and leave.", "hilum|hila|hilar region|hilus|lung hilum|hilar", assoc="lung"),
    _c("pulmonary_interstitium", None, "anatomy", "pulmonary interstitium", "The connective-tissue framework of the lung around the alveoli, vessels and bronchi.", "interstitium|lung interstitium", assoc="lung"),
    _c("pulmonary_airspace", None, "anatomy", "pulmonary airspace", "The gas-filled alveoli and alveolar ducts where gas exchange takes place.", "airspace|airspaces|air spaces|alveoli|alveolar spaces", assoc="lung"),
    _c("pleura", "C0032225", "anatomy", "pleura", "The serous membrane lining the chest wall (parietal pleura) and covering the lungs (visceral pleura).", "pleural|pleurae|pleural surface|pleural surfaces|visceral pleura|parietal pleura"),
    _c("pleural_space", None, "anatomy", "pleural space", "The potential space between the visceral and parietal pleura.", "pleural cavity|pleural spaces", assoc="pleura"),
    _c("costophrenic_angle", None, "anatomy", "costophrenic angle", "The angle where the diaphragm meets the lateral chest wall, the lowest recess of the pleural space on a frontal view.", "costophrenic angles|CP angle|CP angles|costophrenic sulcus|costophrenic recess", assoc="pleural_space"),
    _c("interlobar_fissure", None, "anatomy", "interlobar fissure", "A fold of visceral pleura separating two lobes of a lung.", "fissure|fissures|minor fissure|major fissure|horizontal fissure|oblique fissure", assoc="pleura"),
    _c("heart", "C0018787", "anatomy", "heart", "The muscular organ in the middle mediastinum that pumps blood through the body.", "cardiac"),
    _c("cardiac_silhouette", None, "anatomy", "cardiac silhouette", "The outline of the heart on a chest radiograph, used to judge heart size.", "heart shadow|cardiac shadow|heart size|cardiac size|cardiac contour|cardiac contours|heart border|heart borders|cardiac outline|heart silhouette", assoc="heart"),
    _c("left_atrium", None, "anatomy", "left atrium", "The heart chamber that receives oxygenated blood from the pulmonary veins.", "left atrial", assoc="heart"),
    _c("right_atrium", None, "anatomy", "right atrium", "The heart chamber that receives systemic venous blood from the venae cavae.", "right atrial", assoc="heart"),
    _c("left_ventricle", None, "anatomy", "left ventricle", "The thick-walled heart chamber that pumps blood into the aorta.", "left ventricular", assoc="heart"),
    _c("right_ventricle", None, "anatomy", "right ventricle", "The heart chamber that pumps blood into the pulmonary artery.", "right ventricular", assoc="heart"),
    _c("pericardium", None, "anatomy", "pericardium", "The fibroserous sac that encloses the heart.", "pericardial sac|pericardial", assoc="heart"),
    _c("mediastinum", "C0025066", "anatomy", "mediastinum", "The central compartment of the chest between the lungs, holding the heart, great vessels, trachea and esophagus.", "mediastinal|mediastinal structures"),
    _c("cardiomediastinal_silhouette", None, "anatomy", "cardiomediastinal silhouette", "The combined outline of the heart and mediastinum on a frontal chest radiograph.", "cardiomediastinal contour|cardiomediastinal contours|cardiomediastinum|mediastinal silhouette|mediastinal contour|mediastinal contours|mediastinal configuration|pericardial silhouette|heart and mediastinum", assoc="heart mediastinum"),
    _c("aorta", "C0003483", "anatomy", "aorta", "The main artery of the body, arising from the left ventricle and arching over the heart.", "aortic", assoc="heart"),
    _c("aortic_arch", None, "anatomy", "aortic arch", "The curved segment of the thoracic aorta between its ascending and descending parts.", "aortic knob|aortic knuckle|arch of the aorta|transverse aorta", assoc="aorta"),
    _c("ascending_aorta", None, "anatomy", "ascending aorta", "The first segment of the aorta, rising from the aortic valve to the arch.", assoc="aorta"),
    _c("descending_aorta", None, "anatomy", "descending thoracic aorta", "The segment of the aorta that runs down the left posterior mediastinum from the arch to the diaphragm.", "descending aorta", assoc="aorta"),
    _c("pulmonary_artery", "C0034052", "anatomy", "pulmonary artery", "The artery carrying deoxygenated blood from the right ventricle to the lungs.", "pulmonary arteries|main pulmonary artery|pulmonary trunk|pulmonary arterial"),
    _c("pulmonary_vasculature", None, "anatomy", "pulmonary vasculature", "The arteries and veins of the lungs as they appear on a radiograph.", "pulmonary vessels|pulmonary vascularity|pulmonary vascular markings|vascular markings|bronchovascular markings|lung markings|pulmonary vascular pattern", assoc="lung"),
    _c("superior_vena_cava", None, "anatomy", "superior vena cava", "The large vein that returns blood from the head, neck and arms to the right atrium.", assoc="right_atrium"),
    _c("inferior_vena_cava", None, "anatomy", "inferior vena cava", "The large vein that returns blood from the lower body to the right atrium.", assoc="right_atrium"),
    _c("cavoatrial_junction", None, "anatomy", "cavoatrial junction", "The point where the superior vena cava joins the right atrium, the usual target for central catheter tips.", "atriocaval junction|cavo-atrial junction|caval-atrial junction|atrio-caval junction", assoc="superior_vena_cava right_atrium"),
    _c("azygos_vein", None, "anatomy", "azygos vein", "A vein ascending along the right side of the spine that drains into the superior vena cava.", "azygos|azygous vein"),
    _c("brachiocephalic_vein", None, "anatomy", "brachiocephalic vein", "Either of the veins formed by the internal jugular and subclavian veins, which join to form the superior vena cava.", "innominate vein|brachiocephalic veins"),
    _c("internal_jugular_vein", None, "anatomy", "internal jugular vein", "The large vein of the neck draining the brain and face, a common site for central venous access.", "internal jugular|IJ vein|jugular vein"),
    _c("subclavian_vein", None, "anatomy", "subclavian vein", "The vein beneath the clavicle draining the arm, a common site for central venous access.", "subclavian"),
    _c("trachea", "C0040578", "anatomy", "trachea", "The airway from the larynx to the carina.", "windpipe|tracheal", assoc="airway"),
    _c("carina", None, "anatomy", "carina", "The ridge at the bifurcation of the trachea into the main bronchi, the landmark for endotracheal tube position.", "tracheal carina|tracheal bifurcation", assoc="trachea"),
    _c("bronchus", "C0006255", "anatomy", "bronchus", "An airway branching from the trachea into the lung.", "bronchi|bronchial tree|bronchial|mainstem bronchus|mainstem bronchi|main bronchus", assoc="airway"),
    _c("right_main_bronchus", None, "anatomy", "right main bronchus", "The short, steep airway from the carina to the right lung, where a too-deep endotracheal tube usually goes.", "right mainstem bronchus|right main-stem bronchus", is_a="bronchus"),
    _c("left_main_bronchus", None, "anatomy", "left main bronchus", "The longer, more horizontal airway from the carina to the left lung.", "left mainstem bronchus|left main-stem bronchus", is_a="bronchus"),
    _c("airway", None, "anatomy", "airway", "The air-conducting passages of the lower respiratory tract: trachea, bronchi and bronchioles.", "airways|tracheobronchial tree"),
    _c("esophagus", "C0014876", "anatomy", "esophagus", "The muscular tube carrying food from the pharynx through the posterior mediastinum to the stomach.", "oesophagus|esophageal"),
    _c("stomach", "C0038351", "anatomy", "stomach", "The digestive organ below the left hemidiaphragm; its air bubble is often seen on chest radiographs.", "gastric|gastric bubble|gastric air bubble|stomach bubble"),
    _c("diaphragm", "C0011980", "anatomy", "diaphragm", "The dome-shaped muscle separating the chest from the abdomen.", "diaphragms|diaphragmatic|hemidiaphragm|hemidiaphragms"),
    _c("right_hemidiaphragm", None, "anatomy", "right hemidiaphragm", "The right half of the diaphragm, usually a little higher than the left because of the liver.", assoc="diaphragm"),
    _c("left_hemidiaphragm", None, "anatomy", "left hemidiaphragm", "The left half of the diaphragm, with the gastric air bubble beneath it.", assoc="diaphragm"),
    _c("peritoneal_cavity", None, "anatomy", "peritoneal cavity", "The space within the abdomen lined by peritoneum, below the diaphragm.", "peritoneum|intraperitoneal space"),
    _c("upper_abdomen", None, "anatomy", "upper abdomen", "The part of the abdomen just below the diaphragm that is partly included on chest radiographs.", "upper abdominal|imaged upper abdomen|subdiaphragmatic region"),
    _c("rib", "C0035561", "anatomy", "rib", "One of the curved bones forming the thoracic cage.", "ribs|rib cage|costal", assoc="bony_thorax"),
    _c("clavicle", "C0008913", "anatomy", "clavicle", "The S-shaped bone joining the sternum to the scapula.", "clavicles|collarbone|clavicular", assoc="bony_thorax"),
    _c("scapula", None, "anatomy", "scapula", "The flat triangular bone at the back of the shoulder.", "scapulae|shoulder blade|scapular", assoc="bony_thorax"),
    _c("sternum", None, "anatomy", "sternum", "The flat bone at the front of the chest to which the ribs attach.", "sternal|breastbone", assoc="bony_thorax"),
    _c("vertebral_column", "C0037949", "anatomy", "vertebral column", "The column of vertebrae that encloses the spinal cord.", "spine|spinal column|vertebrae|spinal"),
    _c("thoracic_spine", None, "anatomy", "thoracic spine", "The twelve vertebrae of the chest, to which the ribs attach.", "thoracic vertebrae|thoracic vertebra|T-spine|thoracic vertebral bodies", assoc="vertebral_column bony_thorax"),
    _c("shoulder", None, "anatomy", "shoulder", "The joint between the head of the humerus and the glenoid of the scapula.", "shoulders|glenohumeral joint|shoulder joint"),
    _c("humerus", None, "anatomy", "humerus", "The long bone of the upper arm, whose head forms the shoulder joint.", "humeral head|humeri|proximal humerus|humeral", assoc="shoulder"),
    _c("bony_thorax", None, "anatomy", "bony thorax", "The bones of the chest: ribs, sternum, clavicles, scapulae and thoracic spine.", "osseous structures|bony structures|visualized osseous structures|thoracic cage|osseous thorax|bones|skeletal structures", assoc="chest"),
    _c("chest_wall", None, "anatomy", "chest wall", "The layers around the thoracic cavity: skin, soft tissue, muscle and the bony thorax.", "thoracic wall", assoc="chest"),
    _c("soft_tissues", None, "anatomy", "soft tissues", "The non-bony tissues of the chest wall and neck: skin, fat and muscle.", "soft tissue|chest wall soft tissues|subcutaneous tissues", assoc="chest_wall"),
    _c("breast", None, "anatomy", "breast", "The mammary gland over the anterior chest wall, which casts a soft-tissue shadow on radiographs.", "breasts|breast shadow|breast shadows|breast tissue", assoc="chest_wall"),
    _c("axilla", None, "anatomy", "axilla", "The armpit, between the upper arm and the chest wall.", "axillae|axillary region|armpit|axillary", assoc="chest_wall"),
    _c("neck", None, "anatomy", "neck", "The region between the head and the chest, whose base is included on chest radiographs.", "lower neck|cervical soft tissues|thoracic inlet"),
    _c("lymph_node", None, "anatomy", "lymph node", "A small bean-shaped immune organ along the lymphatic vessels.", "lymph nodes|lymph glands"),
    _c("mediastinal_lymph_node", None, "anatomy", "mediastinal lymph node", "A lymph node within the mediastinum.", "mediastinal lymph nodes|mediastinal nodes", is_a="lymph_node", assoc="mediastinum"),
    _c("hilar_lymph_node", None, "anatomy", "hilar lymph node", "A lymph node at a pulmonary hilum.", "hilar lymph nodes|hilar nodes", is_a="lymph_node", assoc="pulmonary_hilum"),
    _c("aortic_valve", None, "anatomy", "aortic valve", "The heart valve between the left ventricle and the aorta.", assoc="heart"),
    _c("mitral_valve", None, "anatomy", "mitral valve", "The heart valve between the left atrium and the left ventricle.", assoc="heart"),
    _c("coronary_artery", None, "anatomy", "coronary artery", "An artery supplying blood to the heart muscle.", "coronary arteries|coronaries", assoc="heart"),
]

CATEGORIES = [
    _c("pulmonary_abnormality", None, "finding", "pulmonary abnormality", "Any abnormal radiographic finding of the lung parenchyma, airspaces or interstitium.", "lung abnormality|lung abnormalities|pulmonary abnormalities|parenchymal abnormality", site="lung"),
    _c("pleural_abnormality", None, "finding", "pleural abnormality", "Any abnormal radiographic finding of the pleura or the pleural space.", "pleural abnormalities|pleural process", site="pleura"),
    _c("cardiomediastinal_abnormality", None, "finding", "cardiomediastinal abnormality", "Any abnormal finding of the heart, great vessels or mediastinal contours.", "cardiomediastinal abnormalities", site="cardiomediastinal_silhouette"),
    _c("airway_abnormality", None, "finding", "airway abnormality", "Any abnormal finding of the trachea or bronchi.", "airway abnormalities", site="airway"),
    _c("hilar_abnormality", None, "finding", "hilar abnormality", "Enlargement or abnormal contour of a pulmonary hilum from lymph nodes, vessels or a mass.", "hilar prominence|hilar enlargement|prominent hila|prominent hilum|enlarged hila|enlarged hilum|hilar fullness", site="pulmonary_hilum"),
    _c("trauma_finding", None, "finding", "traumatic chest finding", "A finding caused by injury to the chest, such as a fracture, dislocation or extraluminal air.", "chest trauma|thoracic trauma|traumatic injury", site="chest"),
    _c("extraluminal_air", None, "finding", "extraluminal air", "Gas outside the airways and bowel, for example in the mediastinum, peritoneum or soft tissues.", "extraluminal gas|ectopic air|ectopic gas|abnormal air collection"),
    _c("bone_abnormality", None, "finding", "osseous abnormality", "An abnormal finding of the bones of the chest.", "bone abnormality|bony abnormality|osseous abnormalities|osseous finding|osseous lesion", site="bony_thorax"),
    _c("radiographic_sign", None, "finding", "radiographic sign", "A characteristic appearance on a radiograph that points to a specific diagnosis or location.", "imaging sign|radiologic sign|radiological sign"),
    _c("lung_disease", "C0024115", "disease", "lung disease", "Any disease that affects the lungs.", "lung diseases|pulmonary disease|pulmonary diseases|respiratory disease|lung disorder|pulmonary disorder", site="lung"),
    _c("pleural_disease", None, "disease", "pleural disease", "Any disease of the pleura or pleural space.", "pleural diseases|pleural disorder", site="pleura"),
    _c("no_finding", None, "finding", "no finding", "A chest radiograph without a clinically relevant abnormality; the CheXpert 'No Finding' class.", "no acute cardiopulmonary process|no acute cardiopulmonary abnormality|no acute cardiopulmonary disease|no acute intrathoracic process|no acute disease|no active disease|no acute findings|normal chest|normal chest radiograph|normal chest x-ray|unremarkable chest radiograph|clear lungs|lungs are clear|no evidence of acute disease", label="no_finding"),
]

PULMONARY = [
    _c("atelectasis", "C0004144", "finding", "atelectasis", "Incomplete expansion or collapse of part or all of a lung, with loss of volume.", "atelectatic change|atelectatic changes|atelectases|collapse", "atelectasis", "pulmonary_abnormality", "lung"),
    _c("discoid_atelectasis", "C0264494", "finding", "discoid atelectasis", "A thin linear or plate-like band of atelectasis, usually at the lung bases.", "plate atelectasis|plate-like atelectasis|platelike atelectasis|linear atelectasis|band atelectasis|bandlike atelectasis|band-like atelectasis|Fleischner lines", "atelectasis", "atelectasis", "lung_base"),
    _c("focal_atelectasis", "C0264496", "finding", "focal atelectasis", "Atelectasis confined to a small region of lung.", "", "atelectasis", "atelectasis", "lung"),
    _c("lobar_collapse", None, "finding", "lobar collapse", "Collapse of a whole lobe or segment of a lung, often from bronchial obstruction.", "lobar atelectasis|segmental atelectasis|segmental collapse|subsegmental atelectasis|subsegmental collapse", "atelectasis", "atelectasis", "lung_lobe", "mucus_plugging"),
    _c("complete_lung_collapse", None, "finding", "complete lung collapse", "Collapse of an entire lung, with opacification of the hemithorax and shift of the mediastinum toward it.", "total lung collapse|whole lung collapse|complete lung atelectasis|total lung atelectasis|entire lung collapse", "atelectasis", "atelectasis", "lung", "mediastinal_shift"),
    _c("rounded_atelectasis", None, "finding", "rounded atelectasis", "A mass-like focus of peripheral atelectasis next to thickened pleura, with vessels curving into it.", "round atelectasis|folded lung", "atelectasis", "atelectasis", "lung", "pleural_thickening"),
    _c("compressive_atelectasis", None, "finding", "compressive atelectasis", "Atelectasis caused by an adjacent space-occupying process such as a pleural effusion.", "compression atelectasis|passive atelectasis|relaxation atelectasis", "atelectasis", "atelectasis", "lung", "pleural_effusion"),
    _c("volume_loss", None, "finding", "volume loss", "Reduced lung volume shown by displaced fissures, an elevated hemidiaphragm or mediastinal shift.", "loss of volume|lung volume loss", None, "pulmonary_abnormality", "lung", "atelectasis"),
    _c("low_lung_volumes", None, "finding", "low lung volumes", "Small lung volumes on a radiograph, usually from a shallow inspiration, which crowd the bronchovascular markings.", "low lung volume|hypoinflation|poor inspiration|shallow inspiration|poor inspiratory effort", None, "pulmonary_abnormality", "lung"),
    _c("lung_opacity", None, "finding", "lung opacity", "Any area of lung that appears whiter (more attenuating) than normal; the CheXpert 'Lung Opacity' class.", "opacity|opacities|opacification|pulmonary opacity|pulmonary opacities|lung opacities|increased density|decreased translucency|parenchymal opacities", "lung_opacity", "pulmonary_abnormality", "lung"),
    _c("airspace_opacity", None, "finding", "airspace opacity", "Opacity from filling of the alveolar airspaces, as in consolidation, edema or hemorrhage.", "airspace disease|air space disease|air-space disease|airspace process|alveolar opacity|alveolar opacities|airspace opacities|air space opacity|air-space opacity", "lung_opacity", "lung_opacity", "pulmonary_airspace"),
    _c("consolidation", "C0521530", "finding", "consolidation", "Replacement of alveolar air by fluid, pus, blood or cells, making the lung opaque while the airways may stay aerated.", "lung consolidation|pulmonary consolidation|consolidations|consolidated lung|consolidative change|consolidative changes|consolidative opacity", "consolidation", "lung_opacity", "pulmonary_airspace"),
    _c("ground_glass_opacity", None, "finding", "ground-glass opacity", "Hazy increased lung density through which vessels and bronchial walls remain visible.", "ground glass opacity|ground glass|ground-glass|ground-glass opacities|ground glass opacities|groundglass opacity", "lung_opacity", "lung_opacity", "lung"),
    _c("pulmonary_infiltrate", "C0235896", "finding", "pulmonary infiltrate", "A nonspecific term for abnormal lung opacity from material filling the airspaces or interstitium.", "infiltrate|infiltrates|infiltration|lung infiltrate|pulmonary infiltrates|pulmonary infiltration", "lung_opacity", "lung_opacity", "lung"),
    _c("interstitial_opacity", None, "finding", "interstitial opacity", "Linear, reticular or fine nodular lung opacity from thickening of the pulmonary interstitium.", "interstitial markings|interstitial marking|interstitial pattern|reticular opacity|reticular opacities|reticular pattern|reticular markings|reticulation|reticulonodular pattern|interstitial prominence|interstitial thickening|interstitial changes|increased interstitial markings|interstitial opacities", "lung_opacity", "lung_opacity", "pulmonary_interstitium"),
    _c("parenchymal_scarring", None, "finding", "parenchymal scarring", "Fibrotic residue of earlier lung injury, seen as linear or band-like opacity.", "scar|scarring|lung scarring|pulmonary scarring|parenchymal scar|linear scarring", "lung_opacity", "lung_opacity", "lung", "fibrosis"),
    _c("pulmonary_edema", "C0034063", "finding", "pulmonary edema", "Abnormal fluid in the lung interstitium and airspaces, most often from left heart failure.", "edema|oedema|pulmonary oedema|lung edema|pulmonary edematous changes", "edema", "pulmonary_abnormality", "lung", "congestive_heart_failure"),
    _c("interstitial_edema", None, "finding", "interstitial pulmonary edema", "Early pulmonary edema confined to the interstitium, with Kerley lines, peribronchial cuffing and indistinct vessels.", "interstitial edema|pulmonary interstitial edema|interstitial pulmonary oedema", "edema", "pulmonary_edema", "pulmonary_interstitium"),
    _c("alveolar_edema", None, "finding", "alveolar pulmonary edema", "Pulmonary edema that has filled the alveoli, often in a perihilar bat-wing distribution.", "alveolar edema|airspace edema|alveolar pulmonary oedema|bat-wing edema", "edema", "pulmonary_edema", "pulmonary_airspace"),
    _c("cardiogenic_edema", None, "finding", "cardiogenic pulmonary edema", "Pulmonary edema from raised pulmonary venous pressure, typically in left heart failure.", "hydrostatic pulmonary edema|cardiogenic edema", "edema", "pulmonary_edema", "lung", "congestive_heart_failure"),
    _c("noncardiogenic_edema", None, "finding", "noncardiogenic pulmonary edema", "Pulmonary edema from leaky capillaries rather than raised pressure, as in ARDS.", "non-cardiogenic pulmonary edema|permeability edema|noncardiogenic edema", "edema", "pulmonary_edema", "lung", "ards"),
    _c("vascular_congestion", None, "finding", "pulmonary vascular congestion", "Distension of the pulmonary veins from raised left-sided filling pressure, a forerunner of pulmonary edema.", "vascular congestion|pulmonary venous congestion|pulmonary congestion|congestion|pulmonary venous hypertension|vascular engorgement|engorged pulmonary vessels|vascular prominence", "edema", "pulmonary_abnormality", "pulmonary_vasculature", "pulmonary_edema congestive_heart_failure"),
    _c("cephalization", None, "finding", "cephalization", "Redistribution of pulmonary blood flow to the upper lobes, a sign of raised pulmonary venous pressure.", "cephalisation|cephalization of vessels|upper lobe diversion|upper zone redistribution|upper lobe redistribution|vascular redistribution", None, "vascular_congestion", "pulmonary_vasculature"),
    _c("indistinct_vessels", None, "finding", "indistinct pulmonary vasculature", "Blurred margins of the pulmonary vessels from fluid in the surrounding interstitium.", "vascular indistinctness|indistinctness|indistinct vessels|indistinct pulmonary vessels|hazy vascular markings|perihilar haziness", "edema", "pulmonary_abnormality", "pulmonary_vasculature", "interstitial_edema"),
    _c("kerley_lines", None, "finding", "Kerley B lines", "Short horizontal lines at the lung periphery from thickened interlobular septa, a sign of interstitial edema.", "Kerley lines|Kerley B-lines|septal lines|interlobular septal thickening|septal thickening", None, "radiographic_sign pulmonary_abnormality", "pulmonary_interstitium", "interstitial_edema"),
    _c("peribronchial_cuffing", None, "finding", "peribronchial cuffing", "Thickened, blurred bronchial walls seen end-on, a sign of interstitial edema or airway inflammation.", "bronchial cuffing|cuffing|peribronchial markings|peribronchial prominence", None, "airway_abnormality", "bronchus", "interstitial_edema bronchitis"),
    _c("bronchial_wall_thickening", None, "finding", "bronchial wall thickening", "Abnormally thick bronchial walls, seen as tram-track lines or ring shadows, from inflammation or chronic airway disease.", "peribronchial thickening|bronchial thickening|airway wall thickening|wall thickening|thickened bronchial walls", "lung_opacity", "airway_abnormality", "bronchus"),
    _c("pneumonia", "C0032285", "disease", "pneumonia", "Infection of the lung parenchyma, usually seen as airspace consolidation.", "pneumonias|lung infection|chest infection|PNA", "pneumonia", "lung_disease", "lung", "consolidation"),
    _c("basal_pneumonia", "C0577702", "disease", "basal pneumonia", "Pneumonia at a lung base.", "basilar pneumonia", "pneumonia", "pneumonia", "lung_base"),
    _c("lul_zone_pneumonia", "C0578576", "disease", "left upper zone pneumonia", "Pneumonia in the upper zone of the left lung.", "", "pneumonia", "pneumonia", "left_lung"),
    _c("rml_zone_pneumonia", "C0578577", "disease", "right middle zone pneumonia", "Pneumonia in the middle zone of the right lung.", "", "pneumonia", "pneumonia", "right_lung"),
    _c("ll_zone_pneumonia", "C0585104", "disease", "left lower zone pneumonia", "Pneumonia in the lower zone of the left lung.", "", "pneumonia", "pneumonia", "left_lung"),
    _c("rl_zone_pneumonia", "C0585105", "disease", "right lower zone pneumonia", "Pneumonia in the lower zone of the right lung.", "", "pneumonia", "pneumonia", "right_lung"),
    _c("ru_zone_pneumonia", "C0585106", "disease", "right upper zone pneumonia", "Pneumonia in the upper zone of the right lung.", "", "pneumonia", "pneumonia", "right_lung"),
    _c("lingular_pneumonia", "C1960024", "disease", "lingular pneumonia", "Pneumonia in the lingula of the left upper lobe, which can blur the left heart border.", "", "pneumonia", "pneumonia", "lingula"),
    _c("aspiration_pneumonia", None, "disease", "aspiration pneumonia", "Pneumonia from inhaled oropharyngeal or gastric contents, favouring the dependent lung segments.", "", "pneumonia", "pneumonia", "lung", "aspiration"),
    _c("recurrent_aspiration_pneumonia", "C0747651", "disease", "recurrent aspiration pneumonia", "Repeated episodes of pneumonia from aspiration of oral or gastric contents.", "", "pneumonia", "aspiration_pneumonia", "lung"),
    _c("lobar_pneumonia", None, "disease", "lobar pneumonia", "Pneumonia filling an entire lobe with uniform consolidation.", "", "pneumonia", "pneumonia", "lung_lobe"),
    _c("bronchopneumonia", None, "disease", "bronchopneumonia", "Pneumonia in patchy peribronchial foci, often multifocal and bilateral.", "lobular pneumonia", "pneumonia", "pneumonia", "lung"),
    _c("viral_pneumonia", None, "disease", "viral pneumonia", "Pneumonia caused by a virus, often with interstitial or ground-glass opacities.", "", "pneumonia", "pneumonia", "lung"),
    _c("covid19", "C5203670", "disease", "COVID-19", "Disease caused by the SARS-CoV-2 coronavirus; lung involvement shows as peripheral, basal ground-glass and consolidative opacities.", "COVID 19|COVID-19 pneumonia|SARS-CoV-2 infection|coronavirus disease 2019", None, "", "lung", "viral_pneumonia ground_glass_opacity"),
    _c("organizing_pneumonia", None, "disease", "organizing pneumonia", "An inflammatory lung reaction with plugs of granulation tissue in the airspaces, giving patchy, migratory consolidation.", "cryptogenic organizing pneumonia|COP|BOOP", None, "interstitial_lung_disease", "lung"),
    _c("pneumonitis", None, "disease", "pneumonitis", "Inflammation of lung tissue from non-infectious causes such as radiation, drugs or aspiration.", "lung inflammation", None, "lung_disease", "lung"),
    _c("aspiration", None, "finding", "aspiration", "Inhalation of foreign material such as gastric contents or food into the airways.", "pulmonary aspiration", None, "pulmonary_abnormality", "airway", "aspiration_pneumonia"),
    _c("lung_lesion", None, "finding", "lung lesion", "Any focal abnormality of the lung such as a nodule, mass or cavity; the CheXpert 'Lung Lesion' class.", "pulmonary lesion|lung lesions|pulmonary lesions|parenchymal lesion", "lung_lesion", "pulmonary_abnormality", "lung"),
    _c("lung_nodule", "C0034079", "finding", "lung nodule", "A rounded lung opacity up to 3 cm across.", "nodule|nodules|pulmonary nodule|pulmonary nodules|lung nodules|solitary pulmonary nodule|SPN|nodular opacity|nodular opacities|nodular density|nodular densities|nodular opacification|coin lesion", "nodule", "lung_lesion", "lung"),
    _c("multiple_nodules", None, "finding", "multiple pulmonary nodules", "Several nodules scattered through the lungs, raising concern for metastases or granulomatous disease.", "multiple lung nodules|innumerable nodules|numerous nodules|bilateral pulmonary nodules|pulmonary nodularity", "nodule", "lung_nodule", "lung", "metastasis"),
    _c("miliary_nodules", None, "finding", "miliary nodules", "Innumerable tiny (1-3 mm) nodules spread evenly through both lungs, as in miliary tuberculosis.", "miliary pattern|micronodules|miliary opacities", "nodule", "lung_nodule", "lung", "tuberculosis"),
    _c("mass", "C0577559", "finding", "mass", "A space-occupying lesion; in the lung, a rounded opacity larger than 3 cm.", "masses|mass lesion|space-occupying lesion|lump", "lung_lesion"),
    _c("lung_mass", None, "finding", "lung mass", "A lung opacity larger than 3 cm, suspicious for malignancy.", "pulmonary mass|lung masses|pulmonary masses|parenchymal mass|lung tumor|pulmonary tumor", "lung_lesion", "mass lung_lesion", "lung", "lung_cancer"),
    _c("cavitary_lesion", None, "finding", "cavitary lesion", "A gas-filled space inside a lung lesion or consolidation from necrosis, as in abscess, tuberculosis or carcinoma.", "cavity|cavitation|cavitary nodule|cavitary mass|lung cavity|cavitating lesion|cavitary lesions", "lung_lesion", "lung_lesion", "lung"),
    _c("granuloma", "C0018188", "finding", "granuloma", "A small focus of chronic inflammation, often calcified after healed infection such as tuberculosis or histoplasmosis.", "granulomas|granulomata", None, "pulmonary_abnormality", "lung", "tuberculosis"),
    _c("calcified_granuloma", None, "finding", "calcified granuloma", "A granuloma that has calcified, a benign sequel of old infection.", "calcified granulomas|calcified nodule|calcified nodules|calcified lung nodule|calcified pulmonary nodule|healed granuloma|healed granulomas", None, "granuloma calcification", "lung"),
    _c("lung_abscess", "C0024110", "disease", "lung abscess", "A pus-filled cavity in the lung from necrotizing infection, often with an air-fluid level.", "pulmonary abscess", None, "abscess lung_disease", "lung", "cavitary_lesion"),
    _c("abscess", "C0000833", "disease", "abscess", "A localized collection of pus within tissue.", "abscesses"),
    _c("aspergilloma", None, "disease", "aspergilloma", "A ball of Aspergillus fungus growing in a pre-existing lung cavity.", "fungus ball|mycetoma|pulmonary aspergilloma", None, "lung_disease", "lung", "cavitary_lesion"),
    _c("lung_cancer", "C0242379", "disease", "lung cancer", "A malignant tumor arising in the lung, most often a bronchogenic carcinoma.", "malignant neoplasm of lung|lung carcinoma|bronchogenic carcinoma|pulmonary carcinoma|lung malignancy|carcinoma of the lung|primary lung cancer", "lung_lesion", "malignant_neoplasm lung_disease", "lung"),
    _c("nsclc", None, "disease", "non-small cell lung cancer", "The group of lung cancers other than small cell carcinoma, chiefly adenocarcinoma and squamous cell carcinoma.", "non small cell lung cancer|non-small-cell lung carcinoma", "lung_lesion", "lung_cancer", "lung"),
    _c("sclc", None, "disease", "small cell lung cancer", "An aggressive neuroendocrine lung cancer that usually arises centrally with bulky hilar and mediastinal nodes.", "small cell lung carcinoma|oat cell carcinoma", "lung_lesion", "lung_cancer", "lung", "hilar_lymphadenopathy"),
    _c("malignant_neoplasm", "C0006826", "disease", "malignant neoplasm", "A tumor that invades surrounding tissue and can spread to distant sites.", "malignancy|cancer|malignant tumor|carcinoma|malignant neoplastic disease", None, "neoplasm"),
    _c("neoplasm", "C0027651", "disease", "neoplasm", "An abnormal growth of tissue, benign or malignant.", "tumor|tumour|neoplasia|neoplasms|new growth"),
    _c("metastasis", "C0027627", "disease", "metastasis", "Spread of a malignant tumor to a distant site; in the lungs often multiple round nodules.", "metastases|metastatic disease|mets|pulmonary metastases|lung metastases|metastatic lesions", None, "malignant_neoplasm"),
    _c("bone_metastasis", None, "disease", "bone metastases", "Spread of a malignant tumor to bone, seen as lytic or sclerotic lesions of the ribs or spine.", "osseous metastases|skeletal metastases|bone metastasis|lytic lesion|lytic lesions|sclerotic lesion|blastic lesion", None, "metastasis bone_abnormality", "bony_thorax"),
    _c("lymphoma", "C0024299", "disease", "lymphoma", "A malignant tumor of lymphocytes, which in the chest often causes mediastinal and hilar lymphadenopathy.", "lymphomas", None, "malignant_neoplasm", "lymph_node", "mediastinal_mass mediastinal_lymphadenopathy"),
    _c("emphysema", "C0034067", "disease", "pulmonary emphysema", "Permanent enlargement of the airspaces beyond the terminal bronchioles with destruction of their walls.", "emphysema|emphysematous changes|emphysematous change|centrilobular emphysema|paraseptal emphysema|panlobular emphysema", None, "lung_disease", "lung", "copd hyperinflation"),
    _c("bullous_disease", None, "finding", "bullous lung disease", "Thin-walled air spaces over 1 cm across within the lung, usually with emphysema.", "bullae|bulla|bullous changes|bullous change|bullous emphysema|pulmonary bullae|pulmonary bulla|giant bulla", None, "pulmonary_abnormality", "lung", "emphysema"),
    _c("hyperinflation", None, "finding", "hyperinflation", "Abnormally large lung volumes with flattened hemidiaphragms, as in COPD or asthma.", "hyperexpansion|hyperinflated lungs|hyperexpanded lungs|hyperexpanded|hyperinflated|overinflation|flattened diaphragm|flattened diaphragms|flattened hemidiaphragms|increased lung volumes|increased lung volume", None, "pulmonary_abnormality", "lung", "copd asthma"),
    _c("copd", "C0024117", "disease", "chronic obstructive pulmonary disease", "Chronic airflow limitation from emphysema and chronic bronchitis, usually caused by smoking.", "COPD|chronic obstructive lung disease|chronic obstructive airway disease|chronic obstructive airways disease|COLD", None, "lung_disease", "lung", "emphysema hyperinflation"),
    _c("asthma", "C0004096", "disease", "asthma", "Chronic inflammatory airway disease with reversible bronchoconstriction.", "bronchial asthma|reactive airway disease|reactive airways disease", None, "airways_disease", "airway", "hyperinflation bronchial_wall_thickening"),
    _c("airways_disease", None, "disease", "airways disease", "Disease of the bronchi or bronchioles such as asthma, bronchitis or bronchiolitis.", "airway disease|small airways disease", None, "lung_disease", "airway"),
    _c("bronchitis", "C0006277", "disease", "bronchitis", "Inflammation of the bronchi, which may thicken the bronchial walls on radiographs.", "", None, "airways_disease", "bronchus", "bronchial_wall_thickening"),
    _c("bronchiolitis", None, "disease", "bronchiolitis", "Inflammation of the small airways, common in infants with viral infection.", "", None, "airways_disease", "airway", "hyperinflation"),
    _c("bronchiectasis", "C0006267", "disease", "bronchiectasis", "Irreversible dilatation of bronchi, seen as tram-track lines and ring shadows.", "bronchiectatic changes|dilated bronchi", None, "airways_disease airway_abnormality", "bronchus"),
    _c("mucus_plugging", None, "finding", "mucus plugging", "Obstruction of a bronchus by mucus, a common cause of lobar collapse.", "mucus plug|mucous plugging|mucus plugs|mucoid impaction", None, "airway_abnormality", "bronchus"),
    _c("ards", "C0035222", "disease", "acute respiratory distress syndrome", "Acute diffuse lung injury with noncardiogenic edema, giving bilateral airspace opacities and severe hypoxemia.", "adult respiratory distress syndrome", None, "lung_disease", "lung", "noncardiogenic_edema"),
    _c("pulmonary_embolism", "C0034065", "disease", "pulmonary embolism", "Blockage of a pulmonary artery, usually by a thrombus from the leg veins; the radiograph is often normal.", "pulmonary embolus|pulmonary thromboembolism|pulmonary emboli", None, "lung_disease", "pulmonary_artery"),
    _c("pulmonary_infarction", None, "disease", "pulmonary infarction", "Death of lung tissue from interrupted blood supply, usually after pulmonary embolism, giving a peripheral wedge-shaped opacity.", "pulmonary infarct|lung infarct|lung infarction", None, "lung_disease", "lung", "pulmonary_embolism"),
    _c("pulmonary_hypertension", "C0020542", "disease", "pulmonary hypertension", "Raised pressure in the pulmonary arteries, shown by enlarged central pulmonary arteries with peripheral pruning.", "pulmonary arterial hypertension", None, "lung_disease", "pulmonary_artery", "pulmonary_artery_enlargement"),
    _c("tuberculosis", "C0041296", "disease", "tuberculosis", "Infection with Mycobacterium tuberculosis; in the lungs it causes upper-lobe consolidation, cavities, lymphadenopathy or miliary nodules.", "TB|tuberculous infection"),
    _c("pulmonary_tuberculosis", "C0041327", "disease", "pulmonary tuberculosis", "Tuberculosis of the lungs.", "lung tuberculosis|pulmonary TB|tuberculosis of lung", None, "tuberculosis lung_disease", "lung"),
    _c("interstitial_lung_disease", None, "disease", "interstitial lung disease", "A group of disorders that inflame or scar the lung interstitium.", "diffuse parenchymal lung disease|interstitial lung diseases", None, "lung_disease", "pulmonary_interstitium", "interstitial_opacity"),
    _c("fibrosis", "C0016059", "finding", "fibrosis", "Formation of excess fibrous connective tissue, as scarring, in an organ.", "fibrotic|fibrotic scarring"),
    _c("pulmonary_fibrosis", "C0034069", "disease", "pulmonary fibrosis", "Scarring of the lung interstitium with volume loss and reticular opacities, ending in honeycombing.", "lung fibrosis|fibrotic changes|fibrotic change|interstitial fibrosis|honeycombing|honeycomb lung", None, "interstitial_lung_disease fibrosis", "lung", "interstitial_opacity"),
    _c("ipf", None, "disease", "idiopathic pulmonary fibrosis", "A chronic, progressive fibrosing lung disease of unknown cause with a usual interstitial pneumonia pattern.", "usual interstitial pneumonia|cryptogenic fibrosing alveolitis", None, "pulmonary_fibrosis", "lung"),
    _c("radiation_fibrosis", None, "finding", "radiation fibrosis", "Scarring of lung inside a radiation field, with sharp non-anatomic margins and volume loss.", "radiation-induced lung changes|post-radiation fibrosis|radiation changes|post-radiation changes|radiation pneumonitis", None, "fibrosis pulmonary_abnormality", "lung", "radiation_therapy"),
    _c("sarcoidosis", "C0036202", "disease", "sarcoidosis", "A multisystem granulomatous disease that classically causes bilateral hilar lymphadenopathy and perilymphatic lung nodules.", "sarcoid", None, "interstitial_lung_disease", "lung", "hilar_lymphadenopathy"),
    _c("pulmonary_contusion", None, "finding", "pulmonary contusion", "Bruising of the lung from blunt trauma, giving non-segmental airspace opacity within a day.", "lung contusion|contusion", None, "trauma_finding", "lung"),
    _c("hemorrhage", "C0019080", "finding", "hemorrhage", "Escape of blood from vessels into tissue or a body cavity.", "haemorrhage|bleeding|hemorrhages"),
    _c("pulmonary_hemorrhage", None, "finding", "pulmonary hemorrhage", "Bleeding into the lung airspaces, giving diffuse or patchy airspace opacity.", "alveolar hemorrhage|lung hemorrhage|diffuse alveolar hemorrhage", None, "hemorrhage pulmonary_abnormality", "pulmonary_airspace"),
    _c("hematoma", "C0018944", "finding", "hematoma", "A localized collection of clotted blood within tissue.", "haematoma|hematomas", None, "", "", "hemorrhage"),
    _c("lucency", None, "finding", "lucency", "An area more radiolucent (darker) than expected.", "lucencies|radiolucency|hyperlucency|irregular lucency"),
    _c("air_fluid_level", None, "finding", "air-fluid level", "A straight horizontal interface between gas and fluid in a cavity or space, seen on an upright radiograph.", "air fluid level|air-fluid levels|gas-fluid level", None, "", "", "hydropneumothorax lung_abscess hiatal_hernia"),
    _c("lymphadenopathy", "C0497156", "finding", "lymphadenopathy", "Enlargement of lymph nodes from infection, inflammation or malignancy.", "adenopathy|enlarged lymph nodes|lymph node enlargement", None, "", "lymph_node"),
    _c("hilar_lymphadenopathy", None, "finding", "hilar lymphadenopathy", "Enlarged lymph nodes at the pulmonary hila, producing lobulated hilar enlargement.", "hilar adenopathy|enlarged hilar lymph nodes|bilateral hilar lymphadenopathy|hilar lymph node enlargement", None, "lymphadenopathy hilar_abnormality", "hilar_lymph_node"),
    _c("mediastinal_lymphadenopathy", None, "finding", "mediastinal lymphadenopathy", "Enlarged lymph nodes in the mediastinum, which can widen the mediastinal contours.", "mediastinal adenopathy|enlarged mediastinal lymph nodes", None, "lymphadenopathy", "mediastinal_lymph_node", "widened_mediastinum"),
]

PLEURAL = [
    _c("pleural_effusion", "C0032227", "finding", "pleural effusion", "Abnormal fluid in the pleural space, blunting the costophrenic angle or layering dependently.", "effusion|effusions|pleural fluid|pleural effusions|hydrothorax|pleural collection", "pleural_effusion", "pleural_abnormality", "pleural_space"),
    _c("bilateral_pleural_effusion", "C0747635", "finding", "bilateral pleural effusions", "Pleural effusions on both sides of the chest.", "bilateral pleural effusion|bilateral effusions", "pleural_effusion", "pleural_effusion", "pleural_space"),
    _c("loculated_pleural_effusion", "C0747639", "finding", "loculated pleural effusion", "Pleural fluid walled off by adhesions so that it does not move freely with position.", "loculated effusion|loculated pleural fluid", "pleural_effusion", "pleural_effusion", "pleural_space"),
    _c("subpulmonic_effusion", None, "finding", "subpulmonic effusion", "Pleural fluid collecting between the lung base and the diaphragm, mimicking an elevated hemidiaphragm.", "subpulmonic pleural effusion|infrapulmonary effusion", "pleural_effusion", "pleural_effusion", "pleural_space"),
    _c("hemothorax", None, "finding", "hemothorax", "Blood in the pleural space, usually from chest trauma.", "haemothorax|hemorrhagic pleural effusion", "pleural_effusion", "pleural_effusion trauma_finding", "pleural_space", "hemorrhage"),
    _c("empyema", None, "disease", "empyema", "Pus in the pleural space, usually a complication of pneumonia.", "pleural empyema|infected pleural effusion|pyothorax", "pleural_effusion", "pleural_effusion pleural_disease", "pleural_space", "pneumonia"),
    _c("chylothorax", None, "finding", "chylothorax", "Lymphatic fluid (chyle) in the pleural space, often from thoracic duct injury or obstruction.", "chylous effusion", "pleural_effusion", "pleural_effusion", "pleural_space"),
    _c("pericardial_effusion", "C0031039", "finding", "pericardial effusion", "Abnormal fluid in the pericardial sac, which can enlarge the cardiac silhouette into a water-bottle shape.", "pericardial fluid", None, "cardiomediastinal_abnormality", "pericardium", "cardiomegaly"),
    _c("costophrenic_blunting", None, "finding", "blunting of the costophrenic angle", "Loss of the sharp costophrenic angle, from a small effusion or pleural thickening.", "costophrenic angle blunting|costophrenic blunting|blunted costophrenic angle|blunted costophrenic angles|blunting costophrenic angle|CP angle blunting|blunting", None, "pleural_abnormality", "costophrenic_angle", "pleural_effusion pleural_thickening"),
    _c("pneumothorax", "C0032326", "finding", "pneumothorax", "Air in the pleural space, separating the visceral pleural line from the chest wall.", "PTX|pneumothoraces|air in the pleural space|pleural air", "pneumothorax", "pleural_abnormality", "pleural_space"),
    _c("chronic_pneumothorax", "C0264557", "finding", "chronic pneumothorax", "A pneumothorax that persists over a long time.", "persistent pneumothorax", "pneumothorax", "pneumothorax", "pleural_space"),
    _c("right_pneumothorax", "C0546333", "finding", "right pneumothorax", "Pneumothorax in the right pleural space.", "right-sided pneumothorax|right sided pneumothorax|right PTX", "pneumothorax", "pneumothorax", "pleural_space right_lung"),
    _c("left_pneumothorax", "C0546334", "finding", "left pneumothorax", "Pneumothorax in the left pleural space.", "left-sided pneumothorax|left sided pneumothorax|left PTX", "pneumothorax", "pneumothorax", "pleural_space left_lung"),
    _c("tension_pneumothorax", None, "finding", "tension pneumothorax", "Pneumothorax under pressure that pushes the mediastinum away and flattens the hemidiaphragm; an emergency.", "tension PTX", "pneumothorax", "pneumothorax", "pleural_space", "mediastinal_shift"),
    _c("hydropneumothorax", None, "finding", "hydropneumothorax", "Air and fluid together in the pleural space, with a straight air-fluid level.", "hydro-pneumothorax", "pneumothorax", "pneumothorax", "pleural_space", "pleural_effusion"),
    _c("hemopneumothorax", "C0019077", "finding", "hemopneumothorax", "Air and blood together in the pleural space, usually after trauma.", "haemopneumothorax", "pneumothorax", "pneumothorax trauma_finding", "pleural_space", "hemothorax"),
    _c("deep_sulcus_sign", None, "finding", "deep sulcus sign", "An abnormally deep, lucent costophrenic sulcus on a supine radiograph, a sign of anterior pneumothorax.", "", None, "radiographic_sign", "costophrenic_angle", "pneumothorax"),
    _c("pleural_line", None, "finding", "visceral pleural line", "The thin white line of visceral pleura seen when air separates it from the chest wall.", "pleural line|white pleural line", None, "radiographic_sign", "pleura", "pneumothorax"),
    _c("pleural_thickening", None, "finding", "pleural thickening", "Fibrous thickening of the pleura after inflammation, infection, hemothorax or asbestos exposure.", "thickened pleura|pleural scarring|pleural scar|pleural fibrosis|pleuroparenchymal scarring|pleural-parenchymal scarring|pleural parenchymal scar|pleuro-parenchymal scar|pleuro-pericardial scar", "pleural_other", "pleural_abnormality", "pleura"),
    _c("apical_pleural_thickening", None, "finding", "apical pleural thickening", "Pleural thickening capping the lung apex, usually a benign sequel of old inflammation.", "apical cap|apical capping|pleural cap|apical pleural cap", "pleural_other", "pleural_thickening", "lung_apex"),
    _c("pleural_plaque", None, "finding", "pleural plaque", "A discrete area of thickened, often calcified parietal pleura, a marker of asbestos exposure.", "pleural plaques|calcified pleural plaque|calcified pleural plaques", "pleural_other", "pleural_thickening", "pleura"),
    _c("pleural_calcification", None, "finding", "pleural calcification", "Calcium deposited in the pleura after hemothorax, empyema, tuberculosis or asbestos exposure.", "calcified pleura|pleural calcifications", "pleural_other", "pleural_abnormality calcification", "pleura"),
    _c("fibrothorax", None, "finding", "fibrothorax", "Dense fibrous encasement of a lung by thickened pleura, restricting its expansion.", "", "pleural_other", "pleural_thickening", "pleura"),
    _c("pleural_mass", None, "finding", "pleural mass", "A mass arising from the pleura, such as mesothelioma, metastasis or fibrous tumor.", "pleural lesion|pleural tumor|pleural nodule|pleural masses", "pleural_other", "pleural_abnormality mass", "pleura"),
    _c("pleural_other", None, "finding", "other pleural abnormality", "A pleural abnormality other than effusion or pneumothorax, such as thickening, plaque or mass; the CheXpert 'Pleural Other' class.", "pleural other", "pleural_other", "pleural_abnormality", "pleura"),
]

CARDIOMEDIASTINAL = [
    _c("cardiomegaly", "C0018800", "finding", "cardiomegaly", "Enlargement of the heart, seen as a cardiothoracic ratio above about 0.5 on a PA radiograph.", "enlarged heart|cardiac enlargement|heart enlargement|enlarged cardiac silhouette|enlargement of the cardiac silhouette", "cardiomegaly", "cardiomediastinal_abnormality", "heart"),
    _c("left_atrial_enlargement", None, "finding", "left atrial enlargement", "Dilatation of the left atrium, for example from mitral valve disease.", "enlarged left atrium|LA enlargement|left atrial dilatation", None, "cardiomediastinal_abnormality", "left_atrium", "cardiomegaly"),
    _c("enlarged_cardiomediastinum", None, "finding", "enlarged cardiomediastinum", "Widening of the combined cardiac and mediastinal silhouette beyond normal; the CheXpert 'Enlarged Cardiomediastinum' class.", "enlarged cardiomediastinal silhouette|widened cardiomediastinal silhouette", "enlarged_cardiomediastinum", "cardiomediastinal_abnormality", "cardiomediastinal_silhouette"),
    _c("widened_mediastinum", None, "finding", "widened mediastinum", "Abnormal width of the mediastinum, which may signal aortic injury, a mass or lymphadenopathy.", "mediastinal widening|mediastinal enlargement|wide mediastinum|widening of the mediastinum", "enlarged_cardiomediastinum", "enlarged_cardiomediastinum", "mediastinum"),
    _c("mediastinal_mass", None, "finding", "mediastinal mass", "A space-occupying lesion in the mediastinum, such as thymoma, lymphoma, goiter or a germ cell tumor.", "mediastinal lesion|anterior mediastinal mass|mediastinal masses", "enlarged_cardiomediastinum", "enlarged_cardiomediastinum mass", "mediastinum"),
    _c("mediastinal_shift", None, "finding", "mediastinal shift", "Displacement of the mediastinum toward volume loss or away from a space-occupying process.", "shift of the mediastinum|mediastinal deviation|mass effect on the mediastinum", None, "cardiomediastinal_abnormality", "mediastinum"),
    _c("pulmonary_artery_enlargement", None, "finding", "pulmonary artery enlargement", "Dilatation of the main or central pulmonary arteries beyond normal caliber.", "enlarged pulmonary artery|enlarged pulmonary arteries|dilated pulmonary artery|prominent pulmonary arteries|prominent pulmonary artery", None, "cardiomediastinal_abnormality", "pulmonary_artery", "pulmonary_hypertension"),
    _c("aortic_calcification", None, "finding", "aortic calcification", "Calcium in the aortic wall, usually from atherosclerosis and often at the aortic knob.", "calcified aorta|aortic atherosclerosis|aortic knob calcification|calcified aortic knob|calcification of the aorta", None, "cardiomediastinal_abnormality calcification", "aorta", "atherosclerosis"),
    _c("tortuous_aorta", None, "finding", "tortuous aorta", "Elongation and curving of the thoracic aorta with age or hypertension, which can widen the mediastinal contour.", "aortic tortuosity|unfolded aorta|unfolding of the aorta|ectatic aorta|aortic ectasia|elongated aorta|tortuosity of the aorta", None, "cardiomediastinal_abnormality", "aorta"),
    _c("aortic_enlargement", None, "finding", "aortic enlargement", "Increase of the aortic caliber beyond normal.", "dilated aorta|enlarged aorta|aortic dilatation|aortic dilation|prominent aorta", None, "cardiomediastinal_abnormality", "aorta", "aortic_aneurysm"),
    _c("aortic_aneurysm", "C0003486", "disease", "aortic aneurysm", "Focal dilatation of the aorta to at least 1.5 times its normal diameter.", "aneurysm of aorta|aortic aneurysms|thoracic aortic aneurysm", None, "", "aorta", "widened_mediastinum"),
    _c("aortic_dissection", None, "disease", "aortic dissection", "A tear in the aortic intima letting blood split the layers of the wall, which may widen the mediastinum.", "dissection of the aorta|dissecting aneurysm", None, "", "aorta", "widened_mediastinum"),
    _c("atherosclerosis", "C0004153", "disease", "atherosclerosis", "Build-up of lipid plaques in arterial walls, often calcified.", "atherosclerotic disease|atheromatous disease|arteriosclerosis|atherosclerotic changes"),
    _c("heart_failure", "C0018801", "disease", "heart failure", "Inability of the heart to pump enough blood for the body's needs.", "cardiac failure", None, "", "heart", "pulmonary_edema cardiomegaly"),
    _c("congestive_heart_failure", "C0018802", "disease", "congestive heart failure", "Heart failure with fluid retention, producing pulmonary venous congestion, edema and pleural effusions.", "CHF|congestive cardiac failure|CCF|decompensated heart failure", None, "heart_failure", "heart", "pulmonary_edema vascular_congestion pleural_effusion cardiomegaly"),
    _c("fluid_overload", None, "finding", "fluid overload", "Excess body fluid volume, which can cause pulmonary vascular congestion and edema.", "volume overload|hypervolemia", None, "", "", "pulmonary_edema vascular_congestion"),
    _c("coarctation", None, "disease", "coarctation of the aorta", "Congenital narrowing of the aorta near the ductus arteriosus, with rib notching and a figure-3 sign.", "aortic coarctation", None, "", "aorta"),
    _c("tetralogy_of_fallot", None, "disease", "tetralogy of Fallot", "Cyanotic congenital heart disease with ventricular septal defect, overriding aorta, right ventricular outflow obstruction and right ventricular hypertrophy.", "Fallot tetralogy", None, "", "heart"),
    _c("tga", None, "disease", "transposition of the great arteries", "Congenital heart disease in which the aorta arises from the right ventricle and the pulmonary artery from the left.", "transposition of great arteries|transposition of great vessels|D-TGA", None, "", "heart"),
    _c("tapvr", None, "disease", "total anomalous pulmonary venous return", "Congenital heart disease in which all pulmonary veins drain into the systemic venous side instead of the left atrium.", "TAPVR|total anomalous pulmonary venous connection|TAPVC", None, "", "heart"),
    _c("scimitar_syndrome", None, "disease", "scimitar syndrome", "Congenital anomalous venous drainage of the right lung to the inferior vena cava with a small right lung.", "hypogenetic lung syndrome|venolobar syndrome", None, "", "right_lung"),
    _c("atrial_septal_defect", None, "disease", "atrial septal defect", "A congenital opening in the wall between the atria, causing a left-to-right shunt.", "interatrial septal defect", None, "", "heart"),
    _c("ventricular_septal_defect", None, "disease", "ventricular septal defect", "A congenital opening in the wall between the ventricles, causing a left-to-right shunt.", "interventricular septal defect", None, "", "heart"),
    _c("goiter", None, "disease", "goiter", "Enlargement of the thyroid gland, which may extend behind the sternum and displace the trachea.", "goitre|thyroid goiter|substernal goiter|retrosternal goiter", None, "", "neck", "mediastinal_mass tracheal_deviation"),
]

OTHER_FINDINGS = [
    _c("pneumomediastinum", "C0025062", "finding", "pneumomediastinum", "Free air in the mediastinum, outlining mediastinal structures.", "mediastinal emphysema|mediastinal air|air in the mediastinum", None, "extraluminal_air", "mediastinum"),
    _c("pneumopericardium", None, "finding", "pneumopericardium", "Air within the pericardial sac around the heart.", "pericardial air", None, "extraluminal_air", "pericardium"),
    _c("pneumoperitoneum", None, "finding", "pneumoperitoneum", "Free gas in the peritoneal cavity, seen under the diaphragm on an upright radiograph.", "free air|free intraperitoneal air|free air under the diaphragm|subdiaphragmatic free air|free abdominal air", None, "extraluminal_air", "peritoneal_cavity"),
    _c("subcutaneous_emphysema", "C0038536", "finding", "subcutaneous emphysema", "Gas in the subcutaneous soft tissues, often from chest trauma, a chest tube or pneumothorax.", "subcutaneous air|subcutaneous gas|soft tissue emphysema|soft tissue air|surgical emphysema", None, "extraluminal_air", "soft_tissues"),
    _c("tracheobronchial_injury", None, "finding", "tracheobronchial injury", "A tear of the trachea or a bronchus, usually from severe trauma, with persistent air leak.", "bronchial rupture|bronchial transection|tracheobronchial tear|airway rupture", None, "trauma_finding airway_abnormality", "bronchus"),
    _c("tracheal_deviation", None, "finding", "tracheal deviation", "Displacement of the trachea from the midline by a mass, volume loss or tension.", "deviated trachea|tracheal shift|displaced trachea|shifted trachea", None, "airway_abnormality", "trachea", "mediastinal_shift"),
    _c("hernia", "C0019270", "disease", "hernia", "Protrusion of an organ or tissue through an opening in the wall that normally contains it.", "hernias|herniation"),
    _c("hiatal_hernia", "C0019291", "disease", "hiatal hernia", "Protrusion of part of the stomach through the esophageal hiatus into the chest, often a retrocardiac air-fluid level.", "hiatus hernia|sliding hiatal hernia|paraesophageal hernia|para-esophageal hernia|hernia hiatal", None, "hernia", "diaphragm stomach"),
    _c("diaphragmatic_hernia", None, "disease", "diaphragmatic hernia", "Protrusion of abdominal contents through a defect in the diaphragm.", "Bochdalek hernia|Morgagni hernia|congenital diaphragmatic hernia|CDH", None, "hernia", "diaphragm"),
    _c("elevated_hemidiaphragm", None, "finding", "elevated hemidiaphragm", "A hemidiaphragm higher than expected, from volume loss, phrenic nerve palsy, eventration or a subdiaphragmatic process.", "elevation of the hemidiaphragm|hemidiaphragm elevation|raised hemidiaphragm|elevated diaphragm|elevated right hemidiaphragm|elevated left hemidiaphragm", None, "", "diaphragm", "volume_loss"),
    _c("eventration", None, "finding", "eventration of the diaphragm", "Congenital thinning of part of the diaphragm muscle, which bulges upward.", "diaphragmatic eventration|eventration", None, "", "diaphragm", "elevated_hemidiaphragm"),
    _c("fracture", "C0016658", "finding", "fracture", "A break in the continuity of a bone.", "fractures|fractured|broken bone|osseous fracture|bone fracture", "fracture", "trauma_finding bone_abnormality", "bony_thorax"),
    _c("rib_fracture", None, "finding", "rib fracture", "A break in a rib, from trauma, cough or weakened bone.", "rib fractures|fractured rib|fractured ribs|broken rib", "fracture", "fracture", "rib"),
    _c("acute_rib_fracture", None, "finding", "acute rib fracture", "A recent rib fracture with sharp edges and no callus.", "new rib fracture|recent rib fracture|acute rib fractures|displaced rib fracture|nondisplaced rib fracture", "fracture", "rib_fracture", "rib"),
    _c("healed_rib_fracture", None, "finding", "healed rib fracture", "An old rib fracture showing callus or remodeling.", "old rib fracture|old rib fractures|healed rib fractures|remote rib fracture|chronic rib fracture|healing rib fracture", "fracture", "rib_fracture", "rib"),
    _c("clavicle_fracture", None, "finding", "clavicle fracture", "A break in the clavicle.", "clavicular fracture|fractured clavicle", "fracture", "fracture", "clavicle"),
    _c("humerus_fracture", None, "finding", "humerus fracture", "A break in the humerus, on chest radiographs usually its proximal part.", "humeral fracture|fractured humerus", "fracture", "fracture", "humerus"),
    _c("sternal_fracture", None, "finding", "sternal fracture", "A break in the sternum, usually from blunt anterior chest trauma.", "fractured sternum", "fracture", "fracture", "sternum"),
    _c("vertebral_compression_fracture", None, "finding", "vertebral compression fracture", "Collapse of a vertebral body, often from osteoporosis.", "compression fracture|vertebral fracture|compression deformity|vertebral body compression fracture", "fracture", "fracture", "thoracic_spine", "osteoporosis"),
    _c("shoulder_dislocation", None, "finding", "shoulder dislocation", "Displacement of the humeral head out of the glenoid fossa.", "glenohumeral dislocation|dislocated shoulder|glenohumeral joint dislocation|shoulder subluxation", None, "trauma_finding", "shoulder"),
    _c("osteopenia", None, "finding", "osteopenia", "Reduced bone density on radiographs.", "demineralization|decreased bone density|osteopenic bones|diffuse osteopenia", None, "bone_abnormality", "bony_thorax", "osteoporosis"),
    _c("osteoporosis", "C0029456", "disease", "osteoporosis", "Systemic loss of bone mass and strength that predisposes to fractures.", "", None, "", "bony_thorax", "osteopenia vertebral_compression_fracture"),
    _c("scoliosis", "C0036439", "finding", "scoliosis", "Sideways curvature of the spine.", "scoliotic curvature|spinal curvature|dextroscoliosis|levoscoliosis", None, "bone_abnormality", "vertebral_column"),
    _c("kyphosis", "C0022821", "finding", "kyphosis", "Exaggerated forward curvature of the thoracic spine.", "kyphotic|thoracic kyphosis|increased kyphosis", None, "bone_abnormality", "thoracic_spine"),
    _c("degenerative_spine", None, "finding", "degenerative changes of the spine", "Age-related wear of the spine: disc-space narrowing, endplate sclerosis and osteophytes.", "spondylosis|degenerative changes|degenerative disc disease|osteophytosis|osteophytes|spinal degenerative changes|degenerative spine disease", None, "bone_abnormality", "thoracic_spine"),
    _c("arthropathy", None, "disease", "arthropathy", "Joint disease; on chest radiographs usually degenerative change of the shoulder or acromioclavicular joints.", "joint disease|arthritic changes|degenerative joint disease", None, "bone_abnormality", "shoulder"),
    _c("pectus_excavatum", None, "finding", "pectus excavatum", "Inward depression of the sternum, which can displace the heart and blur the right heart border.", "funnel chest", None, "bone_abnormality", "sternum"),
    _c("calcification", None, "finding", "calcification", "Deposition of calcium salts in tissue, appearing very dense on radiographs.", "calcifications|calcified|calcific density|calcific densities"),
    _c("foreign_body", None, "finding", "foreign body", "An object from outside the body lying within it, such as an ingested coin or a retained fragment.", "foreign bodies|retained foreign body|ingested foreign body|aspirated foreign body|metallic foreign body|metallic fragment|metallic fragments"),
    _c("bullet_fragments", None, "finding", "bullet fragments", "Metallic fragments from a gunshot retained in the body.", "bullet fragment|retained bullet|retained bullets|bullet|shrapnel|ballistic fragments", None, "foreign_body"),
    _c("nipple_shadow", None, "finding", "nipple shadow", "A rounded soft-tissue density from a nipple projecting over the lung base, which can mimic a nodule.", "nipple shadows", None, "", "breast", "lung_nodule"),
    _c("skin_fold", None, "finding", "skin fold", "A line from overlapping skin on a supine radiograph that can mimic a pneumothorax.", "skin folds|skinfold", None, "", "soft_tissues", "pneumothorax"),
]

# Radiographic signs whose definitions come from radiology_semantic_dict/imaging_signs.json (key):
# (slug, name, aliases, associated_with[, clause replacing "suggests <indicates>"]).
SIGNS = [
    ("air_bronchogram", "air bronchogram", "air bronchograms", "consolidation pneumonia pulmonary_edema"),
    ("silhouette_sign", "silhouette sign", "", "consolidation atelectasis",
     "it places the disease in the lobe next to the obscured border"),
    ("golden_s_sign", "Golden S sign", "reverse S sign of Golden|S sign of Golden", "lobar_collapse lung_cancer"),
    ("air_crescent_sign", "air crescent sign", "", "aspergilloma cavitary_lesion"),
    ("monod_sign", "Monod sign", "", "aspergilloma"),
    ("moguls_sign", "mogul sign", "", "left_atrial_enlargement"),
    ("hampton_hump", "Hampton hump", "Hampton's hump", "pulmonary_infarction pulmonary_embolism"),
    ("westermark_sign", "Westermark sign", "", "pulmonary_embolism"),
    ("fleischner_sign", "Fleischner sign", "", "pulmonary_embolism pulmonary_artery_enlargement"),
    ("continuous_diaphragm_sign", "continuous diaphragm sign", "", "pneumomediastinum"),
    ("fallen_lung_sign", "fallen lung sign", "", "tracheobronchial_injury"),
    ("egg_on_a_string_sign", "egg-on-a-string sign", "egg on a string sign|egg on a string", "tga"),
    ("snowman_sign", "snowman sign", "figure-of-8 heart|figure of eight heart", "tapvr"),
    ("figure_3_sign", "figure 3 sign", "figure-3 sign|figure three sign", "coarctation"),
    ("scimitar_sign", "scimitar sign", "", "scimitar_syndrome"),
    ("boot_shaped_heart", "boot-shaped heart", "boot shaped heart|coeur en sabot", "tetralogy_of_fallot"),
]

DEVICES = [
    _dev("support_device", None, "support device", "Any tube, line, catheter, electronic device or implant placed for monitoring or treatment; the CheXpert 'Support Devices' class.", "support devices|lines and tubes|tubes and lines|medical device|medical devices|hardware|support apparatus|monitoring and support devices", is_a=""),
    _dev("medical_tube", None, "medical tube", "A hollow flexible tube placed in a body cavity or passage for ventilation, drainage or feeding.", "tube|tubes"),
    _dev("catheter", None, "catheter", "A thin flexible tube inserted into a vessel or cavity to deliver or drain fluid or to measure pressure.", "catheters|cannula|cannulas"),
    _dev("endotracheal_tube", None, "endotracheal tube", "A tube passed through the mouth or nose into the trachea to ventilate the lungs; its tip should lie 3-5 cm above the carina.", "ETT|ET tube|endotracheal tubes|tracheal tube|endotracheal cannula|breathing tube", "medical_tube", "trachea", "carina endotracheal_intubation"),
    _dev("tracheostomy_tube", None, "tracheostomy tube", "A tube placed through a tracheostomy in the neck into the trachea.", "trach tube|trach|tracheostomy cannula|trach cannula|tracheotomy tube", "medical_tube", "trachea", "tracheostomy"),
    _dev("enteric_tube", None, "enteric tube", "A tube placed into the stomach or small bowel for feeding, drainage or decompression.", "feeding tube|gastric tube|enteric feeding tube|nasoenteric tube|enteric tubes", "medical_tube", "stomach"),
    _dev("nasogastric_tube", None, "nasogastric tube", "A tube passed through the nose and esophagus into the stomach for drainage or feeding.", "NGT|NG tube|nasogastric tubes|Salem sump", "enteric_tube", "stomach esophagus"),
    _dev("orogastric_tube", None, "orogastric tube", "A tube passed through the mouth and esophagus into the stomach, common in intubated patients.", "OGT|OG tube|orogastric tubes", "enteric_tube", "stomach esophagus"),
    _dev("dobhoff_tube", None, "Dobhoff tube", "A thin, weighted-tip nasoenteric feeding tube, usually advanced into the duodenum.", "DHT|Dobhoff|Dobbhoff tube|nasoduodenal tube|small-bore feeding tube", "enteric_tube", "stomach"),
    _dev("gastrostomy_tube", None, "gastrostomy tube", "A feeding tube placed through the abdominal wall into the stomach.", "G-tube|G tube|PEG tube|percutaneous gastrostomy tube", "enteric_tube", "stomach"),
    _dev("central_venous_catheter", None, "central venous catheter", "A catheter whose tip lies in a large central vein, ideally the lower superior vena cava or the cavoatrial junction.", "CVC|central line|central venous line|central catheter|central venous access|triple lumen catheter|central lines", "catheter", "superior_vena_cava", "cavoatrial_junction"),
    _dev("picc", None, "peripherally inserted central catheter", "A central venous catheter inserted through an arm vein with its tip in the superior vena cava.", "PICC|PICC line|PICC lines|PIC line|PIC catheter", "central_venous_catheter", "superior_vena_cava"),
    _dev("ij_catheter", None, "internal jugular catheter", "A central venous catheter inserted through the internal jugular vein.", "IJ line|IJ catheter|internal jugular line|internal jugular central line|jugular line|right IJ line|left IJ line", "central_venous_catheter", "internal_jugular_vein superior_vena_cava"),
    _dev("subclavian_catheter", None, "subclavian catheter", "A central venous catheter inserted through the subclavian vein.", "subclavian line|subclavian central line|subclavian venous catheter", "central_venous_catheter", "subclavian_vein superior_vena_cava"),
    _dev("dialysis_catheter", None, "hemodialysis catheter", "A large-bore, usually double-lumen central venous catheter for hemodialysis, with its tip near the right atrium.", "dialysis catheter|HD catheter|dialysis line|tunneled dialysis catheter|Quinton catheter|Permcath", "central_venous_catheter", "right_atrium"),
    _dev("port_catheter", None, "implanted port", "A subcutaneous reservoir in the chest wall connected to a central venous catheter for long-term access.", "port|port-a-cath|portacath|Port-A-Cath catheter|mediport|chest port|power port|venous port|implantable port|implanted venous port", "central_venous_catheter", "chest_wall superior_vena_cava"),
    _dev("tunneled_catheter", None, "tunneled catheter", "A central venous catheter that runs under the skin before entering the vein, for long-term use.", "tunneled central venous catheter|Hickman catheter|Hickman line|tunneled line", "central_venous_catheter", "superior_vena_cava"),
    _dev("pa_catheter", None, "pulmonary artery catheter", "A catheter floated through the right heart into a pulmonary artery to measure pressures.", "Swan-Ganz catheter|Swan Ganz catheter|Swan-Ganz|PA catheter|right heart catheter", "catheter", "pulmonary_artery"),
    _dev("chest_tube", None, "chest tube", "A tube inserted through the chest wall into the pleural space to drain air or fluid.", "chest tubes|chest drain|chest drains|thoracostomy tube|intercostal drain|pleural drain|pleural tube|intercostal tube|pigtail catheter|pigtail drain|tube thoracostomy", "medical_tube", "pleural_space", "pneumothorax pleural_effusion"),
    _dev("pleurx_catheter", None, "tunneled pleural catheter", "A long-term indwelling pleural catheter for draining recurrent effusions at home.", "PleurX catheter|PleurX|indwelling pleural catheter", "chest_tube", "pleural_space", "pleural_effusion"),
    _dev("mediastinal_drain", None, "mediastinal drain", "A drain left in the mediastinum after cardiac surgery.", "mediastinal drains|mediastinal tube|mediastinal tubes", "medical_tube", "mediastinum", "median_sternotomy"),
    _dev("cardiac_electronic_device", None, "cardiac implantable electronic device", "Any implanted electronic device that paces or monitors the heart: pacemakers, defibrillators and loop recorders.", "CIED|cardiac device|implantable cardiac device|cardiac implantable device", "support_device", "heart"),
    _dev("pacemaker", "C0030163", "pacemaker", "An implanted device with a generator in the chest wall and leads in the heart that paces the heart rhythm.", "cardiac pacemaker|pacer|permanent pacemaker|PPM|dual chamber pacemaker|single chamber pacemaker|biventricular pacemaker|artificial pacemaker|pacemaker generator|transvenous pacemaker|pacemaker device", "cardiac_electronic_device", "heart chest_wall", "pacing_leads"),
    _dev("icd", None, "implantable cardioverter-defibrillator", "An implanted device that detects dangerous ventricular arrhythmias and shocks the heart; its leads carry thick shock coils.", "ICD|AICD|defibrillator|implantable defibrillator|implantable cardioverter defibrillator|cardioverter defibrillator|automatic implantable cardioverter-defibrillator", "cardiac_electronic_device", "heart chest_wall"),
    _dev("crt_device", None, "cardiac resynchronization therapy device", "A biventricular pacing device, with or without a defibrillator, that coordinates ventricular contraction.", "CRT|CRT-D|CRT-P|biventricular ICD|cardiac resynchronization device", "cardiac_electronic_device", "heart"),
    _dev("pacing_leads", None, "pacing leads", "Wires running from a pacemaker or defibrillator generator through the veins into the heart chambers.", "pacing lead|pacemaker leads|pacemaker lead|pacer leads|pacing wires|pacing wire|pacemaker wires|pacemaker wire|transvenous pacing lead|transvenous pacing wire|pacer wires", "support_device", "heart"),
    _dev("epicardial_pacing_wires", None, "epicardial pacing wires", "Temporary pacing wires sewn onto the heart surface during cardiac surgery.", "epicardial wires|epicardial pacing wire|temporary pacing wires", "support_device", "heart", "coronary_artery_bypass_graft"),
    _dev("loop_recorder", None, "implantable loop recorder", "A small subcutaneous device over the heart that records the heart rhythm for months to years.", "loop recorder|ILR|implantable cardiac monitor|insertable cardiac monitor", "cardiac_electronic_device", "chest_wall"),
    _dev("implanted_electronic_device", None, "implanted electronic device", "A non-cardiac implanted electronic device such as a neurostimulator or drug pump, whose generator or leads may project over the chest.", "implantable electronic device|neurostimulator|spinal cord stimulator|nerve stimulator|vagus nerve stimulator|vagal nerve stimulator|deep brain stimulator|infusion pump|pain pump|intrathecal pump|phrenic nerve stimulator"),
    _dev("surgical_hardware", None, "surgical hardware", "Implanted surgical material such as plates, screws, rods or wires.", "postsurgical hardware|orthopedic hardware|fixation hardware|plate and screws|plates and screws|surgical plate|surgical screws|fixation plate|plate|screw|screws"),
    _dev("sternotomy_wires", None, "sternotomy wires", "Wire sutures closing the sternum after median sternotomy.", "sternal wires|median sternotomy wires|sternal cerclage wires|sternotomy sutures|sternal sutures|wire sutures", "surgical_hardware", "sternum", "median_sternotomy"),
    _dev("surgical_clips", None, "surgical clips", "Small metal clips left after surgery to close vessels or mark a site.", "clips|surgical clip|vascular clips|staples|surgical staples|surgical suture line", "surgical_hardware"),
    _dev("spinal_fusion_hardware", None, "spinal fusion hardware", "Rods and pedicle screws fixing vertebrae after spinal fusion.", "spinal hardware|spinal fusion|pedicle screws|spinal rods|fusion hardware", "surgical_hardware", "thoracic_spine"),
    _dev("shoulder_arthroplasty", None, "shoulder arthroplasty", "A prosthetic replacement of the shoulder joint.", "shoulder replacement|shoulder prosthesis|arthroplasty|humeral prosthesis|joint replacement", "surgical_hardware", "shoulder"),
    _dev("vertebral_augmentation_cement", None, "vertebroplasty cement", "Dense bone cement injected into a collapsed vertebral body.", "kyphoplasty cement|vertebroplasty|kyphoplasty|bone cement", "surgical_hardware", "thoracic_spine", "vertebral_compression_fracture"),
    _dev("prosthetic_valve", None, "prosthetic heart valve", "A mechanical or biological replacement heart valve.", "prosthetic valve|valve prosthesis|mechanical valve|bioprosthetic valve|mechanical heart valve|artificial heart valve|replaced valve|prosthetic aortic valve|prosthetic mitral valve", "support_device", "heart", "valve_replacement"),
    _dev("annuloplasty_ring", None, "annuloplasty ring", "A ring sewn around a heart valve annulus, usually the mitral, to repair regurgitation.", "mitral annuloplasty ring|annuloplasty band", "support_device", "mitral_valve"),
    _dev("iabp", None, "intra-aortic balloon pump", "A balloon catheter in the descending thoracic aorta that inflates in diastole to support the failing heart; its tip should lie just below the aortic arch.", "IABP|intraaortic balloon pump|intra-aortic balloon|balloon pump", "catheter", "descending_aorta"),
    _dev("lvad", None, "left ventricular assist device", "An implanted pump that moves blood from the left ventricle into the aorta in advanced heart failure.", "LVAD|ventricular assist device|VAD", "support_device", "left_ventricle", "heart_failure"),
    _dev("ecmo_cannula", None, "ECMO cannula", "A large cannula for extracorporeal membrane oxygenation, placed in a great vein or artery.", "ECMO|ECMO cannulas|extracorporeal membrane oxygenation cannula|ECMO catheter", "catheter", "superior_vena_cava"),
    _dev("ecg_leads", None, "ECG leads", "External skin electrodes and wires for cardiac monitoring that project over the chest.", "EKG leads|ECG electrodes|EKG electrodes|telemetry leads|monitoring leads|cardiac monitoring leads|electrocardiographic leads|ECG wires|EKG wires|telemetry wires", "support_device", "chest_wall"),
    _dev("vascular_stent", None, "vascular stent", "A metal mesh tube placed in a blood vessel to keep it open or exclude an aneurysm.", "stent|stents|endovascular stent|stent graft|endograft|aortic stent graft", "support_device"),
    _dev("coronary_stent", None, "coronary stent", "A stent placed in a coronary artery during angioplasty.", "coronary stents|coronary artery stent", "vascular_stent", "coronary_artery"),
    _dev("ivc_filter", None, "IVC filter", "A filter in the inferior vena cava that traps emboli from the leg veins.", "inferior vena cava filter|vena cava filter|Greenfield filter", "support_device", "inferior_vena_cava", "pulmonary_embolism"),
    _dev("esophageal_stent", None, "esophageal stent", "A stent placed in the esophagus to relieve an obstruction or seal a leak.", "oesophageal stent", "support_device", "esophagus"),
    _dev("airway_stent", None, "airway stent", "A stent placed in the trachea or a bronchus to keep it open.", "tracheal stent|bronchial stent|tracheobronchial stent", "support_device", "trachea"),
    _dev("embolization_coils", None, "embolization coils", "Metal coils placed in a vessel or aneurysm to block blood flow.", "embolization coil|coil|coils|endovascular coils", "support_device"),
    _dev("skin_marker", None, "skin marker", "A radiopaque marker taped to the skin, for example over a nipple or a lesion.", "nipple marker|nipple markers|skin markers|BB marker|radiopaque marker|marker", is_a="", label=None),
    _dev("breast_implant", None, "breast implant", "A silicone or saline prosthesis in the breast, casting a dense rounded shadow over the lower chest.", "breast implants|breast prosthesis|breast prostheses|breast augmentation", is_a="", site="breast", label=None),
]

PROCEDURES = [
    _c("radiography", None, "procedure", "radiography", "Imaging with X-rays passed through the body onto a detector.", "radiograph|radiographs|X-ray|X-rays|xray|plain film|plain radiograph|roentgenogram|radiographic examination"),
    _c("chest_radiograph", "C0039985", "procedure", "chest radiograph", "A plain X-ray image of the chest, the most common imaging examination.", "CXR|CXRs|chest x-ray|chest x-rays|chest film|chest radiography|plain chest X-ray|chest radiographs|plain film of the chest|chest X-ray examination", None, "radiography", "chest"),
    _c("pa_view", None, "procedure", "posteroanterior view", "A frontal chest radiograph with the beam passing from back to front, the standard upright view.", "PA view|PA projection|PA radiograph|posteroanterior projection|PA chest radiograph", None, "chest_radiograph"),
    _c("ap_view", None, "procedure", "anteroposterior view", "A frontal radiograph with the beam passing from front to back, used for portable and supine studies; it magnifies the heart.", "AP view|AP projection|AP radiograph|anteroposterior projection|AP chest radiograph", None, "chest_radiograph"),
    _c("lateral_view", None, "procedure", "lateral view", "A side-on chest radiograph, complementing the frontal view.", "lateral projection|lateral radiograph|lateral chest radiograph|lateral film", None, "chest_radiograph"),
    _c("portable_radiograph", None, "procedure", "portable chest radiograph", "A chest radiograph taken at the bedside with a mobile unit, usually AP.", "portable chest x-ray|portable radiograph|portable AP|portable film|bedside radiograph|bedside chest radiograph|portable study", None, "chest_radiograph"),
    _c("supine_radiograph", None, "procedure", "supine chest radiograph", "A chest radiograph taken lying on the back, in which air rises anteriorly and fluid layers posteriorly.", "supine radiograph|supine view|supine film|supine AP", None, "chest_radiograph"),
    _c("decubitus_view", None, "procedure", "lateral decubitus view", "A radiograph taken lying on one side, to show free-flowing pleural fluid or a small pneumothorax.", "decubitus view|decubitus radiograph|decubitus film", None, "chest_radiograph", "", "pleural_effusion"),
    _c("computed_tomography", "C0040405", "procedure", "computed tomography", "Cross-sectional imaging reconstructed from X-ray projections around the body.", "CT scan|CAT scan|computed tomography scan|X-ray computed tomography"),
    _c("chest_ct", None, "procedure", "chest CT", "Computed tomography of the thorax.", "CT chest|CT of the chest|chest computed tomography|thoracic CT", None, "computed_tomography", "chest"),
    _c("hrct", None, "procedure", "high-resolution CT", "Thin-section chest CT with a sharp reconstruction kernel for the lung interstitium.", "high resolution computed tomography|high-resolution computed tomography|high resolution CT", None, "chest_ct", "lung"),
    _c("ctpa", None, "procedure", "CT pulmonary angiography", "Contrast-enhanced chest CT timed to the pulmonary arteries to look for pulmonary embolism.", "CT pulmonary angiogram|CT angiography of the chest|CTA chest", None, "chest_ct", "pulmonary_artery", "pulmonary_embolism"),
    _c("coronary_artery_bypass_graft", "C0010055", "procedure", "coronary artery bypass graft", "Heart surgery that bypasses blocked coronary arteries with vein or artery grafts, usually through a median sternotomy.", "coronary artery bypass grafting|coronary artery bypass surgery|bypass surgery|coronary bypass|coronary artery bypass", None, "", "coronary_artery", "median_sternotomy sternotomy_wires surgical_clips"),
    _c("median_sternotomy", None, "procedure", "median sternotomy", "Surgical vertical division of the sternum to reach the heart and mediastinum.", "sternotomy|midline sternotomy|prior sternotomy", None, "", "sternum", "sternotomy_wires"),
    _c("tracheostomy", "C0040590", "procedure", "tracheostomy", "Surgical opening into the trachea through the neck for an airway tube.", "tracheotomy", None, "", "trachea", "tracheostomy_tube"),
    _c("endotracheal_intubation", "C0021932", "procedure", "endotracheal intubation", "Insertion of a tube into the trachea to secure the airway and ventilate the lungs.", "intubation|tracheal intubation|intubated|orotracheal intubation", None, "", "trachea", "endotracheal_tube"),
    _c("thoracentesis", None, "procedure", "thoracentesis", "Needle drainage of pleural fluid for diagnosis or relief.", "pleural tap|pleurocentesis|thoracocentesis", None, "", "pleural_space", "pleural_effusion pneumothorax"),
    _c("thoracotomy", None, "procedure", "thoracotomy", "A surgical incision through the chest wall into the pleural cavity.", "prior thoracotomy|thoracotomy changes", None, "", "chest_wall"),
    _c("lobectomy", None, "procedure", "lobectomy", "Surgical removal of a lobe of a lung.", "lung lobectomy|pulmonary lobectomy|right upper lobectomy|left upper lobectomy", None, "", "lung_lobe", "volume_loss"),
    _c("pneumonectomy", None, "procedure", "pneumonectomy", "Surgical removal of an entire lung.", "post-pneumonectomy|lung removal", None, "", "lung", "mediastinal_shift"),
    _c("wedge_resection", None, "procedure", "wedge resection", "Surgical removal of a small wedge of lung, often for a peripheral nodule.", "lung wedge resection|wedge resections", None, "", "lung", "surgical_clips"),
    _c("lung_transplant", None, "procedure", "lung transplantation", "Replacement of one or both diseased lungs with donor lungs.", "lung transplant|single lung transplant|bilateral lung transplant|double lung transplant", None, "", "lung"),
    _c("pleurodesis", None, "procedure", "pleurodesis", "Obliteration of the pleural space with an irritant such as talc to prevent recurrent effusion or pneumothorax.", "talc pleurodesis", None, "", "pleural_space", "pleural_thickening"),
    _c("esophagectomy", None, "procedure", "esophagectomy", "Surgical removal of the esophagus, usually with a gastric pull-up into the chest.", "esophageal resection|gastric pull-through|oesophagectomy", None, "", "esophagus"),
    _c("mastectomy", "C0024881", "procedure", "mastectomy", "Surgical removal of a breast, which leaves that side of the chest more lucent.", "mastectomies|breast removal", None, "", "breast", "lucency"),
    _c("valve_replacement", None, "procedure", "valve replacement", "Surgical replacement of a diseased heart valve with a mechanical or biological prosthesis.", "heart valve replacement|aortic valve replacement|AVR|mitral valve replacement|MVR|valve surgery", None, "", "heart", "prosthetic_valve"),
    _c("tavr", None, "procedure", "transcatheter aortic valve replacement", "Placement of a stented aortic valve prosthesis through a catheter, without open surgery.", "TAVI|transcatheter aortic valve implantation", None, "valve_replacement", "aortic_valve", "prosthetic_valve"),
    _c("biopsy", None, "procedure", "biopsy", "Removal of a tissue sample for examination; a lung biopsy can cause a pneumothorax.", "lung biopsy|percutaneous biopsy|transthoracic needle biopsy|needle biopsy", None, "", "", "pneumothorax"),
    _c("radiation_therapy", None, "procedure", "radiation therapy", "Treatment with ionizing radiation, which can cause radiation pneumonitis and fibrosis in the chest.", "radiotherapy|radiation treatment|XRT", None, "", "", "radiation_fibrosis"),
]

DESCRIPTORS = [
    _c("laterality", None, "descriptor", "laterality", "The side of the body a finding involves."),
    _c("severity", None, "descriptor", "severity", "How pronounced a finding is."),
    _c("size_descriptor", None, "descriptor", "size", "The size or amount of a finding.", "extent|amount"),
    _c("acuity", None, "descriptor", "acuity", "Whether a finding is recent or long-standing."),
    _c("interval_change", None, "descriptor", "interval change", "Change of a finding compared with a previous examination.", "change from prior|compared with prior"),
    _c("distribution", None, "descriptor", "distribution", "How a finding is spread through the lungs or body."),
    _c("location_descriptor", None, "descriptor", "location", "Where in the chest a finding lies.", "position|region"),
    _c("morphology", None, "descriptor", "morphology", "The shape or margin of a finding.", "shape|appearance"),
    _c("right", "C0205090", "descriptor", "right", "On the patient's right side.", "right-sided|right sided|right side", None, "laterality"),
    _c("left", "C0205091", "descriptor", "left", "On the patient's left side.", "left-sided|left sided|left side", None, "laterality"),
    _c("bilateral", "C0238767", "descriptor", "bilateral", "On both sides of the body.", "bilaterally|both sides|on both sides|both lungs", None, "laterality"),
    _c("unilateral", None, "descriptor", "unilateral", "On one side of the body only.", "one-sided", None, "laterality"),
    _c("mild", None, "descriptor", "mild", "Slight in degree.", "mildly|slight|slightly|minimal|minimally", None, "severity"),
    _c("moderate", None, "descriptor", "moderate", "Intermediate in degree.", "moderately", None, "severity"),
    _c("severe", "C0205082", "descriptor", "severe", "Marked in degree.", "severely|marked|markedly", None, "severity"),
    _c("small", "C0700321", "descriptor", "small", "Of limited size or amount.", "tiny|small-sized", None, "size_descriptor"),
    _c("large", "C0549177", "descriptor", "large", "Of great size or amount.", "big|sizable|sizeable|massive|large-sized", None, "size_descriptor"),
    _c("trace", None, "descriptor", "trace", "A very small, barely detectable amount.", "trace amount|minimal amount|trace amount of", None, "size_descriptor"),
    _c("enlarged", None, "descriptor", "enlarged", "Larger than normal.", "enlargement|dilated|dilatation|dilation", None, "size_descriptor"),
    _c("prominent", None, "descriptor", "prominent", "More conspicuous or larger than usual, short of clear enlargement.", "prominence|prominently", None, "size_descriptor"),
    _c("acute", "C0205178", "descriptor", "acute", "Of recent onset.", "acutely|acute-appearing", None, "acuity"),
    _c("chronic", "C0205191", "descriptor", "chronic", "Long-standing.", "long-standing|longstanding|chronically|chronic-appearing|remote|old", None, "acuity"),
    _c("new", "C0205314", "descriptor", "new", "Not present on the previous examination.", "newly|new since prior|newly appeared|interval development", None, "interval_change"),
    _c("stable", "C0205360", "descriptor", "stable", "Without significant change since the previous examination.", "stably|remains stable|stable appearance", None, "interval_change"),
    _c("unchanged", None, "descriptor", "unchanged", "The same as on the previous examination.", "no change|no interval change|not changed|grossly unchanged", None, "interval_change"),
    _c("increased", "C0205217", "descriptor", "increased", "Greater than before or than normal.", "increase|increasing|enlarging|greater", None, "interval_change"),
    _c("decreased", "C0205216", "descriptor", "decreased", "Less than before or than normal.", "decrease|decreasing|reduced|smaller|diminished", None, "interval_change"),
    _c("worsening", None, "descriptor", "worsening", "Becoming more severe since the previous examination.", "worsened|worse|progression|progressed|progressive", None, "interval_change"),
    _c("improved", None, "descriptor", "improved", "Less severe than on the previous examination.", "improving|improvement|interval improvement", None, "interval_change"),
    _c("resolved", None, "descriptor", "resolved", "No longer seen after having been present before.", "resolution|resolving|cleared|interval resolution", None, "interval_change"),
    _c("normal", "C0205307", "descriptor", "normal", "Within the expected range; without abnormality.", "unremarkable|within normal limits|WNL|normal-appearing|normal appearing"),
    _c("abnormal", "C0205161", "descriptor", "abnormal", "Deviating from normal.", "abnormality|abnormalities"),
    _c("diffuse", "C0205219", "descriptor", "diffuse", "Spread widely rather than localized.", "diffusely|widespread|generalized", None, "distribution"),
    _c("focal", "C0205234", "descriptor", "focal", "Confined to a small area.", "focally|localized|circumscribed", None, "distribution"),
    _c("multifocal", None, "descriptor", "multifocal", "Present in several separate areas.", "multi-focal|multilobar", None, "distribution"),
    _c("multiple", None, "descriptor", "multiple", "More than one.", "several|numerous|innumerable", None, "distribution"),
    _c("patchy", None, "descriptor", "patchy", "In irregular, scattered areas.", "patchy-appearing", None, "distribution"),
    _c("subsegmental", None, "descriptor", "subsegmental", "Involving less than a bronchopulmonary segment.", "", None, "distribution"),
    _c("bibasilar", None, "descriptor", "bibasilar", "At both lung bases.", "bibasal|both bases|at both bases|bibasilar regions", None, "location_descriptor", "", "lung_base"),
    _c("basilar", None, "descriptor", "basilar", "At a lung base.", "basal|basally", None, "location_descriptor", "", "lung_base"),
    _c("apical", None, "descriptor", "apical", "At a lung apex.", "apically", None, "location_descriptor", "", "lung_apex"),
    _c("perihilar", None, "descriptor", "perihilar", "Around a pulmonary hilum.", "parahilar", None, "location_descriptor", "", "pulmonary_hilum"),
    _c("peripheral", None, "descriptor", "peripheral", "Toward the outer part of the lung, near the chest wall.", "peripherally", None, "location_descriptor"),
    _c("retrocardiac", None, "descriptor", "retrocardiac", "Behind the heart on a frontal radiograph, usually the left lower lobe.", "behind the heart|retrocardiac region", None, "location_descriptor", "", "left_lower_lobe"),
    _c("dependent", None, "descriptor", "dependent", "In the lowest part of a space for the patient's position, where fluid collects.", "layering|dependently", None, "location_descriptor"),
    _c("upper_zone", None, "descriptor", "upper zone", "The upper third of a lung on a frontal radiograph.", "upper lung zone|upper lung zones|upper lungs|upper lung", None, "location_descriptor", "", "lung"),
    _c("mid_zone", None, "descriptor", "mid zone", "The middle third of a lung on a frontal radiograph.", "mid lung zone|mid lung|midlung|mid lungs", None, "location_descriptor", "", "lung"),
    _c("lower_zone", None, "descriptor", "lower zone", "The lower third of a lung on a frontal radiograph.", "lower lung zone|lower lung zones|lower lungs|lower lung", None, "location_descriptor", "", "lung"),
    _c("linear", None, "descriptor", "linear", "Line- or band-shaped.", "band-like|bandlike|streaky|plate-like|platelike", None, "morphology"),
    _c("nodular", None, "descriptor", "nodular", "Made of or shaped like small rounded nodules.", "nodular-appearing|micronodular", None, "morphology"),
    _c("reticular", None, "descriptor", "reticular", "Net-like, made of intersecting lines.", "reticulated|reticulonodular", None, "morphology"),
    _c("rounded", None, "descriptor", "rounded", "Round or oval in shape.", "round|ovoid|oval", None, "morphology"),
    _c("ill_defined", None, "descriptor", "ill-defined", "With blurred, indistinct margins.", "ill defined|poorly defined|poorly-defined|indistinct margins", None, "morphology"),
    _c("well_defined", None, "descriptor", "well-defined", "With sharp, clearly seen margins.", "well defined|well-circumscribed|well circumscribed|sharply marginated", None, "morphology"),
]

# ---- how each source maps onto the table ----------------------------------------------------------
RADLABELS_MAP = {
    "acute_rib_fracture": "acute_rib_fracture", "air_space_opacity": "airspace_opacity",
    "atelectasis": "atelectasis", "bronchial_wall_thickening": "bronchial_wall_thickening",
    "bullous_disease": "bullous_disease", "calcification_of_the_aorta": "aortic_calcification",
    "cardiomegaly": "cardiomegaly", "central_venous_catheter": "central_venous_catheter",
    "consolidation": "consolidation", "emphysema": "emphysema", "endotracheal_tube": "endotracheal_tube",
    "enlarged_cardiomediastinum": "enlarged_cardiomediastinum", "enteric_tube": "enteric_tube",
    "fracture_generic": "fracture", "ground_glass_opacity": "ground_glass_opacity",
    "hiatus_hernia": "hiatal_hernia", "hilar_lymphadenopathy": "hilar_lymphadenopathy",
    "hyperinflation": "hyperinflation", "implantable_electronic_device": "implanted_electronic_device",
    "infiltration": "pulmonary_infiltrate", "intercostal_drain": "chest_tube",
    "interstitial_thickening": "interstitial_opacity", "lobar_segmental_collapse": "lobar_collapse",
    "lung_lesion": "lung_lesion", "lung_nodule_or_mass": "lung_lesion", "lung_opacity": "lung_opacity",
    "non_acute_rib_fracture": "healed_rib_fracture", "nonsurgical_internal_foreign_body": "foreign_body",
    "other_hernia": "hernia", "pacemaker_electronic_cardiac_device_or_wires": "cardiac_electronic_device",
    "peribronchial_cuffing": "peribronchial_cuffing", "pleural_effusion": "pleural_effusion",
    "pleural_other": "pleural_other", "pleural_thickening": "pleural_thickening",
    "pneumomediastinum": "pneumomediastinum", "pneumonia": "pneumonia",
    "pneumoperitoneum": "pneumoperitoneum", "pneumothorax": "pneumothorax",
    "pulmonary_artery_enlargement": "pulmonary_artery_enlargement",
    "pulmonary_congestion_pulmonary_venous_congestion": "vascular_congestion",
    "pulmonary_edema": "pulmonary_edema", "pulmonary_fibrosis": "pulmonary_fibrosis",
    "shoulder_dislocation": "shoulder_dislocation", "subcutaneous_emphysema": "subcutaneous_emphysema",
    "support_devices_generic": "support_device", "tortuous_aorta": "tortuous_aorta",
    "tracheal_deviation": "tracheal_deviation", "tracheostomy_tube": "tracheostomy_tube",
    "whole_lung_or_majority_collapse": "complete_lung_collapse",
}
RADLABELS_PARENT_MAP = {
    "pulmonary_abnormality": "pulmonary_abnormality", "pleural_abnormality": "pleural_abnormality",
    "cardiomediastinal_abnormality": "cardiomediastinal_abnormality",
    "airway_abnormality": "airway_abnormality", "hilar_abnormality": "hilar_abnormality",
    "fracture_or_trauma": "trauma_finding", "mediastinal_or_abdominal_air": "extraluminal_air",
    "hernia_abnormality": "hernia", "support_devices": "support_device",
}

# CheXpert labeler mention phrases: the concept each label file's phrases go to (None: only the
# phrases listed in CHEXPERT_PHRASES are used) and the CheXpert class's own concept (gets the
# chexpert_labeler source).
CHEXPERT_DEFAULT = {
    "atelectasis": "atelectasis", "cardiomegaly": "cardiomegaly", "consolidation": "consolidation",
    "edema": "pulmonary_edema", "enlarged_cardiomediastinum": "enlarged_cardiomediastinum",
    "fracture": "fracture", "lung_lesion": "lung_lesion", "lung_opacity": "lung_opacity",
    "no_finding": None, "pleural_effusion": "pleural_effusion", "pleural_other": "pleural_other",
    "pneumonia": "pneumonia", "pneumothorax": "pneumothorax", "support_devices": "support_device",
}
CHEXPERT_CLASS_CONCEPT = dict(CHEXPERT_DEFAULT, no_finding="no_finding")
# Per-phrase targets overriding the default; None skips a phrase (a word stem such as "atelecta",
# a pattern with "_" word-boundary markers, or a word too generic to stand for one concept).
CHEXPERT_PHRASES = {
    "atelectasis": {"atelecta": None},
    "cardiomegaly": {"the heart": None, "heart size": "cardiac_silhouette", "cardiac size": "cardiac_silhouette",
                     "cardiac shadow": "cardiac_silhouette", "cardiac contour": "cardiac_silhouette",
                     "cardiac silhouette": "cardiac_silhouette"},
    "consolidation": {"consolidat": None},
    "edema": {"heart failure": "heart_failure", "chf": "congestive_heart_failure",
              "vascular congestion": "vascular_congestion", "pulmonary congestion": "vascular_congestion",
              "vascular prominence": "vascular_congestion", "indistinctness": "indistinct_vessels"},
    "enlarged_cardiomediastinum": {"cardiomediastinum": "cardiomediastinal_silhouette", "contour": None,
                                   "mediastinal configuration": "cardiomediastinal_silhouette",
                                   "mediastinal silhouette": "cardiomediastinal_silhouette",
                                   "pericardial silhouette": "cardiomediastinal_silhouette",
                                   "cardiac silhouette and vascularity": None},
    "lung_lesion": {"mass": "mass", "lump": "mass", "nodule": "lung_nodule", "nodular density": "lung_nodule",
                    "nodular densities": "lung_nodule", "nodular opacity": "lung_nodule",
                    "nodular opacities": "lung_nodule", "nodular opacification": "lung_nodule",
                    "cavitary lesion": "cavitary_lesion", "carcinoma": "malignant_neoplasm",
                    "neoplasm": "neoplasm", "tumor": "neoplasm"},
    "lung_opacity": {"opaci": None, "airspace disease": "airspace_opacity", "air-space disease": "airspace_opacity",
                     "air space disease": "airspace_opacity", "infiltrate": "pulmonary_infiltrate",
                     "infiltration": "pulmonary_infiltrate", "interstitial marking": "interstitial_opacity",
                     "interstitial pattern": "interstitial_opacity", "interstitial lung": None,
                     "reticular pattern": "interstitial_opacity", "reticular marking": None,
                     "reticulation": "interstitial_opacity", "parenchymal scarring": "parenchymal_scarring",
                     "peribronchial thickening": "bronchial_wall_thickening",
                     "wall thickening": "bronchial_wall_thickening", "scar": "parenchymal_scarring"},
    "no_finding": {"emphysema": "emphysema", "eventration": "eventration", "scoliosis": "scoliosis",
                   "hyperinflation": "hyperinflation", "asthma": "asthma", "hernia": "hernia", "copd": "copd",
                   "interstitial markings": "interstitial_opacity", "osteophytosis": "degenerative_spine",
                   "bronchiolitis": "bronchiolitis", "airways disease": "airways_disease",
                   "cephalization": "cephalization", "aspiration": "aspiration", "bullae": "bullous_disease",
                   "contusion": "pulmonary_contusion", "osteopenia": "osteopenia", "metastasis": "metastasis",
                   "granuloma": "granuloma", "pneumomediastinum": "pneumomediastinum",
                   "pneumoperitoneum": "pneumoperitoneum", "cuffing": "peribronchial_cuffing",
                   "irregular lucency": "lucency", "fissure": "interlobar_fissure", "kyphosis": "kyphosis",
                   "hyperexpansion": "hyperinflation", "bullet": "bullet_fragments",
                   "thoracentesis": "thoracentesis", "bronchitis": "bronchitis", "volume loss": "volume_loss",
                   "hemorrhage": "hemorrhage", "hematoma": "hematoma", "arthropathy": "arthropathy",
                   "tracheostomy": "tracheostomy",
                   # stems, or too generic / ambiguous for one concept:
                   "blunt": None, "density": None, "elevation": None, "degenera": None, "calcifi": None,
                   "bronchospasm": None, "plaque": None, "aortic disease": None, "thickening": None,
                   "hyperinflat": None, "atherosclero": None, "osteodystrophy": None, "inflam": None,
                   "hypertension": None, "prominen": None, "defib": None, "reticula": None,
                   "deformity": None, "radiopaque": None, "aerophagia": None},
    "pleural_effusion": {},
    "pleural_other": {"fibrosis": "fibrosis", "fibrothorax": "fibrothorax", "pleural scar": "pleural_thickening",
                      "pleural parenchymal scar": "pleural_thickening",
                      "pleuro-parenchymal scar": "pleural_thickening",
                      "pleuro-pericardial scar": "pleural_thickening"},
    "pneumonia": {"infectious": None},
    "pneumothorax": {},
    "support_devices": {"pacer": "pacemaker", "lines": None, "picc": "picc", "tube": "medical_tube", "valve": None,
                        "catheter": "catheter", "pacemaker": "pacemaker", "hardware": "support_device",
                        "arthroplast": None, "marker": "skin_marker", "icd": "icd", "defib": None,
                        "device": None, "plate": "surgical_hardware", "screw": "surgical_hardware",
                        "cannula": "catheter", "apparatus": None, "coil": "embolization_coils", "support": None,
                        "equipment": None, "mediport": "port_catheter"},
}

# radiology_semantic_dict/radiology_synonyms.json keys taken as abbreviations: each must expand to
# the name (else a best-source alias) of exactly one KB concept, which then gets the upper-cased key as an alias.
RSD_ABBREVIATIONS = ("ards", "asd", "cabg", "chf", "copd", "covid", "ct", "ctpa", "ggo", "hrct", "ild", "ipf", "ivc",
                     "lv", "nsclc", "pah", "pe", "picc", "rv", "sclc", "svc", "tavr", "tga", "tof", "uip", "vsd")
RSD_SIGN_FILE = "radiology_semantic_dict/imaging_signs.json"

# Alias -> owner, for clashes the generic rules would settle the wrong way.
ALIAS_OWNER = {
    "enlarged cardiomediastinal silhouette": "enlarged_cardiomediastinum",
}

SOURCE_FILES = {
    RADLABELS: "radlabels/radlabels_aliases_v1.0.json",
    CHEXPERT: "chexpert_labeler/phrases/mention",
    RSD: "radiology_semantic_dict/radiology_synonyms.json",
    NEGBIO: "negbio/examples/cuis-cvpr2017.txt",
}
LICENSE_FILES = {RADLABELS: "radlabels/LICENSE", CHEXPERT: "chexpert_labeler/LICENSE",
                 RSD: "radiology_semantic_dict/LICENSE", NEGBIO: "negbio/LICENSE.txt"}
PROVENANCE_DIRS = {RADLABELS: "radlabels/", CHEXPERT: "chexpert_labeler/", RSD: "radiology_semantic_dict/",
                   NEGBIO: "negbio/"}
SOURCE_USE = {
    RADLABELS: "aliases of 49 chest-radiograph labels (mapped onto KB concepts) and their parent map (is_a relations)",
    CHEXPERT: "mention phrases of the 14 CheXpert observations (aliases; the CheXpert class of each label concept)",
    RSD: "definitions of 16 radiographic signs (imaging_signs.json) and abbreviations (radiology_synonyms.json)",
    NEGBIO: "the UMLS CUI list NegBio used for ChestX-ray8 (cross-check of our CUIs; 'negbio' source tag)",
}


# ================================================================================================
# Build
# ================================================================================================
class Draft:
    """A concept being assembled: curated fields + (alias, source) claims + relations + sources."""

    def __init__(self, row: Row):
        self.row = row
        self.id = row.cui if row.cui else f"MLIP:{row.slug}"
        self.aliases: dict[str, tuple[int, str]] = {}  # normalized -> (priority, surface form)
        self.relations: set[tuple[str, str]] = set()  # (type, target slug)
        self.sources: set[str] = {CURATED}
        for a in row.aliases:
            self.add_alias(a, CURATED)
        for kind, slugs in (("is_a", row.is_a), ("finding_site", row.site), ("associated_with", row.assoc)):
            self.relations |= {(kind, s) for s in slugs}

    def add_alias(self, alias: str, source: str) -> None:
        alias = " ".join(alias.split())
        key = normalize_alias(alias)
        if not key or key == normalize_alias(self.row.name):
            return
        claim = (SOURCE_PRIORITY[source], alias)
        if key not in self.aliases or claim < self.aliases[key]:
            self.aliases[key] = claim


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BuildError(f"missing input file: {path}") from None
    except json.JSONDecodeError as e:
        raise BuildError(f"{path}: invalid JSON: {e}") from None


def _read_lines(path: Path) -> list[str]:
    try:
        return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except FileNotFoundError:
        raise BuildError(f"missing input file: {path}") from None


def _parse_provenance(shared: Path) -> dict[str, dict]:
    """PROVENANCE.md table rows for the directories this build reads."""
    path = shared / "PROVENANCE.md"
    rows = {}
    for line in _read_lines(path):
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != 4 or cells[0] in ("dir", "---"):
            continue
        for src, prefix in PROVENANCE_DIRS.items():
            if cells[0].startswith(prefix):
                rows[src] = {"dir": cells[0], "origin": cells[1], "version": cells[2], "license": cells[3]}
    missing = sorted(set(PROVENANCE_DIRS) - set(rows))
    if missing:
        raise BuildError(f"{path}: no provenance row for {missing}")
    return rows


def build(shared: Path) -> dict[str, bytes]:
    """Build the KB; returns {file name: bytes} for the output directory."""
    if not shared.is_dir():
        raise BuildError(f"shared data directory not found: {shared} (pass --shared-data DIR)")
    rows = ANATOMY + CATEGORIES + PULMONARY + PLEURAL + CARDIOMEDIASTINAL + OTHER_FINDINGS + DEVICES \
        + PROCEDURES + DESCRIPTORS
    signs = _read_json(shared / RSD_SIGN_FILE)
    for slug, name, aliases, assoc, *clause in SIGNS:
        if slug not in signs:
            raise BuildError(f"{shared / RSD_SIGN_FILE}: no sign {slug!r}")
        s = signs[slug]
        indicates = s["indicates"].strip().rstrip(".")
        if len(indicates) > 1 and indicates[1].islower():  # "Pulmonary embolism" -> "pulmonary embolism"
            indicates = indicates[0].lower() + indicates[1:]
        definition = s["description"].strip().rstrip(".") + "; " + (clause[0] if clause else "suggests " + indicates) + "."
        rows.append(_c(slug, None, "finding", name, definition, aliases, None, "radiographic_sign", "", assoc))

    drafts: dict[str, Draft] = {}
    for row in rows:
        if row.slug in drafts:
            raise BuildError(f"concept slug {row.slug!r} is defined twice")
        if row.stype not in ("finding", "disease", "anatomy", "device", "descriptor", "procedure"):
            raise BuildError(f"{row.slug}: bad semantic type {row.stype!r}")
        if row.label is not None and row.label not in KNOWN_LABELS:
            raise BuildError(f"{row.slug}: label {row.label!r} is not one of {KNOWN_LABELS}")
        drafts[row.slug] = Draft(row)
    for sign in SIGNS:
        drafts[sign[0]].sources.add(RSD)
    ids = [d.id for d in drafts.values()]
    dup_ids = sorted({i for i in ids if ids.count(i) > 1})
    if dup_ids:
        raise BuildError(f"ids used by more than one concept: {dup_ids}")
    for d in drafts.values():
        for kind, target in d.relations:
            if target not in drafts:
                raise BuildError(f"{d.row.slug}: {kind} target {target!r} is not a concept of the table")
    _check_curated_clashes(drafts)
    report: dict = {"unmapped": {}}

    # radlabels: aliases + parent map
    radlabels = _read_json(shared / SOURCE_FILES[RADLABELS])
    for label, entry in sorted(radlabels["ALIASES"].items()):
        slug = RADLABELS_MAP.get(label)
        if slug is None:
            report["unmapped"].setdefault(RADLABELS, []).append(label)
            continue
        drafts[slug].sources.add(RADLABELS)
        for alias in entry["aliases"]:
            drafts[slug].add_alias(alias, RADLABELS)
    for label, parent in sorted(radlabels["PARENT_MAP"].items()):
        child, parent_slug = RADLABELS_MAP.get(label), RADLABELS_PARENT_MAP.get(parent)
        if child is None or parent_slug is None:
            report["unmapped"].setdefault(RADLABELS, []).append(f"{label} -> {parent}")
            continue
        drafts[parent_slug].sources.add(RADLABELS)
        if child != parent_slug and parent_slug not in _is_a_closure(drafts, child):
            drafts[child].relations.add(("is_a", parent_slug))

    # CheXpert labeler mention phrases
    mention_dir = shared / SOURCE_FILES[CHEXPERT]
    for label in CHEXPERT_LABELS:
        path = mention_dir / f"{label}.txt"
        phrases = _read_lines(path)
        drafts[CHEXPERT_CLASS_CONCEPT[label]].sources.add(CHEXPERT)
        table = CHEXPERT_PHRASES.get(label, {})
        for phrase in phrases:
            if phrase in table:
                slug = table[phrase]
            elif "_" in phrase or CHEXPERT_DEFAULT[label] is None:
                slug = None
                report["unmapped"].setdefault(CHEXPERT, []).append(f"{label}: {phrase}")
            else:
                slug = CHEXPERT_DEFAULT[label]
            if slug is not None:
                drafts[slug].add_alias(phrase, CHEXPERT)
                drafts[slug].sources.add(CHEXPERT)

    # radiology_semantic_dict abbreviations
    synonyms = _read_json(shared / SOURCE_FILES[RSD])
    for key in RSD_ABBREVIATIONS:
        if key not in synonyms:
            raise BuildError(f"{shared / SOURCE_FILES[RSD]}: no entry {key!r}")
        target = None
        for expansion in synonyms[key]:
            exp = normalize_alias(expansion)
            hits = [s for s, d in drafts.items() if exp == normalize_alias(d.row.name)]  # names first
            if not hits:  # else the concepts holding it as an alias from the best-priority source
                claims = {s: d.aliases[exp][0] for s, d in drafts.items() if exp in d.aliases}
                hits = [s for s, prio in claims.items() if prio == min(claims.values())]
            if len(hits) == 1:
                target = hits[0]
                break
        if target is None:
            raise BuildError(f"abbreviation {key!r} ({synonyms[key]}) matches no single KB concept")
        drafts[target].add_alias(key.upper(), RSD)
        drafts[target].sources.add(RSD)

    # NegBio CUI list: attest our CUIs
    negbio = _read_lines(shared / SOURCE_FILES[NEGBIO])
    by_id = {d.id: d for d in drafts.values()}
    for cui in negbio:
        if cui in by_id:
            by_id[cui].sources.add(NEGBIO)
    report["negbio_cuis_not_in_kb"] = sorted(set(negbio) - set(by_id))

    concepts, clashes = _finalize(drafts)
    kb = KnowledgeBase(concepts)
    _check_kb(kb)
    data = serialize_kb(concepts)
    provenance = _parse_provenance(shared)
    meta = {
        "kb_name": KB_NAME, "kb_version": KB_VERSION, "format_version": FORMAT_VERSION,
        "file": f"{KB_NAME}.jsonl", "sha256": hashlib.sha256(data).hexdigest(),
        "n_concepts": len(kb), "by_semantic_type": kb.counts(),
        "n_with_umls_cui": sum(1 for c in kb if c.id.startswith("C")),
        "n_aliases": sum(len(c.aliases) for c in kb),
        "labels": {label: [c.id for c in kb.concepts_for_label(label)] for label in kb.labels},
        "built_by": "maintainer/build_kb.py",
        "sources": {src: {"files": SOURCE_FILES[src], **provenance[src]} for src in sorted(provenance)},
        "alias_clashes": clashes,
        "unmapped_source_entries": {k: sorted(v) for k, v in sorted(report["unmapped"].items())},
        "negbio_cuis_not_in_kb": report["negbio_cuis_not_in_kb"],
    }
    meta_bytes = (json.dumps(meta, indent=1, ensure_ascii=False) + "\n").encode("utf-8")
    attribution = _attribution(shared, provenance, kb).encode("utf-8")
    return {f"{KB_NAME}.jsonl": data, f"{KB_NAME}.meta.json": meta_bytes, "ATTRIBUTION.md": attribution}


def _is_a_closure(drafts: dict[str, Draft], slug: str) -> set[str]:
    seen, stack = set(), [slug]
    while stack:
        for kind, target in drafts[stack.pop()].relations:
            if kind == "is_a" and target not in seen:
                seen.add(target)
                stack.append(target)
    return seen


def _check_curated_clashes(drafts: dict[str, Draft]) -> None:
    """Two curated entries may not claim the same surface form (unless ALIAS_OWNER settles it)."""
    owners: dict[str, list[str]] = {}
    for slug, d in drafts.items():
        owners.setdefault(normalize_alias(d.row.name), []).append(slug)
        for key in d.aliases:
            owners.setdefault(key, []).append(slug)
    bad = {k: v for k, v in owners.items() if len(v) > 1 and k not in ALIAS_OWNER}
    if bad:
        raise BuildError("curated surface forms claimed by several concepts (fix the table or add to "
                         f"ALIAS_OWNER): {dict(sorted(bad.items()))}")
    for slug in drafts:
        if slug in _is_a_closure(drafts, slug):
            raise BuildError(f"is_a cycle through {slug!r}")


def _finalize(drafts: dict[str, Draft]) -> tuple[list[Concept], list[dict]]:
    slug_of = {d.id: s for s, d in drafts.items()}
    concepts = []
    priority: dict[tuple[str, str], int] = {}
    for slug, d in drafts.items():
        aliases = []
        for key, (prio, form) in sorted(d.aliases.items()):
            aliases.append(form)
            priority[(d.id, key)] = prio
        rels = tuple(Relation(kind, drafts[t].id) for kind, t in sorted(d.relations))
        concepts.append(Concept(d.id, d.row.name, tuple(aliases), d.row.stype, d.row.definition, rels,
                                d.row.label, tuple(sorted(d.sources))))

    def rank(concept: Concept, alias: str) -> tuple:
        key = normalize_alias(alias)
        owner = ALIAS_OWNER.get(key)
        return (0 if owner == slug_of[concept.id] else 1, priority[(concept.id, key)])

    concepts, clashes = resolve_alias_clashes(concepts, rank)
    for clash in clashes:
        clash["kept"] = f"{clash['kept']} ({drafts[slug_of[clash['kept']]].row.name})"
    return sorted(concepts, key=lambda c: c.id), clashes


def _check_kb(kb: KnowledgeBase) -> None:
    missing = [label for label in list(FINDINGS) + [NO_FINDING] + list(CHEXPERT_LABELS)
               if not kb.concepts_for_label(label)]
    if missing:
        raise BuildError(f"labels without a concept: {missing}")
    if len(kb) < 200:
        raise BuildError(f"only {len(kb)} concepts (expected >= 200)")
    empty = [c.id for c in kb if not c.definition]
    if empty:
        raise BuildError(f"concepts without a definition: {empty}")


def _attribution(shared: Path, provenance: dict, kb: KnowledgeBase) -> str:
    counts = kb.counts()
    lines = [
        f"# Attribution: {KB_NAME} (version {KB_VERSION})",
        "",
        f"`{KB_NAME}.jsonl` ({len(kb)} concepts: " + ", ".join(f"{n} {t}" for t, n in counts.items()) + ")",
        "is generated by `maintainer/build_kb.py` from the curation tables in that script (concept selection,",
        "canonical names, definitions, semantic types, relations and label mapping, written for mlip-ds)",
        "and from the third-party data below, read from `../shared/data` at build time. Only derived",
        "content (aliases, relations, short definitions of radiographic signs, source tags) is in this",
        "repository; the source files are not.",
        "",
        "Concept ids: UMLS CUIs where one was identified with confidence, else local ids `MLIP:<slug>`.",
        "Only the identifiers are used; the KB contains no UMLS names, definitions or relations. A KB",
        "built from a licensed UMLS release (`maintainer/umls_to_kb.py`) is subject to the UMLS license and",
        "must not be committed here.",
        "",
        "| source | used for | origin | version / commit | license |",
        "|---|---|---|---|---|",
    ]
    for src in sorted(provenance):
        p = provenance[src]
        lines.append(f"| {src} (`{p['dir']}`) | {SOURCE_USE[src]} | {p['origin']} | {p['version']} | {p['license']} |")
    lines += ["", "## License notices", ""]
    for src in sorted(provenance):
        path = shared / LICENSE_FILES[src]
        text = path.read_text(encoding="utf-8").strip() if path.is_file() else None
        if text is None:
            raise BuildError(f"missing license file: {path}")
        lines += [f"### {src}", "", "```", *[ln.rstrip() for ln in text.splitlines()], "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared-data", type=Path, default=ROOT.parent / "shared" / "data",
                   help="directory with the staged source data (default: ../shared/data)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "mlip_ds" / "knowledge" / "kb_data",
                   help="where to write the KB, its meta file and ATTRIBUTION.md")
    p.add_argument("--check", action="store_true", help="do not write; exit 1 if the files in --out-dir differ")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    args = p.parse_args(argv)
    try:
        files = build(args.shared_data)
    except BuildError as e:
        print(f"build_kb: error: {e}", file=sys.stderr)
        return 2
    meta = json.loads(files[f"{KB_NAME}.meta.json"])
    if args.check:
        stale = [n for n, data in files.items()
                 if not (args.out_dir / n).is_file() or (args.out_dir / n).read_bytes() != data]
        if stale:
            print(f"build_kb: out of date in {args.out_dir}: {stale}", file=sys.stderr)
            return 1
        if not args.quiet:
            print(f"build_kb: {args.out_dir} is up to date ({meta['n_concepts']} concepts)")
        return 0
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        tmp = args.out_dir / (name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, args.out_dir / name)
    if not args.quiet:
        print(f"build_kb: wrote {meta['n_concepts']} concepts to {args.out_dir / meta['file']} "
              f"({meta['by_semantic_type']}); {len(meta['alias_clashes'])} alias clashes resolved "
              f"(listed in {KB_NAME}.meta.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
