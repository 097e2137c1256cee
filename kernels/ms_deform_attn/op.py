"""Multi-scale deformable attention as a torch.library op: validation, the op's definition, its backends.

Two custom ops carry the work, ``rtdetr_kernels::ms_deform_attn`` and
``rtdetr_kernels::ms_deform_attn_backward`` (see ``MSDeformAttn``); the op machinery (autograd,
autocast, the eager fast path) is ``_library.OpDef``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch

from .. import backends
from .._library import AT_LEAST_FLOAT32, AUTOCAST, OpDef, check_tensor, differentiate, fake_grad
from . import reference
from .constants import BILINEAR, DISCRETE_OFFICIAL, DISCRETE_PER_AXIS, MAX_LEVELS, METHOD_NAMES  # noqa: F401

OP = "ms_deform_attn"

SpatialShapes = Union[Sequence[Sequence[int]], torch.Tensor]


@dataclass(frozen=True)
class Problem:
    """A validated call in canonical layout."""

    value: torch.Tensor  # [N, S, M, D]
    sampling_locations: torch.Tensor  # [N, Lq, M, sum(P), 2]
    attention_weights: torch.Tensor  # [N, Lq, M, sum(P)]
    spatial_shapes: Tuple[Tuple[int, int], ...]
    points_per_level: Tuple[int, ...]
    method: int

    @property
    def flat_shapes(self) -> List[int]:
        return [s for hw in self.spatial_shapes for s in hw]


# --------------------------------------------------------------------------------------------
# Validation: the one place where MSDA inputs are checked
# --------------------------------------------------------------------------------------------


def _shapes_to_tuple(spatial_shapes: SpatialShapes) -> Tuple[Tuple[int, int], ...]:
    if isinstance(spatial_shapes, torch.Tensor):
        if spatial_shapes.dtype.is_floating_point or spatial_shapes.dtype.is_complex or spatial_shapes.dtype == torch.bool:
            raise TypeError(f"spatial_shapes: expected an integer tensor of (H, W) rows, got dtype {spatial_shapes.dtype}")
        if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
            raise ValueError(f"spatial_shapes: expected shape [L, 2] of (H, W) rows, got {tuple(spatial_shapes.shape)}")
        # One host copy when the shapes live on the GPU; pass a list of ints to avoid it.
        rows = spatial_shapes.tolist()
    else:
        try:
            rows = [tuple(row) for row in spatial_shapes]
        except TypeError:
            raise TypeError(f"spatial_shapes: expected a [L, 2] tensor or a sequence of (H, W) pairs, got {type(spatial_shapes).__name__}") from None
    shapes = []
    for level, row in enumerate(rows):
        if len(row) != 2:
            raise ValueError(f"spatial_shapes[{level}]: expected an (H, W) pair, got {row!r}")
        h, w = row
        if not all(isinstance(s, int) or (isinstance(s, torch.SymInt)) or (isinstance(s, torch.Tensor) and s.dim() == 0) for s in (h, w)):
            raise TypeError(f"spatial_shapes[{level}]: expected integer sizes, got {row!r}")
        if isinstance(h, torch.Tensor):
            h, w = int(h), int(w)
        if h <= 0 or w <= 0:
            raise ValueError(f"spatial_shapes[{level}]: sizes must be positive, got (H, W) = ({h}, {w})")
        shapes.append((h, w))
    if not shapes:
        raise ValueError("spatial_shapes: expected at least one level, got none")
    return tuple(shapes)


def _method_code(method: str, discrete_clamp: str) -> int:
    if method in ("bilinear", "default"):
        return BILINEAR
    if method == "discrete":
        if discrete_clamp == "per_axis":
            return DISCRETE_PER_AXIS
        if discrete_clamp == "official":
            return DISCRETE_OFFICIAL
        raise ValueError(f"discrete_clamp: expected 'per_axis' or 'official', got {discrete_clamp!r}")
    raise ValueError(f"method: expected 'bilinear' (alias 'default') or 'discrete', got {method!r}")


def validate(
    value: torch.Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    num_points_list: Optional[Sequence[int]] = None,
    method: str = "bilinear",
    discrete_clamp: str = "per_axis",
    level_start_index: Optional[Union[torch.Tensor, Sequence[int]]] = None,
) -> Problem:
    check_tensor("value", value)
    check_tensor("sampling_locations", sampling_locations)
    check_tensor("attention_weights", attention_weights)
    method_code = _method_code(method, discrete_clamp)
    if value.dim() != 4:
        raise ValueError(f"value: expected shape [N, S, M, D] (4 dims), got {tuple(value.shape)}")
    N, S, M, D = value.shape
    if M <= 0 or D <= 0:
        raise ValueError(f"value: heads M and channels D must be positive, got [N, S, M, D] = {list(value.shape)}")
    shapes = _shapes_to_tuple(spatial_shapes)
    L = len(shapes)
    total = sum(h * w for h, w in shapes)
    if total != S:
        raise ValueError(f"spatial_shapes: sum of H*W over levels is {total} but value has S = {S} tokens (value shape {list(value.shape)}, shapes {list(shapes)})")
    if level_start_index is not None:
        _check_level_start(level_start_index, shapes)
    for name, t in (("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        if t.device != value.device:
            raise ValueError(f"{name}: expected device {value.device} (value's device), got {t.device}")

    # Layout: v1 [N,Lq,M,L,P,2] or v2 flattened [N,Lq,M,sum(P),2].
    if sampling_locations.dim() == 6:
        if num_points_list is not None and len(set(num_points_list)) > 1:
            raise ValueError("sampling_locations: a 6-dim [N, Lq, M, L, P, 2] layout has equal points per level; "
                             f"got num_points_list={list(num_points_list)} (pass the flattened [N, Lq, M, sum(P), 2] layout)")
        n, lq, m, l, p, two = sampling_locations.shape
        if (n, m, l, two) != (N, M, L, 2):
            raise ValueError(f"sampling_locations: expected shape [N={N}, Lq, M={M}, L={L}, P, 2], got {list(sampling_locations.shape)}")
        if p <= 0:
            raise ValueError(f"sampling_locations: points per level P must be positive, got shape {list(sampling_locations.shape)}")
        points = (p,) * L
        if num_points_list is not None and tuple(num_points_list) != points:
            raise ValueError(f"num_points_list: {list(num_points_list)} does not match sampling_locations' P={p} on {L} levels")
        expected_weights = (N, lq, M, L, p)
        if tuple(attention_weights.shape) != expected_weights:
            raise ValueError(f"attention_weights: expected shape {list(expected_weights)} to match sampling_locations, got {list(attention_weights.shape)}")
        sampling_locations = sampling_locations.reshape(N, lq, M, L * p, 2)
        attention_weights = attention_weights.reshape(N, lq, M, L * p)
    elif sampling_locations.dim() == 5:
        n, lq, m, total_points, two = sampling_locations.shape
        if (n, m, two) != (N, M, 2):
            raise ValueError(f"sampling_locations: expected shape [N={N}, Lq, M={M}, sum(P), 2], got {list(sampling_locations.shape)}")
        if num_points_list is None:
            if total_points % L != 0 or total_points == 0:
                raise ValueError(f"num_points_list: required for the flattened layout when sum(P)={total_points} is not a positive multiple of L={L}")
            points = (total_points // L,) * L
        else:
            points = tuple(int(p) for p in num_points_list)
            if len(points) != L:
                raise ValueError(f"num_points_list: expected {L} entries (one per level), got {len(points)}")
            if any(p <= 0 for p in points):
                raise ValueError(f"num_points_list: point counts must be positive, got {list(points)}")
            if sum(points) != total_points:
                raise ValueError(f"num_points_list: sums to {sum(points)} but sampling_locations has {total_points} points")
        expected_weights = (N, lq, M, total_points)
        if tuple(attention_weights.shape) != expected_weights:
            raise ValueError(f"attention_weights: expected shape {list(expected_weights)} to match sampling_locations, got {list(attention_weights.shape)}")
    else:
        raise ValueError("sampling_locations: expected shape [N, Lq, M, L, P, 2] or [N, Lq, M, sum(P), 2], "
                         f"got {list(sampling_locations.shape)}")
    return Problem(value, sampling_locations, attention_weights, shapes, points, method_code)


def _check_level_start(level_start_index, shapes) -> None:
    if isinstance(level_start_index, torch.Tensor):
        if level_start_index.device.type != "cpu":
            return  # checking would cost a device sync; the index is redundant with the shapes anyway
        starts = level_start_index.tolist()
    else:
        starts = list(level_start_index)
    expected, acc = [], 0
    for h, w in shapes:
        expected.append(acc)
        acc += h * w
    if [int(s) for s in starts] != expected:
        raise ValueError(f"level_start_index: expected {expected} for spatial_shapes {list(shapes)}, got {starts}")


def describe(problem: Problem) -> backends.Call:
    dtypes = (problem.value.dtype, problem.sampling_locations.dtype, problem.attention_weights.dtype)
    options = (("method", problem.method), ("levels", len(problem.spatial_shapes)), ("channels", problem.value.shape[-1]))
    return backends.Call(OP, problem.value.device.type, dtypes, options)


# --------------------------------------------------------------------------------------------
# The op and its backends
# --------------------------------------------------------------------------------------------


class MSDeformAttn(OpDef):
    """Canonical layout: value [N,S,M,D], locations [N,Lq,M,sum(P),2], weights [N,Lq,M,sum(P)];
    level shapes and per-level point counts as ints (nothing for a kernel to read out of bounds,
    nothing to sync on)."""

    name = OP
    forward_schema = ("(Tensor value, Tensor sampling_locations, Tensor attention_weights, SymInt[] spatial_shapes, "
                      "SymInt[] points_per_level, SymInt method) -> Tensor")
    backward_schema = ("(Tensor grad_output, Tensor value, Tensor sampling_locations, Tensor attention_weights, "
                       "SymInt[] spatial_shapes, SymInt[] points_per_level, SymInt method, bool need_value, "
                       "bool need_locations, bool need_weights) -> (Tensor, Tensor, Tensor)")
    # value follows the autocast dtype; locations and weights keep (at least) float32 precision,
    # which is what grid_sample's "widest input" autocast rule gives the reference.
    autocast_policy = (AUTOCAST, AT_LEAST_FLOAT32, AT_LEAST_FLOAT32)

    def fake_forward(self, value, sampling_locations, attention_weights, spatial_shapes, points_per_level, method, backend):
        N, _, M, D = value.shape
        return value.new_empty(N, sampling_locations.shape[1], M, D)

    def fake_backward(self, grad_output, value, sampling_locations, attention_weights, spatial_shapes,
                      points_per_level, method, need_value, need_locations, need_weights, deterministic, backend):
        return tuple(fake_grad(t, need, value) for t, need in ((value, need_value), (sampling_locations, need_locations),
                                                                (attention_weights, need_weights)))

    def save(self, inputs, output):
        value, loc, weights, shapes, points, method = inputs
        return (value, loc, weights), (shapes, points, method)

    def grads(self, saved, meta, needs, grad_outputs, backward):
        need = needs[:3]
        grads = backward(grad_outputs[0], *saved, *meta, *need)
        return tuple(g if n else None for g, n in zip(grads, need)) + (None,) * 3

    validate = staticmethod(validate)
    describe = staticmethod(describe)


MSDA = MSDeformAttn()


def _reference_forward(value, loc, weights, shapes: List[int], points: List[int], method: int):
    kind, clamp = METHOD_NAMES[method]
    pairs = list(zip(shapes[0::2], shapes[1::2]))
    return reference.ms_deform_attn_reference(value, pairs, loc, weights, points, kind, clamp)


def _reference_backward(grad_output, value, loc, weights, shapes, points, method, need_value, need_loc, need_attn,
                        deterministic):
    return differentiate(lambda v, l, w: _reference_forward(v, l, w, shapes, points, method), (value, loc, weights),
                         (need_value, need_loc, need_attn), grad_output,
                         differentiable=(True, method == BILINEAR, True))  # discrete: zero location grads


def _compiled_kernels():
    ops = backends.extension_namespace()
    return ops.ms_deform_attn_forward, ops.ms_deform_attn_backward


def _triton_kernels():
    from . import triton as triton_impl

    return triton_impl.forward, triton_impl.backward


def _why_not_compiled(call: backends.Call) -> Optional[str]:
    if call.option("levels", 1) > MAX_LEVELS:
        return f"at most {MAX_LEVELS} levels are supported, got {call.option('levels')}"
    return None


def _why_not_triton(call: backends.Call) -> Optional[str]:
    from . import triton as triton_impl

    return triton_impl.why_not(call)


backends.register(backends.Implementation(OP, "reference", lambda: (_reference_forward, _reference_backward)))
backends.register(backends.Implementation(OP, "cpu", _compiled_kernels, _why_not_compiled))
backends.register(backends.Implementation(OP, "cuda", _compiled_kernels, _why_not_compiled))
backends.register(backends.Implementation(OP, "triton", _triton_kernels, _why_not_triton))


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    *,
    num_points_list: Optional[Sequence[int]] = None,
    method: str = "bilinear",
    discrete_clamp: str = "per_axis",
    level_start_index: Optional[Union[torch.Tensor, Sequence[int]]] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Multi-scale deformable attention sampling (Deformable-DETR / RT-DETR semantics).

    Args:
        value: [N, S, M, D], S = sum of H*W over levels (levels flattened row-major, concatenated).
        spatial_shapes: (H, W) per level, as a list of pairs (no device sync) or an int [L, 2] tensor.
        sampling_locations: normalised (x, y), either [N, Lq, M, L, P, 2] (v1) or
            [N, Lq, M, sum(P_l), 2] with ``num_points_list`` (RT-DETRv2), float of any precision.
        attention_weights: [N, Lq, M, L, P] or [N, Lq, M, sum(P_l)], already softmaxed.
        num_points_list: points per level for the flattened layout.
        method: 'bilinear' (alias 'default') or RT-DETRv2's 'discrete' nearest sampling.
        discrete_clamp: 'per_axis' (x to W-1, y to H-1) or 'official' (both to H-1, as upstream).
        level_start_index: accepted for drop-in signatures; redundant with ``spatial_shapes``
            (checked when it is on the CPU).
        backend: 'auto' (default), 'cuda', 'triton', 'cpu' or 'reference'.

    Returns:
        [N, Lq, M*D] in value's dtype; math in float32 (float64 for float64 value).
    """
    problem = validate(value, spatial_shapes, sampling_locations, attention_weights, num_points_list,
                       method, discrete_clamp, level_start_index)
    chosen = backends.choose(describe(problem), backend)
    N, _, M, D = problem.value.shape
    out = MSDA(problem.value, problem.sampling_locations, problem.attention_weights, problem.flat_shapes,
               list(problem.points_per_level), problem.method, chosen)
    return out.reshape(N, out.shape[1], M * D)




explain = MSDA.explain
