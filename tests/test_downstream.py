"""Detection / segmentation transfer (mlip_ds.downstream, tools/transfer.py): readers on fabricated
official layouts, RLE, metrics on hand cases, backbones, a few training steps per head, the CLI."""
from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mlip_ds.downstream import datasets as ds
from mlip_ds.downstream import detection as det
from mlip_ds.downstream import segmentation as seg
from mlip_ds.downstream.backbones import DetectionBackbone, build_encoder, vit_patch_tokens

ROOT = Path(__file__).resolve().parents[1]
HAVE_PYDICOM = importlib.util.find_spec("pydicom") is not None  # an extra: readers fall back to PNG/JPEG


# ---------------------------------------------------------------------------------------------
# helpers


def _tiny_vit(seed=0):
    from mlip_ds.model.towers import build_model, load_model_config
    torch.manual_seed(seed)
    return build_model(load_model_config("tiny")).visual.eval()


def _tiny_resnet(seed=0):
    from open_clip.modified_resnet import ModifiedResNet
    torch.manual_seed(seed)
    return ModifiedResNet([1, 1, 1, 1], output_dim=32, heads=2, image_size=64, width=16).eval()


def _write_dicom(path: Path, arr: np.ndarray, monochrome1=False):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    d = Dataset()
    d.file_meta = meta
    d.SOPClassUID, d.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    d.Rows, d.Columns = arr.shape
    d.SamplesPerPixel, d.BitsAllocated, d.BitsStored, d.HighBit, d.PixelRepresentation = 1, 8, 8, 7, 0
    d.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    d.PixelData = arr.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    d.save_as(str(path), enforce_file_format=True)


def _write_image(path_no_ext: Path, arr: np.ndarray, monochrome1=False) -> Path:
    """DICOM when pydicom is installed (the official layouts), else a PNG with the same id."""
    if HAVE_PYDICOM:
        _write_dicom(path_no_ext.with_suffix(".dcm"), arr, monochrome1)
        return path_no_ext.with_suffix(".dcm")
    path_no_ext.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(255 - arr if monochrome1 else arr).save(path_no_ext.with_suffix(".png"))
    return path_no_ext.with_suffix(".png")


def _gradient(h, w, seed=0):
    rng = np.random.default_rng(seed)
    return (np.linspace(0, 200, w)[None, :] + rng.integers(0, 50, (h, w))).astype(np.uint8)


