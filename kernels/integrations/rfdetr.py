"""The ``rfdetr`` family: Roboflow's RF-DETR (rfdetr 1.11.2; the ``LWDETR`` network and its ``PostProcess``).

``rtdetr_kernels.patch(rf)`` takes an ``RFDETR`` object (``RFDETRNano(...)`` etc.; no nn.Module itself)
and patches its network ``rf.model.model`` and post-processor ``rf.model.postprocess`` together (held
in one ``nn.ModuleDict`` kept on ``rf.model``, so patching ``rf`` twice is a no-op); each can also be
patched alone. Per instance, nothing global:

- msda: ``MSDeformAttn.forward`` (forward swap). Upstream transposes the projected value to
  [N, M, D, S] (a contiguous copy) for its grid-sample core; the swap views ``value_proj(x)`` as
  [N, S, M, D] directly and calls ``rtdetr_kernels.ms_deform_attn``, with the v1 locations
  [N, Lq, M, L, P, 2] in eager mode and upstream's export layout [N, Lq, M, L*P, 2]
  (``num_points_list=[P]*L``) in export mode. RF-DETR's shapes: L = 1 level, M = 16 heads of D = 16,
  P = 2 points (Nano to Large). Level shapes come from ``input_spatial_shapes_hw`` (Python ints) when
  the caller passes them, as the decoder does; otherwise from the tensor (one host copy on a GPU).
- attention: ``TransformerDecoderLayer.forward_post`` (instance rebind; ``forward`` calls it): the
  self-attention q = k = tgt + query_pos, v = tgt runs through ``aifi_attention``, with the group split
  of training kept (the 13 groups stacked on the batch, as upstream). The windowed DINOv2 backbone has
  its own attention and is not patched.
- topk: ``PostProcess._select_topk`` (method rebind): upstream's full ``argsort`` of the N x (Q*C)
  sigmoid scores becomes ``topk_select_flat(logits, k, sigmoid=True)`` (it ranks the same sigmoid
  values, so saturated scores tie as upstream's; same order: descending, equal scores by lower flat
  index; C = classes + 1); ``Transformer._two_stage_group_selection`` (training's batched two-stage
  query selection, method rebind): ``topk_select`` over the groups stacked on the batch, gathering the
  class logits, the normed memory and the proposals in the same call. The eval query selection is
  inline in ``Transformer.forward`` (a 300-line method): not patched.

Where the op cannot do what a call asks, the patched method calls the original: a decoder layer with
keypoint processing, a ``tgt_key_padding_mask``, attention dropout > 0 in training, an MHA with
separate q/k/v projections; ``num_select`` = 0. Upstream's ``argsort`` puts NaN scores first, the op
last (a model producing NaN scores has other problems). ``_two_stage_group_selection`` is a copy of
rfdetr 1.11.2's method with its top-k and gathers replaced, so it is patched only on rfdetr 1.11.x.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .bound import BoundPatch, backend_kw as _kw, swap
from .patch import Family, Replacement, named_instances, register_family

_PREFIX = "rfdetr."


# --------------------------------------------------------------------------------------------
# msda: MSDeformAttn.forward
# --------------------------------------------------------------------------------------------


def _msda_forward(self, patch: BoundPatch, query, reference_points, input_flatten, input_spatial_shapes,
                  input_level_start_index, input_padding_mask=None, input_spatial_shapes_hw=None):
    from ..ms_deform_attn import ms_deform_attn

    if self._export and input_spatial_shapes_hw is None:  # upstream's own error
        return patch.original(query, reference_points, input_flatten, input_spatial_shapes, input_level_start_index,
                              input_padding_mask, input_spatial_shapes_hw)
    batch_size, len_query, _ = query.shape
    _, len_input, _ = input_flatten.shape
    if input_spatial_shapes_hw is not None:
        assert sum(h * w for h, w in input_spatial_shapes_hw) == len_input, \
            "input_spatial_shapes must match the flattened input length"
    # (without the Python pairs the op checks the tensor's shapes against the value length)
    M, L, P = self.n_heads, self.n_levels, self.n_points
    value = self.value_proj(input_flatten)
    if input_padding_mask is not None:
        value = value.masked_fill(input_padding_mask[..., None], float(0))
    value = value.view(batch_size, len_input, M, self.d_model // M)
    attention_weights = self.attention_weights(query).view(batch_size, len_query, M, L * P)
    n_ref_levels = reference_points.shape[2]
    if n_ref_levels not in (1, L):
        raise ValueError(f"reference_points level dim must be 1 or n_levels={L}, got {n_ref_levels}")
    if reference_points.shape[-1] not in (2, 4):
        raise ValueError("Last dim of reference_points must be 2 or 4, but get {} instead.".format(
            reference_points.shape[-1]))
    if self._export:  # upstream's rank-5 layout, (L, P) merged
        sampling_offsets = self.sampling_offsets(query).view(batch_size, len_query, M, L * P, 2)
        if n_ref_levels == 1:
            reference_points = reference_points.expand(-1, -1, L, -1)
        ref = reference_points.repeat_interleave(P, dim=2)
        if reference_points.shape[-1] == 2:
            offset_normalizer = torch.stack([input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1)
            offset_normalizer = offset_normalizer.repeat_interleave(P, dim=0)
            sampling_locations = ref[:, :, None, :, :] + sampling_offsets / offset_normalizer[None, None, None, :, :]
        else:
            sampling_locations = ref[:, :, None, :, :2] + sampling_offsets / P * ref[:, :, None, :, 2:] * 0.5
        attention_weights = F.softmax(attention_weights, -1)
    else:
        sampling_offsets = self.sampling_offsets(query).view(batch_size, len_query, M, L, P, 2)
        if reference_points.shape[-1] == 2:
            offset_normalizer = torch.stack([input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1)
            sampling_locations = (reference_points[:, :, None, :, None, :]
                                  + sampling_offsets / offset_normalizer[None, None, None, :, None, :])
        else:
            sampling_locations = (reference_points[:, :, None, :, None, :2]
                                  + sampling_offsets / P * reference_points[:, :, None, :, None, 2:] * 0.5)
        attention_weights = F.softmax(attention_weights, -1).view(batch_size, len_query, M, L, P)
    shapes = input_spatial_shapes_hw if input_spatial_shapes_hw is not None else input_spatial_shapes
    output = ms_deform_attn(value, shapes, sampling_locations, attention_weights,
                            num_points_list=[P] * L if self._export else None, **_kw(patch.backend))
    return self.output_proj(output)


# --------------------------------------------------------------------------------------------
# attention: TransformerDecoderLayer.forward_post
# --------------------------------------------------------------------------------------------


def _forward_post(self, patch: BoundPatch, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                  memory_key_padding_mask=None, query_pos=None, reference_points=None, spatial_shapes=None,
                  spatial_shapes_hw=None, level_start_index=None, keypoint_tgt=None, keypoint_pos=None,
                  keypoint_class_mask=None, kp_cross_attn_memory=None):
    from ..attention import aifi_attention

    sa = self.self_attn
    if (self.enable_keypoint_processing or tgt_key_padding_mask is not None or not sa.batch_first
            or not sa._qkv_same_embed_dim or sa.in_proj_weight is None or sa.bias_k is not None or sa.add_zero_attn
            or (self.training and sa.dropout > 0)):
        return patch.original(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                              tgt_key_padding_mask=tgt_key_padding_mask,
                              memory_key_padding_mask=memory_key_padding_mask, query_pos=query_pos,
                              reference_points=reference_points, spatial_shapes=spatial_shapes,
                              spatial_shapes_hw=spatial_shapes_hw, level_start_index=level_start_index,
                              keypoint_tgt=keypoint_tgt, keypoint_pos=keypoint_pos,
                              keypoint_class_mask=keypoint_class_mask, kp_cross_attn_memory=kp_cross_attn_memory)
    bs, num_queries, _ = tgt.shape
    x, pos = tgt, query_pos
    if self.training:  # the groups attend separately: stacked on the batch, as upstream
        group = num_queries // self.group_detr
        x = torch.cat(x.split(group, dim=1), dim=0)
        if pos is not None:
            pos = torch.cat(pos.split(group, dim=1), dim=0)
    tgt2 = aifi_attention(x, pos, sa.in_proj_weight, sa.in_proj_bias, sa.out_proj.weight, sa.out_proj.bias,
                          sa.num_heads, tgt_mask, **_kw(patch.backend))
    if self.training:
        tgt2 = torch.cat(tgt2.split(bs, dim=0), dim=1)
    tgt = self.norm1(tgt + self.dropout1(tgt2))
    tgt2 = self.cross_attn(self.with_pos_embed(tgt, query_pos), reference_points, memory, spatial_shapes,
                           level_start_index, memory_key_padding_mask, input_spatial_shapes_hw=spatial_shapes_hw)
    tgt = self.norm2(tgt + self.dropout2(tgt2))
    tgt2 = self.linear2(self.dropout(self.activation(self.linear1(tgt))))
    return self.norm3(tgt + self.dropout3(tgt2))


# --------------------------------------------------------------------------------------------
# topk: PostProcess._select_topk and Transformer._two_stage_group_selection
# --------------------------------------------------------------------------------------------


def _select_topk(self, patch: BoundPatch, out_logits):
    from ..topk import topk_select_flat

    k = min(self.num_select, out_logits.shape[1] * out_logits.shape[2])
    if k < 1:
        return patch.original(out_logits)
    scores, labels, queries, _ = topk_select_flat(out_logits, k, (), sigmoid=True, **_kw(patch.backend))
    return scores, labels, queries


def _two_stage_group_selection(self, patch: BoundPatch, output_memory, output_proposals, group_detr):
    # rfdetr 1.11.2's Transformer._two_stage_group_selection with its top-k and three gathers replaced
    # by one topk_select over the groups stacked on the batch (group-major: row g * bs + b).
    from rfdetr.models.transformer import _batched_group_layer_norm, _batched_group_linear, _stack_linear_params

    from ..topk import topk_select

    assert self.training
    bs, S = output_memory.shape[:2]
    topk = min(self.num_queries, S)
    enc_output_weight, enc_output_bias = _stack_linear_params(self.enc_output)
    norm_weight = torch.stack([m.weight for m in self.enc_output_norm])
    norm_bias = torch.stack([m.bias for m in self.enc_output_norm])
    norm_eps = self.enc_output_norm[0].eps
    memory_expanded = output_memory.unsqueeze(0).expand(group_detr, -1, -1, -1)
    output_memory_all = _batched_group_linear(memory_expanded, enc_output_weight, enc_output_bias)
    output_memory_all = _batched_group_layer_norm(output_memory_all, norm_weight, norm_bias, norm_eps)
    class_weight, class_bias = _stack_linear_params(self.enc_out_class_embed)
    class_logits_all = _batched_group_linear(output_memory_all, class_weight, class_bias)

    def stacked(t):  # (group, bs, S, C) -> (group * bs, S, C)
        return t.reshape(group_detr * bs, S, t.shape[-1])

    logits = stacked(class_logits_all)
    proposals = output_proposals.unsqueeze(0).expand(group_detr, -1, -1, -1).reshape(group_detr * bs, S, 4)
    _, _, (cls_logits_selected, tgt_undetach_all, output_proposals_all) = topk_select(
        logits, topk, (logits, stacked(output_memory_all), proposals), **_kw(patch.backend))

    def grouped(t):  # (group * bs, k, C) -> (group, bs, k, C)
        return t.view(group_detr, bs, topk, t.shape[-1])

    cls_logits_selected, tgt_undetach_all, output_proposals_all = (
        grouped(cls_logits_selected), grouped(tgt_undetach_all), grouped(output_proposals_all))
    hidden = tgt_undetach_all
    bbox_mlps = self.enc_out_bbox_embed
    num_layers = bbox_mlps[0].num_layers
    for layer_idx in range(num_layers):
        layer_weight, layer_bias = _stack_linear_params([mlp.layers[layer_idx] for mlp in bbox_mlps])
        hidden = _batched_group_linear(hidden, layer_weight, layer_bias)
        if layer_idx < num_layers - 1:
            hidden = F.relu(hidden)
    if self.bbox_reparam:
        coord_cxcy_all = hidden[..., :2] * output_proposals_all[..., 2:] + output_proposals_all[..., :2]
        coord_wh_all = hidden[..., 2:].exp() * output_proposals_all[..., 2:]
        refpoint_embed_all_undetach = torch.concat([coord_cxcy_all, coord_wh_all], dim=-1)
    else:
        refpoint_embed_all_undetach = hidden + output_proposals_all
    refpoint_embed_all = refpoint_embed_all_undetach.detach()

    def merge_groups(t):  # (group, bs, k, C) -> (bs, group * k, C), group 0 first
        return t.permute(1, 0, 2, 3).reshape(bs, group_detr * topk, t.shape[-1])

    return (merge_groups(refpoint_embed_all), merge_groups(tgt_undetach_all),
            merge_groups(refpoint_embed_all_undetach), merge_groups(cls_logits_selected))


# --------------------------------------------------------------------------------------------
# The family
# --------------------------------------------------------------------------------------------


def _version_1_11() -> bool:
    from importlib import metadata

    try:
        return metadata.version("rfdetr").startswith("1.11.")
    except metadata.PackageNotFoundError:
        return False


_TARGETS = (
    # kind, class, attribute, patched function, how, detail
    ("msda", "MSDeformAttn", "forward", _msda_forward, "forward swap",
     "ms_deform_attn on value_proj(x).view(N,S,M,D), no [N,M,D,S] copy"),
    ("attention", "TransformerDecoderLayer", "forward_post", _forward_post, "method rebind",
     "self-attention through aifi_attention, group split kept"),
    ("topk", "PostProcess", "_select_topk", _select_topk, "method rebind", "post-processor: topk_select_flat for the argsort"),
    ("topk", "Transformer", "_two_stage_group_selection", _two_stage_group_selection, "method rebind",
     "training's two-stage query selection: topk_select"),
)


def _apply(model: nn.Module, kinds: frozenset, backend: Optional[str]) -> List[Replacement]:
    replaced: List[Replacement] = []
    try:
        for kind, cls, attr, fn, how, detail in _TARGETS:
            if kind not in kinds:
                continue
            found = named_instances(model, [cls], _PREFIX)
            if fn is _two_stage_group_selection and found and not _version_1_11():
                continue  # a copy of 1.11's method: not applied to another version
            for where, module in found:
                if not callable(getattr(type(module), attr, None)):
                    continue
                replaced.append(swap(kind, where, module, attr, fn, backend, how, detail))
    except BaseException:
        for r in reversed(replaced):
            r.undo()
        raise
    return replaced


def _unwrap(obj) -> Optional[nn.Module]:
    """An ``rfdetr.detr.RFDETR`` object -> ModuleDict(model=its LWDETR, postprocess=its PostProcess)."""
    if isinstance(obj, nn.Module) or not any(c.__name__ == "RFDETR" and c.__module__ == "rfdetr.detr"
                                             for c in type(obj).__mro__):
        return None
    context = getattr(obj, "model", None)
    parts = {name: getattr(context, name, None) for name in ("model", "postprocess")}
    parts = {k: v for k, v in parts.items() if isinstance(v, nn.Module)}
    if not parts:
        return None
    held = getattr(context, "_rtdetr_kernels_modules", None)
    if held is None or dict(held.items()) != parts:  # the context's modules changed: a new holder
        held = nn.ModuleDict(parts)
        object.__setattr__(context, "_rtdetr_kernels_modules", held)
    return held


FAMILY = register_family(Family(
    name="rfdetr",
    covers="rfdetr LWDETR and PostProcess (MSDeformAttn, TransformerDecoderLayer self-attention, "
           "PostProcess._select_topk, Transformer._two_stage_group_selection)",
    apply=_apply,
    unwrap=_unwrap,
))
