"""MSDA's representative call for ``python -m rtdetr_kernels check`` and its compute-sanitizer
edge cases (run by bench/sanitize_cases.py on the cuda and triton backends)."""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch

from .._cases import DTYPES, Case, Sample, backward_both_modes, call_or_skip, sync
from .op import ms_deform_attn
from .reference import ms_deform_attn_grid_sample

# (value, locations, weights)
DTYPE_CONFIGS = {
    "fp32": ("fp32", "fp32", "fp32"),
    "fp16": ("fp16", "fp16", "fp16"),
    "bf16": ("bf16", "bf16", "bf16"),
    "bf16v-fp32loc": ("bf16", "fp32", "fp32"),  # what autocast(bf16) gives
    "fp16v-fp32loc": ("fp16", "fp32", "fp32"),
}


def sample(seed: int = 0) -> Sample:
    """Three levels of odd sizes, locations partly outside the image; grid_sample as the oracle."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(10, 12), (5, 6), (3, 3)]
    N, Lq, M, D, P = 2, 30, 8, 32, 4
    S = sum(h * w for h, w in shapes)
    value = torch.randn(N, S, M, D, generator=gen, dtype=torch.float64)
    loc = torch.rand(N, Lq, M, len(shapes), P, 2, generator=gen, dtype=torch.float64) * 1.2 - 0.1
    weights = torch.rand(N, Lq, M, len(shapes), P, generator=gen, dtype=torch.float64).softmax(-1)
    return Sample(ms_deform_attn, (value, shapes, loc, weights), differentiable=(0, 2, 3),
                  oracle=lambda v, s, l, w: ms_deform_attn_grid_sample(v, s, l, w),
                  description="3 levels (10x12, 5x6, 3x3), N=2, Lq=30, M=8, D=32, P=4")


def edge_locations(size: int) -> List[float]:
    """Normalised coordinates whose pixel coordinate (loc * size - 0.5) sits on an edge."""
    px = [-1.0, -0.5, 0.0, size - 1.0, size - 0.5, float(size)]  # pixel -1 and size: just outside
    locs = [(p + 0.5) / size for p in px]
    locs += [0.0, 1.0, -0.5 / size + 1e-7, (size + 0.5) / size - 1e-7]  # just inside the skip test
    locs += [math.nextafter(l, -math.inf) for l in locs[:6]] + [math.nextafter(l, math.inf) for l in locs[:6]]
    locs += [-3.0, 4.0, 0.5]
    return locs


NONFINITE = [float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 3e9, -3e9, 0.5]


def inputs(N: int, Lq: int, M: int, D: int, shapes: Sequence[Tuple[int, int]], points: Sequence[int],
                dtype_cfg: str, locset: str, device: str, grads: str = "all", layout: str = "flat",
                weights_nonfinite: bool = False, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    vd, ld, wd = (DTYPES[n] for n in DTYPE_CONFIGS[dtype_cfg])
    S = sum(h * w for h, w in shapes)
    P = sum(points)
    value = torch.randn(N, S, M, D, generator=gen)
    loc = torch.rand(N, Lq, M, P, 2, generator=gen) * 1.4 - 0.2
    if locset in ("edges", "nonfinite") and N * Lq > 0:
        start = 0
        for (H, W), p in zip(shapes, points):
            if locset == "edges":
                xs, ys = edge_locations(W), edge_locations(H)
            else:
                xs = ys = NONFINITE
            slots = loc[:, :, :, start:start + p].reshape(-1, 2)
            i = torch.arange(slots.shape[0])  # cycle x and y at different strides: many (x, y) pairs
            slots[:, 0] = torch.tensor(xs, dtype=torch.float64)[i % len(xs)].float()
            slots[:, 1] = torch.tensor(ys, dtype=torch.float64)[(i // len(xs) + i) % len(ys)].float()
            loc[:, :, :, start:start + p] = slots.reshape(N, Lq, M, p, 2)
            start += p
    weights = torch.rand(N, Lq, M, P, generator=gen)
    weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-6)
    if weights_nonfinite and weights.numel():
        flat = weights.view(-1)
        flat[0::7] = float("nan")
        flat[1::11] = float("inf")
    value = value.to(device=device, dtype=vd)
    loc = loc.to(device=device, dtype=ld)
    weights = weights.to(device=device, dtype=wd)
    if layout == "v1":
        assert len(set(points)) == 1
        loc = loc.reshape(N, Lq, M, len(shapes), points[0], 2)
        weights = weights.reshape(N, Lq, M, len(shapes), points[0])
    need = {"all": (True, True, True), "value": (True, False, False), "loc_attn": (False, True, True),
            "attn": (False, False, True), "none": (False, False, False)}[grads]
    for t, flag in zip((value, loc, weights), need):
        t.requires_grad_(flag)
    return value, loc, weights


def _case(backend: str, *, N=2, Lq=7, M=2, D=32, shapes=((6, 5), (3, 4), (1, 1)), points=(2, 3, 1),
               dtype_cfg="fp32", method="bilinear", clamp="per_axis", locset="edges", grads="all",
               layout="flat", weights_nonfinite=False) -> Case:
    parts = [backend, dtype_cfg, f"D{D}", method if method == "bilinear" else f"discrete-{clamp}", locset,
             f"N{N}", f"Lq{Lq}", f"L{len(shapes)}", f"grad-{grads}"]
    if layout != "flat":
        parts.append(layout)
    if weights_nonfinite:
        parts.append("nanweights")
    case_id = "ms_deform_attn/" + "-".join(parts)

    def run(device: str, check: bool) -> None:
        value, loc, weights = inputs(N, Lq, M, D, shapes, points, dtype_cfg, locset, device, grads, layout,
                                          weights_nonfinite)
        kwargs = dict(method=method, discrete_clamp=clamp, backend=backend)
        if layout == "flat":
            kwargs["num_points_list"] = list(points)
        out = call_or_skip(ms_deform_attn, value, list(shapes), loc, weights, **kwargs)
        sync(device)
        if tuple(out.shape) != (N, Lq, M * D):
            raise AssertionError(f"output shape {tuple(out.shape)} != {(N, Lq, M * D)}")
        if out.dtype != value.dtype:
            raise AssertionError(f"output dtype {out.dtype} != value dtype {value.dtype}")
        if check and locset != "nonfinite" and not weights_nonfinite:
            ref = ms_deform_attn(value.detach().float(), list(shapes), loc.detach().float(), weights.detach().float(),
                                    **{**kwargs, "backend": "reference"})
            tol = 1e-4 if dtype_cfg == "fp32" else 3e-2
            err = (out.detach().float() - ref).abs().max().item() if out.numel() else 0.0
            if err > tol * (1 + ref.abs().max().item() if ref.numel() else 1):
                raise AssertionError(f"forward differs from the reference by {err:.3g}")
        backward_both_modes(out, (value, loc, weights), device)

    tags = (backend, dtype_cfg, method, locset, f"D{D}", "empty" if N * Lq == 0 else "nonempty")
    meta = dict(N=N, Lq=Lq, M=M, D=D, shapes=[list(s) for s in shapes], points=list(points), dtype=dtype_cfg,
                method=method, clamp=clamp, locset=locset, grads=grads, layout=layout)
    return Case(case_id, "ms_deform_attn", backend, run, tags, meta)


def sanitizer_cases(backend: str, quick: bool = False) -> List[Case]:
    """Where index math goes wrong: locations on pixel edges, NaN/inf, empty inputs, odd D, every
    dtype mix AMP gives, every method, 16 levels, both layouts, partial gradient requests."""
    cases: List[Case] = []
    dtype_cfgs = list(DTYPE_CONFIGS) if not quick else ["fp32", "bf16", "bf16v-fp32loc"]
    channels = (1, 5, 32, 33, 64) if not quick else (5, 32)
    # A. bilinear, edge locations: every dtype configuration x every channel count
    for dtype_cfg in dtype_cfgs:
        for D in channels:
            cases.append(_case(backend, D=D, dtype_cfg=dtype_cfg))
    # B. discrete, both clamps, on landscape and portrait levels (official clamp goes out of range there)
    disc_shapes, disc_points = ((4, 7), (6, 3), (1, 1), (2, 2)), (3, 2, 1, 2)
    for clamp in ("per_axis", "official"):
        for dtype_cfg in (["fp32", "fp16", "bf16", "bf16v-fp32loc"] if not quick else ["fp32", "bf16v-fp32loc"]):
            for D in ((5, 32) if not quick else (32,)):
                cases.append(_case(backend, D=D, dtype_cfg=dtype_cfg, method="discrete", clamp=clamp,
                                        shapes=disc_shapes, points=disc_points))
    # C. non-finite and huge locations (and non-finite weights), every method
    for method, clamp in (("bilinear", "per_axis"), ("discrete", "per_axis"), ("discrete", "official")):
        for dtype_cfg in (("fp32", "bf16") if not quick else ("fp32",)):
            cases.append(_case(backend, dtype_cfg=dtype_cfg, method=method, clamp=clamp, locset="nonfinite",
                                    shapes=disc_shapes, points=disc_points))
    cases.append(_case(backend, locset="random", weights_nonfinite=True))
    # D. empty inputs
    for N, Lq in ((0, 7), (2, 0)):
        for dtype_cfg in ("fp32", "bf16v-fp32loc"):
            for method in ("bilinear", "discrete"):
                cases.append(_case(backend, N=N, Lq=Lq, dtype_cfg=dtype_cfg, method=method, locset="random"))
    # E. partial gradient requests (backward computes only what is needed)
    for grads in ("value", "loc_attn", "attn", "none"):
        cases.append(_case(backend, grads=grads))
    cases.append(_case(backend, grads="value", dtype_cfg="bf16v-fp32loc", D=33))
    # F. an RT-DETR-like shape in the v1 layout (more blocks than the toy cases), and 16 levels
    cases.append(_case(backend, N=2, Lq=40, M=8, D=32, shapes=((20, 20), (10, 10), (5, 5)), points=(4, 4, 4),
                            dtype_cfg="fp16", locset="random", layout="v1"))
    cases.append(_case(backend, N=1, Lq=40, M=8, D=32, shapes=((20, 20), (10, 10), (5, 5)), points=(4, 4, 4),
                            dtype_cfg="bf16v-fp32loc", locset="edges"))
    sixteen = tuple((1 + i % 4, 1 + (i * 3) % 5) for i in range(16))
    cases.append(_case(backend, shapes=sixteen, points=tuple(1 + i % 2 for i in range(16)), D=5))
    return cases
