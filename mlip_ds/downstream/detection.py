"""Detection over the pretrained encoder: torchvision Faster R-CNN (default) or RetinaNet.

Model (``build_detector``): ``DetectionBackbone`` (ViT -> ViTDet simple feature pyramid, ResNet ->
FPN over its stages; see ``backbones``) + torchvision's detector with:

* images fed at a fixed square ``image_size`` (``min_size = max_size = image_size``; the backbone
  normalises, so the detector's own normalisation is the identity);
* anchors: one size per pyramid level, ``anchor_sizes`` or by default ``8 * stride * image_size /
  256`` (torchvision's 32..256 px for strides 4..32 at 256 px; 8..64 px at 64 px), aspect ratios
  0.5 / 1 / 2 (RetinaNet: three octave scales per level);
* ``score_thresh`` 0.01 and up to 100 detections per image, so the mAP sees the low-score tail.

Metric (``evaluate``): COCO-style AP as in MGCA/MLIP, computed by pycocotools' ``COCOeval`` with
``iouThrs = [0.4, 0.45, ..., 0.75]``: per class, detections of all test images ranked by score (at most 100 per image), greedily
matched to the unmatched ground-truth box of highest IoU >= t, precision made monotone and read at
101 recall points; ``map`` = mean over the 8 thresholds and the classes that have ground truth,
``ap50`` = the same at IoU 0.5 alone. Test images without lesions are kept: their detections are
false positives (MGCA's code dropped such images from the metric; we do not).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from mlip_ds.downstream.backbones import DetectionBackbone, EncoderFeatures

MGCA_IOU_THRESHOLDS = tuple(round(0.4 + 0.05 * i, 2) for i in range(8))  # 0.4:0.05:0.75
RECALL_POINTS = np.linspace(0.0, 1.0, 101)
DETECTORS = ("faster_rcnn", "retinanet")


def default_anchor_sizes(strides: Sequence[int], image_size: int) -> list[float]:
    return [max(4.0, round(8.0 * s * image_size / 256.0, 1)) for s in strides]


def build_detector(encoder: EncoderFeatures, image_size: int, num_classes: int, detector: str = "faster_rcnn",
                   anchor_sizes: Sequence[float] | None = None, fpn_channels: int = 256,
                   box_head_dim: int = 1024, score_thresh: float = 0.01, detections_per_img: int = 100) -> nn.Module:
    """A torchvision detector over the encoder; ``num_classes`` excludes the background."""
    from torchvision.models.detection import FasterRCNN, RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign

    if detector not in DETECTORS:
        raise ValueError(f"detector must be one of {DETECTORS}, got {detector!r}")
    backbone = DetectionBackbone(encoder, image_size, out_channels=fpn_channels)
    n_levels = len(backbone.strides)
    sizes = list(anchor_sizes) if anchor_sizes else default_anchor_sizes(backbone.strides, image_size)
    if len(sizes) != n_levels:
        raise ValueError(f"{len(sizes)} anchor sizes given for {n_levels} pyramid levels (strides "
                         f"{backbone.strides} at {image_size} px)")
    common = dict(min_size=image_size, max_size=image_size, image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0])
    if detector == "retinanet":
        anchors = AnchorGenerator(tuple((s, s * 2 ** (1 / 3), s * 2 ** (2 / 3)) for s in sizes),
                                  ((0.5, 1.0, 2.0),) * n_levels)
        model = RetinaNet(backbone, num_classes=num_classes + 1, anchor_generator=anchors,
                          score_thresh=score_thresh, detections_per_img=detections_per_img, **common)
    else:
        anchors = AnchorGenerator(tuple((s,) for s in sizes), ((0.5, 1.0, 2.0),) * n_levels)
        roi = MultiScaleRoIAlign(featmap_names=[str(i) for i in range(n_levels)], output_size=7, sampling_ratio=2)
        model = FasterRCNN(backbone, num_classes=None, rpn_anchor_generator=anchors, box_roi_pool=roi,
                           box_head=TwoMLPHead(fpn_channels * 49, box_head_dim),
                           box_predictor=FastRCNNPredictor(box_head_dim, num_classes + 1),
                           box_score_thresh=score_thresh,
                           box_detections_per_img=detections_per_img, box_batch_size_per_image=256, **common)
    model.anchor_sizes = sizes
    model.strides = backbone.strides
    return model


def detection_loss(model: nn.Module, batch: list, device) -> torch.Tensor:
    images = [b["image"].to(device) for b in batch]
    targets = [{"boxes": b["boxes"].to(device), "labels": b["labels"].to(device)} for b in batch]
    losses = model(images, targets)
    return sum(losses.values())


@torch.no_grad()
def predict(model: nn.Module, dataset, batch_size: int = 16, device="cpu") -> list[dict]:
    """Detections per dataset item: ``{"boxes" (N, 4), "scores" (N,), "labels" (N,)}`` numpy."""
    model.eval().to(device)
    out = []
    for i in range(0, len(dataset), batch_size):
        items = [dataset[j] for j in range(i, min(len(dataset), i + batch_size))]
        for det in model([b["image"].to(device) for b in items]):
            out.append({k: det[k].detach().cpu().numpy() for k in ("boxes", "scores", "labels")})
    return out


def ground_truth(dataset) -> list[dict]:
    gts = []
    for j in range(len(dataset)):
        b = dataset[j]
        gts.append({"boxes": b["boxes"].numpy(), "labels": b["labels"].numpy()})
    return gts


# ---------------------------------------------------------------------------------------------
# metric


def _coco_eval(preds, gts, classes, thresholds, max_dets):
    """pycocotools' COCOeval at our thresholds; returns precision (T, 101, K) over ``classes``."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def xywh(b):
        return [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]

    anns, dets = [], []
    for i, (p, g) in enumerate(zip(preds, gts)):
        for b, lab in zip(np.asarray(g["boxes"]).reshape(-1, 4), np.asarray(g["labels"]).reshape(-1)):
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(lab), "bbox": xywh(b),
                         "iscrowd": 0, "area": float((b[2] - b[0]) * (b[3] - b[1]))})
        for b, sc, lab in zip(np.asarray(p["boxes"]).reshape(-1, 4), np.asarray(p["scores"]).reshape(-1),
                              np.asarray(p["labels"]).reshape(-1)):
            dets.append({"id": len(dets) + 1, "image_id": i + 1, "category_id": int(lab), "bbox": xywh(b),
                         "score": float(sc), "area": float((b[2] - b[0]) * (b[3] - b[1])), "iscrowd": 0})
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress on every call
        coco_gt, coco_dt = COCO(), COCO()
        images = [{"id": i + 1} for i in range(len(gts))]
        cats = [{"id": int(c)} for c in classes]
        coco_gt.dataset = {"images": images, "annotations": anns, "categories": cats}
        coco_dt.dataset = {"images": images, "annotations": dets, "categories": cats}
        coco_gt.createIndex()
        coco_dt.createIndex()  # not loadRes: it refuses an empty detection list
        E = COCOeval(coco_gt, coco_dt, "bbox")
        E.params.iouThrs = np.asarray(thresholds, np.float64)
        E.params.maxDets = [max_dets]
        E.params.catIds = [int(c) for c in classes]
        E.evaluate()
        E.accumulate()
    return E.eval["precision"][:, :, :, 0, 0]  # area "all", max_dets