def _write_csv(path: Path, header, rows):
    with open(path, "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(header)
        wr.writerows(rows)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    base = tmp_path_factory.mktemp("dshards")
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_shards.py"), "synthetic", "--out", str(base / "s"),
                    "--num-samples", "48", "--image-size", "64", "--samples-per-shard", "24", "--quiet"],
                   check=True, cwd=ROOT, capture_output=True, timeout=120)
    return base / "s"


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A tiny ViT export and a tiny ModifiedResNet export (random weights, written by mlip_ds.export)."""
    from mlip_ds.export import export_model
    from mlip_ds.model.towers import build_model, load_model_config
    base = tmp_path_factory.mktemp("dexports")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = load_model_config("tiny")
    torch.manual_seed(123)
    export_model(build_model(cfg), cfg, str(base / "vit"))
    rcfg = load_model_config("tiny")
    rcfg["vision_cfg"] = {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "patch_size": None}
    export_model(build_model(rcfg), rcfg, str(base / "rn"))
    torch.set_num_threads(n)
    return base


# ---------------------------------------------------------------------------------------------
# RLE


def test_rle_known_hand_case_and_round_trip():
    m = np.zeros((4, 4), np.uint8)  # (height, width); pixels counted down the columns
    m[1, 0] = m[2, 0] = 1  # column 0, rows 1-2 -> flat 1, 2
    m[0, 1] = 1  # column 1, row 0 -> flat 4
    assert ds.rle_encode(m, "relative") == "1 2 1 1"  # offset 1, run 2; then 4 - 3 = 1, run 1
    assert ds.rle_encode(m, "standard") == "2 2 5 1"  # 1-based absolute starts
    assert np.array_equal(ds.rle_decode("1 2 1 1", 4, 4, "relative"), m)
    assert np.array_equal(ds.rle_decode("2 2 5 1", 4, 4, "standard"), m)
    assert ds.rle_encode(np.zeros((3, 5))) == "-1"
    assert not ds.rle_decode(" -1", 3, 5).any() and ds.rle_decode("-1", 3, 5).shape == (3, 5)
    rng = np.random.default_rng(0)
    for _ in range(20):
        h, w = rng.integers(1, 12, 2)
        mask = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        for mode in ds.RLE_MODES:
            assert np.array_equal(ds.rle_decode(ds.rle_encode(mask, mode), h, w, mode), mask)
    with pytest.raises(ds.DataError, match="standard"):
        ds.rle_decode("10 5 20 5", 4, 4, "relative")  # runs past the image: names the other flavour


# ---------------------------------------------------------------------------------------------
# readers on the official layouts


def test_rsna_reader_dicom_boxes_and_masks(tmp_path):
    root = tmp_path / "rsna"
    rows = [["a1", "10", "20", "30", "40", "1"], ["a1", "50", "5", "10", "10", "1"],
                       ["b2", "", "", "", "", "0"], ["c3", "", "", "", "", "0"], ["gone", "1", "1", "5", "5", "1"]]
    root.mkdir()
    _write_csv(root / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height", "Target"], rows)
    _write_image(root / "stage_2_train_images" / "a1", _gradient(100, 80))
    _write_image(root / "stage_2_train_images" / "b2", _gradient(100, 80, 1), monochrome1=True)
    Image.fromarray(_gradient(100, 80, 2)).save(root / "c3.png")  # PNG with the same id also works
    src = ds.open_data(f"rsna:{root}")
    assert [r.id for r in src.train] == ["a1", "b2", "c3"] and src.test is None
    assert src.notes and "gone" in src.notes[0]
    a1 = src.train[0]
    assert a1.positive and np.allclose(a1.boxes, [[10, 20, 40, 60], [50, 5, 60, 15]])
    assert not src.train[1].positive and len(src.train[1].boxes) == 0
    assert src.train[0].image.endswith(".dcm" if HAVE_PYDICOM else ".png") and src.train[2].image.endswith(".png")
    g = ds.load_gray(src.train[1].image)  # MONOCHROME1 is inverted: bright left, dark right
    assert g.shape == (100, 80) and g[:, :10].mean() > g[:, -10:].mean()
    item = ds.TransferDataset(src.train, "detect", 40)[0]  # 80 x 100 -> 40 x 40
    assert torch.allclose(item["boxes"], torch.tensor([[5, 8, 20, 24], [25, 2, 30, 6]], dtype=torch.float32))
    assert item["image"].shape == (3, 40, 40) and 0 <= item["image"].min() and item["image"].max() <= 1
    m = ds.TransferDataset(src.train, "segment", 40)[0]["mask"][0]  # RSNA boxes as masks
    assert m[8:24, 5:20].all() and m.sum() == 15 * 16 + 5 * 4


def test_object_cxr_reader_shapes_to_boxes_and_masks(tmp_path):
    root = tmp_path / "object-CXR"
    (root / "train").mkdir(parents=True)
    (root / "dev").mkdir()
    for d, n in (("train", "00001.jpg"), ("train", "00002.jpg"), ("dev", "08001.jpg")):
        Image.fromarray(_gradient(60, 50)).save(root / d / n)
    ann = "0 5 6 15 20;1 20 20 30 26;2 40 10 45 12 44 30 38 25"
    _write_csv(root / "train.csv", ["image_name", "annotation"], [["00001.jpg", ann], ["00002.jpg", ""]])
    _write_csv(root / "dev.csv", ["image_name", "annotation"], [["08001.jpg", "0 1 1 10 10"]])
    src = ds.open_data(f"object-cxr:{root}")
    assert len(src.train) == 2 and len(src.test) == 1 and src.class_names == ["foreign_object"]
    assert np.allclose(src.train[0].boxes, [[5, 6, 15, 20], [20, 20, 30, 26], [38, 10, 45, 30]])
    assert not src.train[1].positive and src.test[0].positive
    mask = src.train[0].mask(50, 60)
    assert mask[10, 10] and mask[23, 25] and not mask[20, 20]  # ellipse corner is outside the ellipse
    assert mask[20, 42] and not mask[11, 39]  # inside / outside the polygon
    with pytest.raises(ds.DataError, match="bad Object-CXR"):
        ds.parse_object_cxr("3 1 2 3 4")


def test_boxes_csv_reader_classes_and_split(tmp_path):
    for n in ("a.png", "b.png", "c.png"):
        Image.fromarray(_gradient(32, 32)).save(tmp_path / n)
    _write_csv(tmp_path / "boxes.csv", ["image", "x0", "y0", "x1", "y1", "label", "split"],
               [["a.png", 1, 2, 10, 12, "nodule", "train"], ["a.png", 3, 3, 8, 9, "mass", "train"],
                ["b.png", "", "", "", "", "", "train"], ["c.png", 0, 0, 4, 4, "nodule", "test"]])
    src = ds.open_data(f"boxes-csv:{tmp_path / 'boxes.csv'}")
    assert src.class_names == ["mass", "nodule"]
    assert [r.id for r in src.train] == ["a", "b"] and [r.id for r in src.test] == ["c"]
    assert src.train[0].labels.tolist() == [2, 1] and not src.train[1].positive
    _write_csv(tmp_path / "bad.csv", ["image", "x0", "y0", "x1", "y1"], [["a.png", 5, 5, 2, 9]])
    with pytest.raises(ds.DataError, match="line 2"):
        ds.open_data(f"boxes-csv:{tmp_path / 'bad.csv'}")


def test_siim_reader_rle_union_and_empty(tmp_path):
    root = tmp_path / "siim"
    h, w = 20, 16
    m1 = np.zeros((h, w), np.uint8)
    m1[2:6, 3:5] = 1
    m2 = np.zeros((h, w), np.uint8)
    m2[10:12, 8:12] = 1
    _write_image(root / "dicom-images-train" / "1.2.3" / "1.2.3.4" / "img1", _gradient(h, w))
    _write_image(root / "dicom-images-train" / "1.2.5" / "1.2.5.6" / "img2", _gradient(h, w, 3))
    with open(root / "train-rle.csv", "w") as f:  # the competition's header has a space before EncodedPixels
        f.write("ImageId, EncodedPixels\n")
        f.write(f"img1, {ds.rle_encode(m1)}\nimg1, {ds.rle_encode(m2)}\nimg2, -1\n")
    src = ds.open_data(f"siim:{root}")
    assert [r.id for r in src.train] == ["img1", "img2"] and [r.positive for r in src.train] == [True, False]
    assert np.array_equal(src.train[0].mask(w, h), m1 | m2) and not src.train[1].mask(w, h).any()
    boxes = ds.TransferDataset(src.train, "detect", 16)[0]["boxes"]  # mask components -> boxes (x scale 1, y 0.8)
    assert torch.allclose(boxes, torch.tensor([[3, 1.6, 5, 4.8], [8, 8, 12, 9.6]]))


def test_mask_folder_reader(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(_gradient(16, 16)).save(tmp_path / "images" / "x.png")
    Image.fromarray(_gradient(16, 16)).save(tmp_path / "images" / "y.png")
    Image.fromarray(_gradient(16, 16)).save(tmp_path / "images" / "nomask.png")
    mk = np.zeros((16, 16), np.uint8)
    mk[4:8, 4:12] = 255
    Image.fromarray(mk).save(tmp_path / "masks" / "x_mask.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "masks" / "y.png")
    src = ds.open_data(f"mask-folder:{tmp_path}")
    assert [r.id for r in src.train] == ["x", "y"] and [r.positive for r in src.train] == [True, False]
    assert "nomask.png" in src.notes[0]
    m = ds.TransferDataset(src.train, "segment", 8)[0]["mask"][0]
    assert m.sum() == 2 * 4 and m[2:4, 2:6].all()


def test_synthetic_reader_boxes_masks_and_findings(shards):
    from mlip_ds.data.schema import FINDINGS
    src = ds.open_data(f"synthetic:{shards}")
    assert len(src.train) == 48 and src.class_names == ["any_finding"]
    pos = [r for r in src.train if r.positive]
    assert pos and len(pos) < 48  # normal studies exist
    r = pos[0]
    m = r.mask(64, 64)
    for x0, y0, x1, y1 in r.boxes.astype(int):  # each box lies on the mask and the mask touches its edges
        assert m[y0:y1, x0:x1].any() and m[y0:y1, x0].any() and m[y0, x0:x1].any()
    assert all(x.positive == bool(x.mask(64, 64).any()) for x in src.train)  # a box iff mask pixels
    one = ds.open_data(f"synthetic:{shards}", finding="pleural_effusion")
    assert one.class_names == ["pleural_effusion"] and 0 < sum(x.positive for x in one.train) <= len(pos)
    assert all(x.positive == bool(x.mask(64, 64).any()) for x in one.train)
    assert all(set(np.unique(x.mask(64, 64))) <= {0, 1} for x in one.train[:5])
    assert FINDINGS.index("pleural_effusion") == one.train[0].mask.bit
    with pytest.raises(ds.DataError):
        ds.open_data(f"synthetic:{shards}", finding="tumour")


def test_split_keeps_normals_in_test_and_fractions_are_seeded():
    recs = [ds.Record(str(i), b"", positive=i % 3 == 0) for i in range(300)]
    train, test = ds.split_records(recs, 0.2, seed=0)
    assert len(test) == 60 and sum(r.positive for r in test) == 20 and len(train) == 240
    assert {r.id for r in train}.isdisjoint(r.id for r in test)
    one = ds.fraction_subset(train, 0.01, 0)
    assert len(one) == 2 and {r.positive for r in one} == {True, False}  # >= 1 with and without lesion
    ten = [ds.fraction_subset(train, 0.1, s) for s in (0, 1)]
    assert len(ten[0]) == 24 and sum(r.positive for r in ten[0]) == 8
    assert [r.id for r in ten[0]] != [r.id for r in ten[1]]
    assert [r.id for r in ds.fraction_subset(train, 0.1, 0)] == [r.id for r in ten[0]]
    assert len(ds.fraction_subset(train, 1.0, 5)) == 240


# ---------------------------------------------------------------------------------------------
# metrics


def _det(boxes, scores=None, labels=None):
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    return {"boxes": boxes, "scores": np.asarray(scores if scores is not None else [0.9] * len(boxes)),
            "labels": np.asarray(labels if labels is not None else [1] * len(boxes))}


def test_detection_map_hand_cases():
    gt = [_det([[0, 0, 10, 10]]), _det([[20, 20, 40, 30]])]
    perfect = det.evaluate(gt, gt)
    assert perfect["map"] == pytest.approx(1.0) and perfect["ap50"] == pytest.approx(1.0)
    # shifted by 4 px: IoU 60/140 = 0.43 -> a hit only at IoU 0.4 (1 of 8 thresholds), a miss at 0.5
    r = det.evaluate([_det([[4, 0, 14, 10]])], [_det([[0, 0, 10, 10]])])
    assert r["map"] == pytest.approx(1 / 8) and r["ap50"] == 0.0
    assert r["ap_per_threshold"]["0.4"] == pytest.approx(1.0) and r["ap_per_threshold"]["0.45"] == 0.0
    # shifted by 2 px: IoU 80/120 = 0.67 -> hits at 0.4 ... 0.65 (6 of 8)
    r = det.evaluate([_det([[2, 0, 12, 10]])], [_det([[0, 0, 10, 10]])])
    assert r["map"] == pytest.approx(6 / 8) and r["ap50"] == pytest.approx(1.0)
    # false positives ranked above the hit, one of them on an image without lesions: precision 1/3
    preds = [_det([[50, 50, 60, 60], [0, 0, 10, 10]], [0.9, 0.8]), _det([[5, 5, 9, 9]], [0.95])]
    r = det.evaluate(preds, [_det([[0, 0, 10, 10]]), _det([])])
    assert r["map"] == pytest.approx(1 / 3) and r["ap50"] == pytest.approx(1 / 3)
    # a duplicate detection of the same lesion is a false positive (each box matches once)
    r = det.evaluate([_det([[0, 0, 10, 10], [0, 0, 10, 10]], [0.9, 0.8])], [_det([[0, 0, 10, 10]])])
    assert r["map"] == pytest.approx(1.0)  # the duplicate ranks after the hit: recall 1 already at precision 1
    assert det.evaluate([_det([])], [_det([[0, 0, 10, 10]])])["map"] == 0.0
    assert det.evaluate([_det([[0, 0, 1, 1]])], [_det([])])["map"] is None  # no ground truth at all


def test_segmentation_metric_hand_cases():
    g = np.zeros((2, 8, 8), np.float32)
    g[0, 2:6, 2:6] = 1
    perfect = seg.segmentation_metrics(g.copy(), g)
    assert perfect["dice"] == 1.0 and perfect["iou"] == 1.0 and perfect["dice_global"] == 1.0
    assert perfect["dice_positive"] == 1.0 and perfect["n_positive"] == 1
    empty = seg.segmentation_metrics(np.zeros_like(g), g)  # image 2: empty/empty counts as 1
    assert empty["dice"] == 0.5 and empty["dice_positive"] == 0.0 and empty["dice_global"] == 0.0
    p = np.zeros_like(g)
    p[0, 2:6, 4:8] = 1  # half of the 4x4 square: Dice 8*2/32 = 0.5, IoU 8/24
    p[1, 0, 0] = 1  # a false positive on the empty image: Dice 0
    r = seg.segmentation_metrics(p, g)
    assert r["dice"] == pytest.approx(0.25) and r["iou"] == pytest.approx((1 / 3) / 2)
    assert r["dice_positive"] == pytest.approx(0.5) and r["dice_global"] == pytest.approx(16 / 33)
    assert seg.dice_iou(np.zeros((3, 3)), np.zeros((3, 3))) == (1.0, 1.0)
    # the soft Dice loss is ~0 for a confident perfect prediction and handles empty masks
    t = torch.from_numpy(g[:, None])
    assert float(seg.soft_dice_loss((t * 2 - 1) * 50, t)) < 1e-3
    assert float(seg.soft_dice_loss(torch.full((1, 1, 4, 4), -50.0), torch.zeros(1, 1, 4, 4))) < 1e-3


# ---------------------------------------------------------------------------------------------
# backbones


def test_vit_backbone_tokens_pyramid_and_freezing():
    v = _tiny_vit()
    enc = build_encoder(v, freeze=True)
    x = torch.rand(2, 3, 64, 64)
    xn = (x - enc.mean) / enc.std
    tokens = vit_patch_tokens(v, xn)
    v.output_tokens = True
    _, ref = v(xn)
    v.output_tokens = False
    assert tokens.shape == (2, 64, 8, 8)
    assert torch.allclose(tokens.flatten(2).transpose(1, 2), ref, atol=1e-5)
    assert vit_patch_tokens(v, torch.rand(1, 3, 96, 96)).shape == (1, 64, 12, 12)  # interpolated positions
    bb = DetectionBackbone(enc, 64, out_channels=16)
    out = bb(x)
    assert bb.strides == [4, 8, 16, 32] and [o.shape[-1] for o in out.values()] == [16, 8, 4, 2]
    assert not any(p.requires_grad for p in enc.visual.parameters())
    bb.train()
    assert not enc.visual.training and bb.neck.training


def test_resnet_backbone_stages_and_frozen_bn():
    enc = build_encoder(_tiny_resnet(), freeze=False)
    feats = enc(torch.rand(2, 3, 64, 64))
    assert [f.shape[-1] for f in feats] == [32, 16, 8, 4, 2] and [f.shape[1] for f in feats] == enc.channels
    enc.train()
    assert enc.visual.training and not enc.visual.bn1.training  # BN statistics stay frozen
    assert enc.visual.conv1.weight.requires_grad and not enc.visual.attnpool.q_proj.weight.requires_grad
    bb = DetectionBackbone(enc, 64, out_channels=16)
    assert [o.shape[-1] for o in bb(torch.rand(1, 3, 64, 64)).values()] == [16, 8, 4, 2]


# ---------------------------------------------------------------------------------------------
# a few training steps of each head on one batch


def _batch(task, n=2):
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        img = torch.full((3, 64, 64), 0.3) + 0.05 * torch.from_numpy(rng.standard_normal((1, 64, 64))).float()
        x0, y0 = 8 + 16 * i, 12 + 8 * i
        img[:, y0:y0 + 20, x0:x0 + 24] += 0.5
        it = {"image": img.clamp(0, 1), "id": str(i), "index": i}
        if task == "detect":
            it["boxes"] = torch.tensor([[x0, y0, x0 + 24, y0 + 20]], dtype=torch.float32)
            it["labels"] = torch.ones(1, dtype=torch.int64)
        else:
            m = torch.zeros(1, 64, 64)
            m[:, y0:y0 + 20, x0:x0 + 24] = 1
            it["mask"] = m
        items.append(it)
    return items


def _steps(model, loss_fn, batch, n, lr):
    torch.manual_seed(0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(n):
        loss = loss_fn(model, batch, "cpu")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(np.isfinite(losses)), losses
    return losses


@pytest.mark.parametrize("tower,detector", [("vit", "faster_rcnn"), ("resnet", "retinanet")])
def test_detector_loss_decreases_on_one_batch(tower, detector):
    torch.manual_seed(0)
    enc = build_encoder(_tiny_vit() if tower == "vit" else _tiny_resnet(), freeze=True)
    model = det.build_detector(enc, 64, 1, detector=detector, fpn_channels=32, box_head_dim=64)
    if detector == "faster_rcnn":
        model.roi_heads.fg_bg_sampler.batch_size_per_image = 32
    losses = _steps(model, det.detection_loss, _batch("detect"), 12, 2e-3)
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    preds = det.predict(model, _batch("detect"))
    assert len(preds) == 2 and preds[0]["boxes"].shape[1] == 4


@pytest.mark.parametrize("tower,freeze", [("vit", True), ("resnet", False)])
def test_segmentation_loss_decreases_on_one_batch(tower, freeze):
    torch.manual_seed(0)
    enc = build_encoder(_tiny_vit() if tower == "vit" else _tiny_resnet(), freeze=freeze)
    model = seg.SegmentationModel(enc, 16)
    assert model.head_name == ("setr-pup" if tower == "vit" else "unet")
    losses = _steps(model, seg.segmentation_loss, _batch("segment"), 10, 3e-3)
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    probs = seg.predict(model, _batch("segment"))
    assert probs.shape == (2, 64, 64) and 0 <= probs.min() and probs.max() <= 1


def test_fit_engine_runs_min_steps_and_freezes_encoder():
    from mlip_ds.downstream.engine import fit, num_steps
    assert num_steps(10, 4, epochs=2) == 6 and num_steps(10, 4, 2, min_steps=20) == 20
    assert num_steps(10, 4, 2, min_steps=20, max_steps=5) == 5
    torch.manual_seed(0)
    enc = build_encoder(_tiny_vit(), freeze=True)
    before = {k: v.clone() for k, v in enc.visual.state_dict().items()}
    model = seg.SegmentationModel(enc, 8)
    log = fit(model, _batch("segment", 3), seg.segmentation_loss, encoder=enc, epochs=1, batch_size=2,
              min_steps=3, collate_fn=ds.collate)
    assert log["steps"] == 3 and len(log["losses"]) == 3 and np.isfinite(log["loss_last"])
    assert all(torch.equal(before[k], v) for k, v in enc.visual.state_dict().items())


# ---------------------------------------------------------------------------------------------
# the CLI


@pytest.mark.slow
def test_cli_end_to_end_detect_and_segment(shards, exports, tmp_path, capsys):
    from mlip_ds.downstream.transfer import main
    from mlip_ds.eval.linear_probe import fraction_count
    out = tmp_path / "out"
    common = ["--data", f"synthetic:{shards}", "--fractions", "0.5", "--seeds", "0", "--max-steps", "3",
              "--test-fraction", "0.25", "--batch-size", "4", "--num-overlays", "3", "--device", "cpu",
              "--no-progress", "--out", str(out)]
    rc = main(["detect", "--encoder", f"pre={exports / 'vit'}", "--encoder", f"rand=random:{exports / 'vit'}",
               "--fpn-channels", "16", "--box-head-dim", "32", "--roi-batch", "16"] + common)
    assert rc == 0
    rc = main(["segment", "--encoder", f"vit={exports / 'vit'}", "--encoder", f"rn=random:{exports / 'rn'}",
               "--decoder-channels", "16", "--finetune"] + common)
    assert rc == 0
    stdout = capsys.readouterr().out
    for task, encs, metric in (("detect", ("pre", "rand"), "map"), ("segment", ("vit", "rn"), "dice")):
        rep = json.loads((out / f"{task}.json").read_text())
        assert list(rep["encoders"]) == list(encs)
        n_test, n_train = rep["data"]["test_counts"]["images"], rep["data"]["train_counts"]["images"]
        assert n_test + n_train == 48 and 11 <= n_test <= 13  # 25% of each kind, rounded
        assert rep["data"]["test_counts"]["positive"] < n_test  # images without lesions stay in the test set
        for e in encs:
            run = rep["encoders"][e]["runs"][0]
            assert run["n_train"] == fraction_count(0.5, n_train) and run["train"]["steps"] == 3
            assert run["metrics"][metric] is not None
            assert rep["encoders"][e]["summary"]["0.5"][metric]["n_seeds"] == 1
            png = out / "overlays" / f"{task}_{e}_0.5.png"
            assert png.read_bytes()[:4] == b"\x89PNG"
        md = (out / f"{task}.md").read_text()
        assert md in stdout and "| encoder | 50% labels |" in md
    seg_rep = json.loads((out / "segment.json").read_text())
    rn = seg_rep["encoders"]["rn"]
    assert rn["kind"] == "resnet" and rn["runs"][0]["model"]["head"] == "unet"
    assert seg_rep["encoders"]["rn"]["random_init"] is True and seg_rep["settings"]["finetune"] is True


def test_cli_clear_errors(exports, tmp_path, capsys):
    from mlip_ds.downstream.transfer import main
    rc = main(["detect", "--encoder", f"p={exports / 'vit'}", "--data", f"rsna:{tmp_path / 'nothing'}",
               "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2 and "nothing" in capsys.readouterr().err
    rc = main(["segment", "--encoder", f"p={tmp_path / 'noexport'}", "--data", f"rsna:{tmp_path}",
               "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2 and "noexport" in capsys.readouterr().err
    rc = main(["segment", "--encoder", f"p={exports / 'vit'}", "--data", f"unknown:{tmp_path}",
               "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2 and "KIND" in capsys.readouterr().err
