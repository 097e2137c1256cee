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
    """COCOeval bbox stats: mAP@[.5:.95], mAP@.5, mAP@.75, small / medium / large, AR@1/10/100."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

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
    return {n: float(v) for n, v in zip(names, ev.stats)}
