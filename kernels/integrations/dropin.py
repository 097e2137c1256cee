"""Drop-in functions: other DETR codebases' call signatures mapped onto our ops (the patchers use them).

- ``deformable_attention_core_func`` / ``deformable_attention_core_func_v2``: lyuwenyu/RT-DETR's
  v1 and v2 MSDA core functions (``rtdetr_pytorch`` / ``rtdetrv2_pytorch`` ``utils.py``).
- ``MultiScaleDeformableAttention``: the transformers hub-kernel layer
  (``kernels-community/deformable-detr``), used by ``RTDetr``, ``DeformableDetr`` and
  ``GroundingDino`` through ``use_kernel_forward_from_hub``; it holds no state, so swapping its
  ``forward`` in is safe.
- ``ms_deform_attn_function``: ``MSDeformAttnFunction.apply(value, shapes, level_start_index,
  sampling_locations, attention_weights, im2col_step)`` of Deformable-DETR / mmcv.
- ``AIFIAttention``: a drop-in for RT-DETR's ``nn.MultiheadAttention(E, H, batch_first=True)`` as the
  AIFI encoder layer and the decoder self-attention use it (q = k = x + pos, v = x), with the same
  parameter names, so official checkpoints load unchanged; it runs ``rtdetr_kernels.aifi_attention``.
  ``mha_self_attention`` is the same call on an existing ``nn.MultiheadAttention``'s parameters (what
  the patched layers call).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import aifi_attention
from ..ms_deform_attn import ms_deform_attn


def deformable_attention_core_func(value, value_spatial_shapes, sampling_locations, attention_weights, *,
                                   backend: Optional[str] = None):
    """RT-DETR v1: value [N,S,M,D], shapes [(H,W)...], locations [N,Lq,M,L,P,2], weights [N,Lq,M,L,P].
    ``backend`` pins the op's backend (None: the op chooses)."""
    return ms_deform_attn(value, value_spatial_shapes, sampling_locations, attention_weights, backend=backend)


def deformable_attention_core_func_v2(value, value_spatial_shapes, sampling_locations, attention_weights,
                                      num_points_list: Sequence[int], method: str = "default",
                                      discrete_clamp: str = "official", *, backend: Optional[str] = None):
    """RT-DETRv2: value [N,S,M,D], locations [N,Lq,M,sum(P),2], weights [N,Lq,M,sum(P)], per-level ``num_points_list``.
    ``discrete_clamp`` defaults to upstream's clamp so that a patched v2 model is unchanged."""
    return ms_deform_attn(value, value_spatial_shapes, sampling_locations, attention_weights,
                          num_points_list=num_points_list, method=method, discrete_clamp=discrete_clamp,
                          backend=backend)


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


# --------------------------------------------------------------------------------------------
# AIFI / positional self-attention
# --------------------------------------------------------------------------------------------


def mha_unsupported(mha: nn.Module) -> Optional[str]:
    """Why ``mha`` (an ``nn.MultiheadAttention``) cannot be served by ``aifi_attention``, or None."""
    if not isinstance(mha, nn.MultiheadAttention):
        return f"expected an nn.MultiheadAttention, got {type(mha).__name__}"
    if not mha.batch_first:
        return "batch_first=False (the layer transposes; not the RT-DETR call)"
    if not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
        return "separate q/k/v projection weights (kdim/vdim != embed_dim)"
    if mha.bias_k is not None or mha.bias_v is not None or mha.add_zero_attn:
        return "add_bias_kv / add_zero_attn"
    return None


def mask_supported(attn_mask: Optional[torch.Tensor], x: torch.Tensor, num_heads: int) -> bool:
    """The op takes no mask, or a bool (True = blocked) / floating mask of [L, L] or [N * H, L, L]."""
    if attn_mask is None:
        return True
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        return False
    N, L = x.shape[0], x.shape[1]
    return tuple(attn_mask.shape) in ((L, L), (N * num_heads, L, L))


