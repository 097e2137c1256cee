"""Multi-scale deformable attention in plain PyTorch: the executable spec and the fallback.

``ms_deform_attn_reference`` follows research/ms_deform_attn.md §1.2 literally (it is *not* the
grid_sample formulation): per level, ``x = loc_x * W - 0.5``, ``y = loc_y * H - 0.5``; a point is
skipped (contributes nothing, all its grads are 0) unless ``-1 < x < W`` and ``-1 < y < H`` (NaN
fails the test); the four bilinear corners are read with zero padding. Differentiating it with
autograd gives exactly the kernel backward of §1.3 (one-sided derivative at integer knots, because
``floor`` has zero gradient).

``method="discrete"`` is RT-DETRv2's nearest sampling: ``ix = int(loc_x * W + 0.5)`` (truncation),
clamped to the level, no zero padding, no location gradient. ``discrete_clamp="per_axis"`` clamps x
to ``W - 1`` and y to ``H - 1``; ``"official"`` reproduces lyuwenyu/RT-DETR, which clamps both to
``H - 1`` (so on a landscape level x never reaches the right part); on a portrait level an x past
``W - 1`` makes upstream raise an index error, and here that sample contributes nothing.
Non-finite discrete locations contribute nothing.

Math runs in float32 for low-precision inputs (float64 if value is float64); the output has
value's dtype.

``ms_deform_attn_grid_sample`` is the formulation RT-DETR / Deformable-DETR ship
(``F.grid_sample`` per level, then a weighted sum); it is the anchor the benchmarks compare with.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

METHODS = ("bilinear", "discrete")
DISCRETE_CLAMPS = ("per_axis", "official")


def compute_dtype(value_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if value_dtype == torch.float64 else torch.float32


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes: Sequence[Tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    points_per_level: Sequence[int],
    method: str = "bilinear",
    discrete_clamp: str = "per_axis",
) -> torch.Tensor:
    """value [N,S,M,D], locations [N,Lq,M,sum(P),2] (x,y), weights [N,Lq,M,sum(P)] -> [N,Lq,M,D]."""
    N, S, M, D = value.shape
    Lq = sampling_locations.shape[1]
    dt = compute_dtype(value.dtype)
    value_c = value.to(dt)
    loc = sampling_locations.to(dt)
    weights = attention_weights.to(dt)
    out = value_c.new_zeros(N, Lq, M, D)
    level_start = 0
    point_start = 0
    for (H, W), P in zip(spatial_shapes, points_per_level):
        v = value_c[:, level_start : level_start + H * W].permute(0, 2, 1, 3)  # [N, M, H*W, D]
        loc_l = loc[:, :, :, point_start : point_start + P]  # [N, Lq, M, P, 2]
        w_l = weights[:, :, :, point_start : point_start + P]  # [N, Lq, M, P]
        if method == "bilinear":
            corners = _bilinear_corners(loc_l, H, W)
        else:
            corners = _discrete_corner(loc_l, H, W, discrete_clamp)
        sampled = 0
        for index, corner_weight in corners:  # index [N, Lq, M, P] int64, corner_weight [N, Lq, M, P]
            flat = index.permute(0, 2, 1, 3).reshape(N, M, Lq * P, 1).expand(N, M, Lq * P, D)
            gathered = torch.gather(v, 2, flat).reshape(N, M, Lq, P, D).permute(0, 2, 1, 3, 4)
            sampled = sampled + corner_weight.unsqueeze(-1) * gathered
        out = out + (w_l.unsqueeze(-1) * sampled).sum(3)
        level_start += H * W
        point_start += P
    return out.to(value.dtype)


def _bilinear_corners(loc: torch.Tensor, H: int, W: int):
    x = loc[..., 0] * W - 0.5
    y = loc[..., 1] * H - 0.5
    valid = (x > -1) & (y > -1) & (x < W) & (y < H)
    # Skipped points are moved to a harmless spot so that NaN/inf never reach the arithmetic;
    # their weights are zeroed below, which also zeroes their gradients.
    x = torch.where(valid, x, torch.zeros_like(x))
    y = torch.where(valid, y, torch.zeros_like(y))
    x0 = torch.floor(x)
    y0 = torch.floor(y)
    lx = x - x0
    ly = y - y0
    hx = 1 - lx
    hy = 1 - ly
    x0i = x0.long()
    y0i = y0.long()
    corners = []
    for dy, dx, wy, wx in ((0, 0, hy, hx), (0, 1, hy, lx), (1, 0, ly, hx), (1, 1, ly, lx)):
        xi = x0i + dx
        yi = y0i + dy
        inside = valid & (xi >= 0) & (xi <= W - 1) & (yi >= 0) & (yi <= H - 1)
        index = yi.clamp(0, H - 1) * W + xi.clamp(0, W - 1)
        corners.append((index, torch.where(inside, wy * wx, torch.zeros_like(wx))))
    return corners


def _discrete_corner(loc: torch.Tensor, H: int, W: int, clamp: str):
    if clamp not in DISCRETE_CLAMPS:
        raise ValueError(f"discrete_clamp must be one of {DISCRETE_CLAMPS}, got {clamp!r}")
    loc = loc.detach()  # nearest sampling has no location gradient
    finite = torch.isfinite(loc).all(-1)
    safe = torch.where(finite.unsqueeze(-1), loc, torch.zeros_like(loc))
    # float -> int64 truncates toward zero, as upstream's `.to(torch.int64)`; values beyond the
    # clamp range are clamped first so that the conversion is always defined.
    ix = (safe[..., 0] * W + 0.5).clamp(-1.0, float(max(H, W) + 1)).to(torch.int64)
    iy = (safe[..., 1] * H + 0.5).clamp(-1.0, float(H + 1)).to(torch.int64)
    x_max = W - 1 if clamp == "per_axis" else H - 1
    ix = ix.clamp(0, x_max)
    iy = iy.clamp(0, H - 1)
    inside = finite & (ix <= W - 1)
    index = iy * W + ix.clamp(max=W - 1)
    weight = inside.to(loc.dtype)
    return [(torch.where(inside, index, torch.zeros_like(index)), weight)]


def ms_deform_attn_grid_sample(
    value: torch.Tensor,
    spatial_shapes: Sequence[Tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """RT-DETR v1 / Deformable-DETR's core: value [N,S,M,D], locations [N,Lq,M,L,P,2],
    weights [N,Lq,M,L,P] -> [N, Lq, M*D]."""
    N, _, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    value_list = value.split([H * W for H, W in spatial_shapes], dim=1)
    grids = 2 * sampling_locations - 1
    samples = []
    for level, (H, W) in enumerate(spatial_shapes):
        v = value_list[level].flatten(2).transpose(1, 2).reshape(N * M, D, H, W)
        grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)  # [N*M, Lq, P, 2]
        samples.append(F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    weights = attention_weights.transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    out = (torch.stack(samples, dim=-2).flatten(-2) * weights).sum(-1)
    return out.view(N, M * D, Lq).transpose(1, 2)
