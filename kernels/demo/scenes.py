"""Generated detection scenes: coloured shapes on textured noise, with their boxes.

Every scene is drawn from a seeded ``torch.Generator``: the same seed gives the same pixels and boxes on any
machine, and training and evaluation draw from different seeds, so the held-out mAP measures generalisation.
Each class is one shape with its own hue (jittered per object); the background is smooth multi-scale colour
noise plus pixel noise, so a detector has to find edges and shapes rather than threshold a flat grey.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F

CLASSES = ("square", "disc", "triangle", "diamond")
# base colours (RGB in [0, 1]) per class; each object's colour is jittered around its class's
COLOURS = torch.tensor([[0.90, 0.15, 0.15], [0.15, 0.80, 0.20], [0.20, 0.30, 0.95], [0.95, 0.85, 0.15]])


def _background(gen: torch.Generator, batch: int, size: int) -> torch.Tensor:
    """Muted multi-scale colour noise: low-frequency blobs (4x4 and 8x8 grids, bilinear upsampled) plus pixel noise."""
    base = 0.3 + 0.25 * torch.rand(batch, 1, 1, 1, generator=gen)
    img = base.expand(batch, 3, size, size).clone()
    for cells, amp in ((4, 0.18), (8, 0.10)):
        grid = torch.rand(batch, 3, cells, cells, generator=gen) - 0.5
        grid = 0.6 * grid + 0.4 * grid.mean(1, keepdim=True)  # mostly grey-ish texture, a little colour
        img += amp * F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)
    img += 0.04 * torch.randn(batch, 3, size, size, generator=gen)
    return img


def _mask(cls: int, xs: torch.Tensor, ys: torch.Tensor, x0: float, y0: float, w: float, h: float) -> torch.Tensor:
    """The pixels (centres at integer + 0.5) covered by shape ``cls`` inscribed in the box (x0, y0, w, h)."""
    u = (xs + 0.5 - x0) / w  # box coordinates in [0, 1]
    v = (ys + 0.5 - y0) / h
    inside = (u >= 0) & (u < 1) & (v >= 0) & (v < 1)
    if cls == 0:  # square (filled box)
        return inside
    if cls == 1:  # disc
        return ((u - 0.5) ** 2 + (v - 0.5) ** 2) <= 0.25
    if cls == 2:  # triangle, apex up
        return inside & ((u - 0.5).abs() <= 0.5 * v)
    return ((u - 0.5).abs() + (v - 0.5).abs()) <= 0.5  # diamond


def make_scenes(gen: torch.Generator, batch: int, size: int = 64, max_objects: int = 3, min_side: int = 12,
                max_side: int = 30) -> Tuple[torch.Tensor, List[Dict[str, torch.Tensor]]]:
    """``batch`` scenes: images [B, 3, size, size] in [0, 1] and targets (``labels`` int64 [n], ``boxes`` float32
    [n, 4] normalised cxcywh), 1..max_objects shapes each, sides in [min_side, max_side] px.  Shapes may overlap
    (a later one is drawn over an earlier one) but each keeps at least half of its box visible."""
    images = _background(gen, batch, size)
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    targets = []
    for b in range(batch):
        n = int(torch.randint(1, max_objects + 1, (1,), generator=gen))
        labels, boxes, placed = [], [], []
        for _ in range(n):
            cls = int(torch.randint(0, len(CLASSES), (1,), generator=gen))
            w, h = (int(v) for v in torch.randint(min_side, max_side + 1, (2,), generator=gen))
            x0 = int(torch.randint(0, size - w + 1, (1,), generator=gen))
            y0 = int(torch.randint(0, size - h + 1, (1,), generator=gen))
            if any(_overlap((x0, y0, w, h), p) > 0.5 for p in placed):
                continue  # would hide too much of an earlier shape (or be hidden): skip it
            colour = (COLOURS[cls] + 0.08 * (torch.rand(3, generator=gen) - 0.5)).clamp(0, 1)
            m = _mask(cls, xs, ys, x0, y0, w, h)
            images[b][:, m] = colour.view(3, 1) + 0.03 * torch.randn(3, int(m.sum()), generator=gen)
            placed.append((x0, y0, w, h))
            labels.append(cls)
            boxes.append([(x0 + w / 2) / size, (y0 + h / 2) / size, w / size, h / size])
        targets.append({"labels": torch.tensor(labels, dtype=torch.int64),
                        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)})
    return images.clamp(0, 1), targets


def _overlap(a, b) -> float:
    """Intersection over the smaller box's area."""
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return ix * iy / min(a[2] * a[3], b[2] * b[3])