def mha_self_attention(mha: nn.Module, x: torch.Tensor, pos: Optional[torch.Tensor] = None,
                       attn_mask: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> torch.Tensor:
    """``mha(x + pos, x + pos, x, attn_mask=attn_mask, need_weights=False)[0]`` of a batch-first
    ``nn.MultiheadAttention`` (or an ``AIFIAttention``) through the fused op, on its own parameters.
    A narrower ``pos`` is widened to x's dtype first (the official encoder adds a float32 embedding to
    float64 tokens): the same values ``x + pos`` has by type promotion."""
    if pos is not None and pos.dtype != x.dtype and torch.promote_types(pos.dtype, x.dtype) == x.dtype:
        pos = pos.to(x.dtype)
    return aifi_attention(x, pos, mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight, mha.out_proj.bias,
                          mha.num_heads, attn_mask, backend=backend)


class AIFIAttention(nn.Module):
    """Positional self-attention, q = k = x + pos and v = x, batch first: RT-DETR's
    ``nn.MultiheadAttention(embed_dim, num_heads, dropout, batch_first=True)`` as its AIFI encoder
    layer and decoder self-attention call it (``need_weights=False``), run by
    ``rtdetr_kernels.aifi_attention``.

    The parameters have nn.MultiheadAttention's names and shapes (``in_proj_weight`` [3E, E],
    ``in_proj_bias`` [3E], ``out_proj.weight`` [E, E], ``out_proj.bias`` [E]), so a state dict of
    one loads into the other unchanged; they are initialised as nn.MultiheadAttention does.
    ``from_mha(mha)`` builds one sharing an existing module's Parameter objects.

    forward(x [N, L, E], pos=None ([1, L, E], [N, L, E] or [L, E]), attn_mask=None (bool [L, L] or
    [N * H, L, L], True = blocked, or an additive float mask)) -> [N, L, E]. The op has no dropout:
    in training with ``dropout > 0`` the call runs PyTorch's ``multi_head_attention_forward``
    (nn.MultiheadAttention's own math) instead. ``backend`` (attribute) pins the op's backend.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 device=None, dtype=None, backend: Optional[str] = None):
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})")
        kw = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.dropout = int(embed_dim), int(num_heads), float(dropout)
        self.head_dim = self.embed_dim // self.num_heads
        self.batch_first = True
        self.backend = backend
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **kw))
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **kw))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self._reset_parameters()

    def _reset_parameters(self) -> None:  # as nn.MultiheadAttention._reset_parameters
        nn.init.xavier_uniform_(self.in_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention, backend: Optional[str] = None) -> "AIFIAttention":
        """An AIFIAttention holding ``mha``'s own Parameter objects (and its ``out_proj`` module):
        training one trains the other."""
        reason = mha_unsupported(mha)
        if reason:
            raise ValueError(f"mha: cannot be served by aifi_attention: {reason}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.embed_dim, self.num_heads, self.dropout = mha.embed_dim, mha.num_heads, float(mha.dropout)
        self.head_dim = mha.head_dim
        self.batch_first = True
        self.backend = backend
        self.in_proj_weight = mha.in_proj_weight
        if mha.in_proj_bias is not None:
            self.in_proj_bias = mha.in_proj_bias
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = mha.out_proj
        self.train(mha.training)
        return self

    def forward(self, x: torch.Tensor, pos: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.training and self.dropout > 0:
            return self._forward_with_dropout(x, pos, attn_mask)
        return mha_self_attention(self, x, pos, attn_mask, self.backend)

    def _forward_with_dropout(self, x, pos, attn_mask):
        qk = x if pos is None else x + pos
        qk, v = qk.transpose(0, 1), x.transpose(0, 1)
        out, _ = F.multi_head_attention_forward(
            qk, qk, v, self.embed_dim, self.num_heads, self.in_proj_weight, self.in_proj_bias, None, None, False,
            self.dropout, self.out_proj.weight, self.out_proj.bias, training=True, attn_mask=attn_mask,
            need_weights=False)
        return out.transpose(0, 1)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
                f"bias={self.in_proj_bias is not None}" + (f", backend={self.backend!r}" if self.backend else ""))