def evaluate(preds: Sequence[dict], gts: Sequence[dict], iou_thresholds: Sequence[float] = MGCA_IOU_THRESHOLDS,
             max_dets: int = 100) -> dict:
    """mAP over ``iou_thresholds`` (default 0.4:0.05:0.75) and AP50; see the module docstring.

    ``preds``/``gts``: one dict per image (``boxes``, ``scores``, ``labels`` / ``boxes``, ``labels``).
    Returns ``{"map", "ap50", "ap_per_threshold", "per_class", "n_images", "n_gt", "n_det"}``;
    ``map`` is None when no image has ground truth.
    """
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} predictions for {len(gts)} images")
    thresholds = [float(t) for t in iou_thresholds]
    classes = sorted({int(c) for g in gts for c in np.asarray(g["labels"]).reshape(-1)}
                     | {int(c) for p in preds for c in np.asarray(p["labels"]).reshape(-1)})
    per_class, per_class50 = {}, {}
    has_gt = {int(c) for g in gts for c in np.asarray(g["labels"]).reshape(-1)}
    if classes and has_gt:
        all_t = sorted(set(thresholds) | {0.5})
        prec = _coco_eval(preds, gts, classes, all_t, max_dets)  # (T, 101, K), -1 where no ground truth
        i50 = all_t.index(0.5)
        keep = [all_t.index(t) for t in thresholds]
        for k, c in enumerate(classes):
            if c in has_gt:
                per_class[c] = [float(prec[t, :, k].mean()) for t in keep]
                per_class50[c] = float(prec[i50, :, k].mean())
    n_gt = int(sum(len(np.asarray(g["labels"]).reshape(-1)) for g in gts))
    n_det = int(sum(min(max_dets, len(np.asarray(p["scores"]).reshape(-1))) for p in preds))
    if not per_class:
        return {"map": None, "ap50": None, "ap_per_threshold": None, "per_class": {}, "n_images": len(gts),
                "n_gt": n_gt, "n_det": n_det}
    arr = np.array(list(per_class.values()))  # (classes, thresholds)
    return {"map": float(arr.mean()), "ap50": float(np.mean(list(per_class50.values()))),
            "ap_per_threshold": {f"{t:g}": float(v) for t, v in zip(thresholds, arr.mean(0))},
            "per_class": {str(c): {"map": float(np.mean(v)), "ap50": per_class50[c]} for c, v in per_class.items()},
            "n_images": len(gts), "n_gt": n_gt, "n_det": n_det}
