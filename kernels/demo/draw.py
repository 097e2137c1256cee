"""Draw detections (and optionally ground truth) on an image with Pillow and save a PNG."""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

PALETTE = [(230, 60, 60), (60, 200, 80), (70, 110, 245), (240, 210, 40), (200, 90, 220), (40, 200, 210),
           (250, 140, 30), (150, 150, 150)]


def to_pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] in [0, 1] -> RGB image."""
    arr = (image.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(arr, "RGB")


def for_display(detections: Dict[str, torch.Tensor], threshold: float, iou: float = 0.45) -> Dict[str, torch.Tensor]:
    """The detections to draw: ``score >= threshold``, and of same-class boxes overlapping by IoU > ``iou`` only the
    best.  A briefly trained DETR still has several queries on one object at middling scores; hiding them is for the
    picture only (the mAP is computed on the raw top-k list, as COCO evaluation of DETRs does)."""
    import torchvision

    keep = detections["scores"] >= threshold
    d = {k: v[keep] for k, v in detections.items()}
    if len(d["scores"]):
        order = torchvision.ops.batched_nms(d["boxes"].float(), d["scores"].float(), d["labels"], iou)
        d = {k: v[order] for k, v in d.items()}
    return d


def draw(image: Image.Image, detections: Dict[str, torch.Tensor], names: Sequence[str], path: str,
         threshold: float = 0.3, scale: float = 1.0, truth: Optional[Dict[str, torch.Tensor]] = None,
         title: Optional[str] = None) -> int:
    """Boxes (xyxy in ``image``'s pixels) chosen by :func:`for_display`, labelled ``name score``; ``truth`` boxes
    (xyxy pixels) in thin white.  The picture is enlarged ``scale`` times (nearest) first.  Returns the number drawn."""
    detections = for_display(detections, threshold)
    if scale != 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.NEAREST)
    image = image.convert("RGB")
    canvas = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    width = max(2, round(min(image.size) / 200))
    if truth is not None:
        for box in truth["boxes"].tolist():
            canvas.rectangle([v * scale for v in box], outline=(255, 255, 255), width=1)
    drawn = 0
    keep = detections["scores"] >= threshold
    for label, box, score in zip(detections["labels"][keep].tolist(), detections["boxes"][keep].tolist(),
                                 detections["scores"][keep].tolist()):
        colour = PALETTE[label % len(PALETTE)]
        x0, y0, x1, y1 = (v * scale for v in box)
        canvas.rectangle([x0, y0, x1, y1], outline=colour, width=width)
        text = f"{names[label] if label < len(names) else label} {score:.2f}"
        tx0, ty0, tx1, ty1 = canvas.textbbox((x0, y0), text, font=font)
        ty = y0 - (ty1 - ty0) - 2 if y0 - (ty1 - ty0) - 2 >= 0 else y0
        canvas.rectangle([x0, ty, x0 + (tx1 - tx0) + 4, ty + (ty1 - ty0) + 2], fill=colour)
        canvas.text((x0 + 2, ty), text, fill=(0, 0, 0), font=font)
        drawn += 1
    if title:
        canvas.text((4, image.height - 14), title, fill=(255, 255, 255), font=font)
    image.save(path)
    return drawn


def grid(paths: Sequence[str], path: str, columns: int = 4, pad: int = 4) -> None:
    """Tile PNGs of equal size into one picture."""
    tiles = [Image.open(p).convert("RGB") for p in paths]
    w, h = tiles[0].size
    rows = (len(tiles) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * (w + pad) + pad, rows * (h + pad) + pad), (20, 20, 20))
    for i, tile in enumerate(tiles):
        sheet.paste(tile, (pad + (i % columns) * (w + pad), pad + (i // columns) * (h + pad)))
    sheet.save(path)
