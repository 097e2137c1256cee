"""Detections and COCO-style mAP (pycocotools' COCOeval) on held-out generated scenes."""
from __future__ import annotations

import contextlib
import io
from typing import Dict, List

import torch

import rtdetr

from .scenes import CLASSES, make_scenes

EVAL_SEED = 123_456  # held out: training draws from 10_000 + seed


def postprocessor(model, num_classes: int, max_dets: int = 100) -> rtdetr.RTDETRPostProcessor:
    queries = model.decoder.num_queries
    return rtdetr.RTDETRPostProcessor(num_classes=num_classes, num_top_queries=min(max_dets, queries * num_classes))


@torch.no_grad()
def detect(model, images: torch.Tensor, num_classes: int, batch: int = 16) -> List[Dict[str, torch.Tensor]]:
    """Post-processed detections (xyxy pixels) for every image, in eval mode."""
    model.eval()
    post = postprocessor(model, num_classes)
    out = []
    device = next(model.parameters()).device
    for i in range(0, len(images), batch):
        x = images[i:i + batch].to(device)
        sizes = torch.tensor([[x.shape[-1], x.shape[-2]]] * len(x), device=device)
        out += [{k: v.cpu() for k, v in d.items()} for d in post(model(x), sizes)]
    return out


def held_out(num_images: int, image_size: int):
    return make_scenes(torch.Generator().manual_seed(EVAL_SEED), num_images, image_size)


def coco_map(detections: List[Dict[str, torch.Tensor]], targets: List[Dict[str, torch.Tensor]],
             image_size: int) -> Dict[str, float]:
    """COCOeval bbox stats: mAP@[.5:.95], mAP@.5, mAP@.75, small / medium / large, AR@1/10/100, and ``evaluator``:
    'pycocotools', or where it is not installed 'builtin' (:func:`builtin_map`: the AP figures only)."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        return {**builtin_map(detections, targets, image_size), "evaluator": "builtin"}

    images, annotations, results = [], [], []
    for i, (det, tgt) in enumerate(zip(detections, targets)):
        images.append({"id": i, "width": image_size, "height": image_size})
        for label, box in zip(tgt["labels"].tolist(), tgt["boxes"].tolist()):
            cx, cy, w, h = (v * image_size for v in box)
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": label,
                                "bbox": [cx - w / 2, cy - h / 2, w, h], "area": w * h, "iscrowd": 0})
        for label, box, score in zip(det["labels"].tolist(), det["boxes"].tolist(), det["scores"].tolist()):
            x0, y0, x1, y1 = box
            results.append({"image_id": i, "category_id": label, "bbox": [x0, y0, x1 - x0, y1 - y0],
                            "score": score})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": annotations,
                  "categories": [{"id": i, "name": n} for i, n in enumerate(CLASSES)]}
    names = ["mAP", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large", "AR1", "AR10", "AR100",
             "AR_small", "AR_medium", "AR_large"]
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        if not results:
            return {n: 0.0 for n in names}
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {**{n: float(v) for n, v in zip(names, ev.stats)}, "evaluator": "pycocotools"}


def _iou_xyxy(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None] - inter)


def builtin_map(detections, targets, image_size: int, max_dets: int = 100) -> Dict[str, float]:
    """COCO's bbox AP without pycocotools, as COCOeval computes it for non-crowd ground truth and area 'all': per
    image and class the top ``max_dets`` detections by score, each matched greedily (highest score first) to the
    unmatched ground truth of highest IoU >= t; per class, precision at the 101 recall points 0, .01, ..., 1 of the
    score-sorted detections of all images, made monotone; the mean over classes with ground truth and over t in
    .5:.05:.95.  tests/test_demo.py checks it against pycocotools."""
    thresholds = torch.linspace(0.5, 0.95, 10, dtype=torch.float64)
    rec_points = torch.linspace(0, 1, 101, dtype=torch.float64)
    classes = sorted({int(c) for t in targets for c in t["labels"]})
    ap = torch.full((len(thresholds), len(classes)), float("nan"), dtype=torch.float64)
    for ci, c in enumerate(classes):
        scores, matched, npos = [], [], 0
        for det, tgt in zip(detections, targets):
            gt = _xyxy_px(tgt["boxes"][tgt["labels"] == c], image_size)
            npos += len(gt)
            keep = det["labels"] == c
            s, b = det["scores"][keep].double(), det["boxes"][keep].double()
            order = torch.sort(-s, stable=True).indices[:max_dets]
            s, b = s[order], b[order]
            m = torch.zeros(len(thresholds), len(s), dtype=torch.bool)
            if len(s) and len(gt):
                iou = _iou_xyxy(b, gt)
                for ti, t in enumerate(thresholds.tolist()):
                    used = torch.zeros(len(gt), dtype=torch.bool)
                    for d in range(len(s)):
                        cand = torch.where(used, torch.full_like(iou[d], -1.0), iou[d])
                        best = int(cand.argmax())
                        if float(cand[best]) >= min(t, 1 - 1e-10):
                            used[best] = True
                            m[ti, d] = True
            scores.append(s)
            matched.append(m)
        if npos == 0:
            continue
        s = torch.cat(scores)
        m = torch.cat(matched, 1)
        order = torch.sort(-s, stable=True).indices
        tp = m[:, order].double().cumsum(1)
        fp = (~m[:, order]).double().cumsum(1)
        for ti in range(len(thresholds)):
            rc = tp[ti] / npos
            pr = tp[ti] / (tp[ti] + fp[ti]).clamp(min=1e-300)
            pr = torch.flip(torch.cummax(torch.flip(pr, [0]), 0).values, [0]) if len(pr) else pr
            idx = torch.searchsorted(rc, rec_points, side="left")
            q = torch.where(idx < len(pr), pr[idx.clamp(max=max(0, len(pr) - 1))] if len(pr) else
                            torch.zeros_like(rec_points), torch.zeros_like(rec_points))
            ap[ti, ci] = q.mean()
    valid = ~torch.isnan(ap[0])
    if not bool(valid.any()):
        return {"mAP": 0.0, "mAP50": 0.0, "mAP75": 0.0}
    ap = ap[:, valid]
    return {"mAP": float(ap.mean()), "mAP50": float(ap[0].mean()), "mAP75": float(ap[5].mean())}


def _xyxy_px(boxes: torch.Tensor, image_size: int) -> torch.Tensor:
    cx, cy, w, h = (boxes.double() * image_size).unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1).reshape(-1, 4)
