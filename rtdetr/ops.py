"""Pure-PyTorch reference ops for RT-DETR (multi-scale deformable attention core, helpers)."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "deformable_attention_core_func",
    "deformable_attention_core_func_v2",
    "inverse_sigmoid",
]


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """log(x / (1 - x)) with x clipped to [0, 1] and both terms clipped at ``eps`` (official semantics)."""
    x = x.clamp(min=0.0, max=1.0)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def _level_sizes(value_spatial_shapes: Sequence[Sequence[int]]) -> List[Tuple[int, int]]:
    return [(int(h), int(w)) for h, w in value_spatial_shapes]


def deformable_attention_core_func(value: torch.Tensor,
                                   value_spatial_shapes,
                                   sampling_locations: torch.Tensor,
                                   attention_weights: torch.Tensor) -> torch.Tensor:
    """Multi-scale deformable attention (v1 layout), bilinear ``grid_sample`` with align_corners=False.

    value:              [N, S, M, D]   (S = sum of H_l * W_l, level-major, row-major inside a level)
    value_spatial_shapes: list of (H_l, W_l)
    sampling_locations: [N, Lq, M, L, P, 2] normalised (x, y) in [0, 1]
    attention_weights:  [N, Lq, M, L, P]
    returns:            [N, Lq, M * D]
    """
    n, _, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    shapes = _level_sizes(value_spatial_shapes)
    per_level = value.split([h * w for h, w in shapes], dim=1)
    grids = sampling_locations * 2 - 1  # to grid_sample's [-1, 1]
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        # [N, HW, M, D] -> [N*M, D, H, W]
        v = per_level[lvl].permute(0, 2, 3, 1).reshape(n * m, d, h, w)
        # [N, Lq, M, P, 2] -> [N*M, Lq, P, 2]
        g = grids[:, :, :, lvl].permute(0, 2, 1, 3, 4).reshape(n * m, lq, n_points, 2)
        # .contiguous(): CPU grid_sample returns garbage/NaN for non-contiguous bf16/fp16 inputs (torch 2.14)
        sampled.append(F.grid_sample(v.contiguous(), g.contiguous(), mode="bilinear", padding_mode="zeros",
                                     align_corners=False))
    # [N*M, D, Lq, L, P] -> [N*M, D, Lq, L*P]
    stacked = torch.stack(sampled, dim=-2).flatten(-2)
    w_ = attention_weights.permute(0, 2, 1, 3, 4).reshape(n * m, 1, lq, n_levels * n_points)
    out = (stacked * w_).sum(-1)  # [N*M, D, Lq]
    return out.reshape(n, m * d, lq).permute(0, 2, 1)


def deformable_attention_core_func_v2(value: torch.Tensor,
                                      value_spatial_shapes,
                                      sampling_locations: torch.Tensor,
                                      attention_weights: torch.Tensor,
                                      num_points_list: Sequence[int],
                                      method: str = "default") -> torch.Tensor:
    """RT-DETRv2 core: per-level point counts and optional ``discrete`` (nearest, no interpolation) sampling.

    value:              [N, S, M, D]
    sampling_locations: [N, Lq, M, sum(num_points_list), 2] normalised (x, y)
    attention_weights:  [N, Lq, M, sum(num_points_list)]
    returns:            [N, Lq, M * D]

    ``discrete``: coordinate = int64(loc * (W, H) + 0.5) (truncation, as the official code), then clamped.
    The official code clamps both x and y to [0, H-1] (a "FIX ME" for rectangular maps); here x is clamped to
    [0, W-1] and y to [0, H-1], which is identical for square maps.
    """
    if method not in ("default", "discrete"):
        raise ValueError(f"unknown deformable-attention method {method!r} (expected 'default' or 'discrete')")
    n, _, m, d = value.shape
    lq = sampling_locations.shape[1]
    shapes = _level_sizes(value_spatial_shapes)
    num_points_list = [int(p) for p in num_points_list]
    per_level = value.permute(0, 2, 3, 1).reshape(n * m, d, -1).split([h * w for h, w in shapes], dim=-1)
    if method == "default":
        grids = sampling_locations * 2 - 1
    else:
        grids = sampling_locations
    grids = grids.permute(0, 2, 1, 3, 4).reshape(n * m, lq, -1, 2).split(num_points_list, dim=-2)
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        v = per_level[lvl].reshape(n * m, d, h, w)
        g = grids[lvl]
        p = num_points_list[lvl]
        if method == "default":
            s = F.grid_sample(v.contiguous(), g.contiguous(), mode="bilinear", padding_mode="zeros",
                              align_corners=False)
        else:
            scale = torch.tensor([w, h], device=value.device, dtype=g.dtype)
            coord = (g * scale + 0.5).to(torch.int64)
            cx = coord[..., 0].clamp(0, w - 1).reshape(n * m, lq * p)
            cy = coord[..., 1].clamp(0, h - 1).reshape(n * m, lq * p)
            flat = v.flatten(2)  # [N*M, D, H*W]
            idx = (cy * w + cx).unsqueeze(1).expand(-1, d, -1)
            s = flat.gather(2, idx).reshape(n * m, d, lq, p)
        sampled.append(s)
    stacked = torch.cat(sampled, dim=-1)  # [N*M, D, Lq, sum P]
    w_ = attention_weights.permute(0, 2, 1, 3).reshape(n * m, 1, lq, -1)
    out = (stacked * w_).sum(-1)
    return out.reshape(n, m * d, lq).permute(0, 2, 1)
