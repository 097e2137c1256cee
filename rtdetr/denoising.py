"""Contrastive denoising (CDN) query groups for RT-DETR training (official semantics)."""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn as nn
from torchvision.ops import box_convert

from .ops import inverse_sigmoid

__all__ = ["get_contrastive_denoising_training_group"]


def get_contrastive_denoising_training_group(targets: List[Dict[str, torch.Tensor]], num_classes: int,
                                             num_queries: int, class_embed: nn.Embedding, num_denoising: int = 100,
                                             label_noise_ratio: float = 0.5, box_noise_scale: float = 1.0):
    """targets: list of {"labels": [n] int64, "boxes": [n, 4] cxcywh normalised}.
    Returns (dn_query_embed [B, Ndn, D], dn_ref_unact [B, Ndn, 4], attn_mask [(Ndn+Q)^2] bool (True = blocked),
    dn_meta) or four Nones when there is nothing to denoise."""
    if num_denoising <= 0 or not targets:
        return None, None, None, None
    num_gts = [int(len(t["labels"])) for t in targets]
    max_gt = max(num_gts)
    if max_gt == 0:
        return None, None, None, None
    device = targets[0]["labels"].device
    # the official code builds the noised boxes in the default dtype (float32) whatever the targets' dtype;
    # kept so that the random streams (and hence the DN queries) match it exactly
    box_dtype = torch.get_default_dtype()
    num_group = max(1, num_denoising // max_gt)
    bs = len(targets)

    cls = torch.full([bs, max_gt], num_classes, dtype=torch.int64, device=device)
    box = torch.zeros([bs, max_gt, 4], dtype=box_dtype, device=device)
    pad = torch.zeros([bs, max_gt], dtype=torch.bool, device=device)
    for i, t in enumerate(targets):
        n = num_gts[i]
        if n:
            cls[i, :n] = t["labels"]
            box[i, :n] = t["boxes"]
            pad[i, :n] = True
    # each group: max_gt positive queries followed by max_gt negative queries
    cls = cls.tile([1, 2 * num_group])
    box = box.tile([1, 2 * num_group, 1])
    pad = pad.tile([1, 2 * num_group])
    neg = torch.zeros([bs, 2 * max_gt, 1], dtype=box_dtype, device=device)
    neg[:, max_gt:] = 1
    neg = neg.tile([1, num_group, 1])
    # the positive queries of image i sit at g * 2 * max_gt + j (group g, j < its n_i targets): the
    # official ``torch.nonzero(positive mask)[:, 1].split(...)``, in the same order, from the counts
    # alone (no data-dependent shape, so no host sync and no graph break under torch.compile)
    group_start = torch.arange(num_group, device=device).unsqueeze(1) * (2 * max_gt)
    dn_positive_idx = tuple((group_start + torch.arange(n, device=device)).flatten() for n in num_gts)
    n_dn = int(max_gt * 2 * num_group)

    if label_noise_ratio > 0:
        flip = torch.rand(cls.shape, device=device) < (label_noise_ratio * 0.5)
        new_label = torch.randint_like(cls, 0, num_classes)
        cls = torch.where(flip & pad, new_label, cls)
    if box_noise_scale > 0:
        xyxy = box_convert(box, "cxcywh", "xyxy")
        diff = (box[..., 2:] * 0.5).tile([1, 1, 2]) * box_noise_scale
        sign = torch.randint_like(box, 0, 2) * 2.0 - 1.0
        part = torch.rand_like(box)
        part = ((part + 1.0) * neg + part * (1 - neg)) * sign
        xyxy = (xyxy + part * diff).clamp(0.0, 1.0)
        box = inverse_sigmoid(box_convert(xyxy, "xyxy", "cxcywh"))
    else:
        box = inverse_sigmoid(box)

    embed = class_embed(cls)
    size = n_dn + num_queries
    mask = torch.zeros([size, size], dtype=torch.bool, device=device)
    mask[n_dn:, :n_dn] = True  # matching queries cannot see denoising queries
    g = 2 * max_gt
    for i in range(num_group):  # groups cannot see each other
        rows = slice(g * i, g * (i + 1))
        mask[rows, g * (i + 1):n_dn] = True
        mask[rows, :g * i] = True
    dn_meta = {"dn_positive_idx": dn_positive_idx, "dn_num_group": num_group, "dn_num_split": [n_dn, num_queries]}
    return embed, box, mask, dn_meta
