"""Drop-in functions: other DETR codebases' call signatures mapped onto our ops (the patchers use them).

- ``deformable_attention_core_func`` / ``deformable_attention_core_func_v2``: lyuwenyu/RT-DETR's
  v1 and v2 MSDA core functions (``rtdetr_pytorch`` / ``rtdetrv2_pytorch`` ``utils.py``).
- ``MultiScaleDeformableAttention``: the transformers hub-kernel layer
  (``kernels-community/deformable-detr``), used by ``RTDetr``, ``DeformableDetr`` and
  ``GroundingDino`` through ``use_kernel_forward_from_hub``; it holds no state, so swapping its
  ``forward`` in is safe.
- ``ms_deform_attn_function``: ``MSDeformAttnFunction.apply(value, shapes, level_start_index,
  sampling_locations, attention_weights, im2col_step)`` of Deformable-DETR / mmcv.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..ms_deform_attn import ms_deform_attn


def deformable_attention_core_func(value, value_spatial_shapes, sampling_locations, attention_weights):
    """RT-DETR v1: value [N,S,M,D], shapes [(H,W)...], locations [N,Lq,M,L,P,2], weights [N,Lq,M,L,P]."""
    return ms_deform_attn(value, value_spatial_shapes, sampling_locations, attention_weights)


def deformable_attention_core_func_v2(value, value_spatial_shapes, sampling_locations, attention_weights,
                                      num_points_list: Sequence[int], method: str = "default",
                                      discrete_clamp: str = "official"):
    """RT-DETRv2: value [N,S,M,D], locations [N,Lq,M,sum(P),2], weights [N,Lq,M,sum(P)], per-level ``num_points_list``.
    ``discrete_clamp`` defaults to upstream's clamp so that a patched v2 model is unchanged."""
    return ms_deform_attn(value, value_spatial_shapes, sampling_locations, attention_weights,
                          num_points_list=num_points_list, method=method, discrete_clamp=discrete_clamp)


def ms_deform_attn_function(value, value_spatial_shapes, level_start_index, sampling_locations,
                            attention_weights, im2col_step: Optional[int] = None):
    """``MSDeformAttnFunction.apply`` signature; ``im2col_step`` only split launches upstream and
    has no effect on results, so it is ignored (no batch % im2col_step restriction)."""
    return ms_deform_attn(value, value_spatial_shapes, sampling_locations, attention_weights,
                          level_start_index=level_start_index)


class MultiScaleDeformableAttention(nn.Module):
    """The transformers hub-kernel layer signature; stateless. It is also the layer the ``kernels`` package
    swaps in (``integrations.transformers.kernels_mapping``): it has a backward and compiles."""

    can_torch_compile = True
    has_backward = True

    def forward(self, value: torch.Tensor, value_spatial_shapes: torch.Tensor, value_spatial_shapes_list,
                level_start_index: torch.Tensor, sampling_locations: torch.Tensor,
                attention_weights: torch.Tensor, im2col_step: int = 64) -> torch.Tensor:
        shapes = value_spatial_shapes_list if value_spatial_shapes_list is not None else value_spatial_shapes
        return ms_deform_attn(value, shapes, sampling_locations, attention_weights)
