"""The ``ultralytics`` family: ultralytics 8.4.190's RT-DETR (``ultralytics.RTDETR`` / ``RTDETRDetectionModel``).

``rtdetr_kernels.patch(model)`` accepts the ``ultralytics.RTDETR`` wrapper (it patches the wrapper's
``.model``, the ``RTDETRDetectionModel``; the handle lives on that module, so patching the wrapper or its
``.model`` is the same call) or the ``RTDETRDetectionModel`` itself. Per instance, nothing global:

- msda: ``MSDeformAttn.forward`` (forward swap). Upstream computes the same projections and calls
  ``multi_scale_deformable_attn_pytorch`` by name (a process-wide rebind would reach every model);
  the swap calls ``rtdetr_kernels.ms_deform_attn`` with value [N, S, M, D], locations
  [N, Lq, M, L*P, 2] and ``num_points_list=[P]*L``. The 4-d ``refer_bbox`` uses upstream's v1 scaling
  (offset / P * wh * 0.5), the 2-d one its per-level normaliser; ``value_mask`` (True = padding) is
  applied with ``masked_fill`` before the op, as upstream does.
- attention: ``AIFI.forward`` (the encoder's one transformer layer) calls ``aifi_attention(src, pos, ...)``
  with the layer's ``nn.MultiheadAttention`` weights, an exact match (upstream leaves ``need_weights``
  True, which sends MHA down its slow path); ``DeformableTransformerDecoderLayer.forward`` runs its
  self-attention (a seq-first MHA upstream, called on transposed tensors) batch first through
  ``aifi_attention`` with the denoising mask of ``get_cdn_group`` (bool, True = blocked).
- topk: ``RTDETRDecoder._get_decoder_input`` (method rebind): ``topk_select(scores, k, (features,
  anchors, scores))`` replaces the class max, ``topk`` and three gathers (the gathered features carry
  the gradient to the encoder, as upstream; ``enc_bbox_head`` already runs on the k rows only);
  ``RTDETRDecoder.postprocess`` (method rebind): ``topk_select_flat(scores, k, (boxes,))`` over the
  sigmoid scores the head passes it.

Where the op cannot do what a call asks, the patched method calls the original for that call:
attention dropout > 0 in training, an MHA with separate q/k/v projections, ``bias_k``/``add_zero_attn``
or a key padding mask; a pre-norm AIFI is served too (``normalize_before``); the decoder self-attention
falls back if its MHA is batch first (upstream would then be transposing wrongly); query selection
and the post-processor keep the original in ``export`` or ``dynamic`` mode (TensorRT's grouped top-k,
``max_det``, shape tensors) and when ``scores``' class count differs from ``nc``.

Tie order: upstream's ``torch.topk`` leaves equal scores in an unspecified order; the ops order
them by lower index (documented in ``topk_select``). Scores tie in practice only where anchors are
invalid (their features are all the same).

Patched methods are ``BoundPatch`` objects: ``copy.deepcopy`` of a patched model (ultralytics' EMA
does one) is patched the same way, bound to the copy; pickling (``torch.save(model)``) stores the
original method, so a checkpoint never needs rtdetr_kernels to load. A model that ultralytics rebuilds
(``RTDETR.train`` builds a new one, ``fuse`` returns the same one) must be patched again.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .bound import BoundPatch, backend_kw as _kw, swap
from .patch import Family, Replacement, named_instances, register_family

_PREFIX = "ultralytics."

# --------------------------------------------------------------------------------------------
# msda: MSDeformAttn.forward
# --------------------------------------------------------------------------------------------


def _msda_forward(self, patch: BoundPatch, query, refer_bbox, value, value_shapes, value_mask=None):
    from ..ms_deform_attn import ms_deform_attn

    bs, len_q = query.shape[:2]
    len_v = value.shape[1]
    assert sum(s[0] * s[1] for s in value_shapes) == len_v
    value = self.value_proj(value)
    if value_mask is not None:
        value = value.masked_fill(value_mask[..., None], float(0))
    value = value.view(bs, len_v, self.n_heads, self.d_model // self.n_heads)
    n_total_points = self.n_levels * self.n_points
    sampling_offsets = self.sampling_offsets(query).view(bs, len_q, self.n_heads, n_total_points, 2)
    attention_weights = F.softmax(self.attention_weights(query).view(bs, len_q, self.n_heads, n_total_points), -1)
    num_points = refer_bbox.shape[-1]
    if num_points == 2:
        offset_normalizer = torch.as_tensor(value_shapes, dtype=query.dtype, device=query.device).flip(-1)
        offset_normalizer = offset_normalizer[:, None, :].expand(-1, self.n_points, -1).reshape(n_total_points, 2)
        sampling_locations = refer_bbox[:, :, None, :, :] + sampling_offsets / offset_normalizer
    elif num_points == 4:
        sampling_locations = (
            refer_bbox[:, :, None, :, :2] + sampling_offsets / self.n_points * refer_bbox[:, :, None, :, 2:] * 0.5
        )
    else:
        raise ValueError(f"Last dim of reference_points must be 2 or 4, but got {num_points}.")
    output = ms_deform_attn(value, value_shapes, sampling_locations, attention_weights,
                            num_points_list=[self.n_points] * self.n_levels, **_kw(patch.backend))
    return self.output_proj(output)


# --------------------------------------------------------------------------------------------
# attention: AIFI.forward and DeformableTransformerDecoderLayer.forward
# --------------------------------------------------------------------------------------------


def _mha_servable(ma: nn.MultiheadAttention, training: bool) -> bool:
    """Whether aifi_attention computes exactly what ``ma`` does: packed q/k/v, no bias_k/v, no zero
    attention, no dropout in training."""
    return (ma._qkv_same_embed_dim and ma.in_proj_weight is not None and ma.bias_k is None
            and not ma.add_zero_attn and not (training and ma.dropout > 0))


def _attend(ma: nn.MultiheadAttention, x, pos, mask, backend):
    from ..attention import aifi_attention

    return aifi_attention(x, pos, ma.in_proj_weight, ma.in_proj_bias, ma.out_proj.weight, ma.out_proj.bias,
                          ma.num_heads, mask, **_kw(backend))


def _aifi_forward(self, patch: BoundPatch, x):
    ma = self.ma
    if not _mha_servable(ma, self.training) or not ma.batch_first:
        return patch.original(x)
    c, h, w = x.shape[1:]
    pos = self.build_2d_sincos_position_embedding(w, h, c, like=x).to(x.dtype)
    src = x.flatten(2).permute(0, 2, 1)
    if self.normalize_before:  # forward_pre
        src2 = self.norm1(src)
        src = src + self.dropout1(_attend(ma, src2, pos, None, patch.backend))
        src2 = self.norm2(src)
        src = src + self.dropout2(self.fc2(self.dropout(self.act(self.fc1(src2)))))
    else:  # forward_post
        src = self.norm1(src + self.dropout1(_attend(ma, src, pos, None, patch.backend)))
        src = self.norm2(src + self.dropout2(self.fc2(self.dropout(self.act(self.fc1(src))))))
    return src.permute(0, 2, 1).view([-1, c, h, w]).contiguous()


def _decoder_layer_forward(self, patch: BoundPatch, embed, refer_bbox, feats, shapes, padding_mask=None,
                           attn_mask=None, query_pos=None):
    sa = self.self_attn
    if not _mha_servable(sa, self.training) or sa.batch_first:
        return patch.original(embed, refer_bbox, feats, shapes, padding_mask, attn_mask, query_pos)
    tgt = _attend(sa, embed, query_pos, attn_mask, patch.backend)
    embed = self.norm1(embed + self.dropout1(tgt))
    tgt = self.cross_attn(self.with_pos_embed(embed, query_pos), refer_bbox.unsqueeze(2), feats, shapes, padding_mask)
    embed = self.norm2(embed + self.dropout2(tgt))
    return self.forward_ffn(embed)


# --------------------------------------------------------------------------------------------
# topk: RTDETRDecoder._get_decoder_input and RTDETRDecoder.postprocess
# --------------------------------------------------------------------------------------------


def _get_decoder_input(self, patch: BoundPatch, feats, shapes, dn_embed=None, dn_bbox=None):
    from ..topk import topk_select

    if self.export or self.dynamic:
        return patch.original(feats, shapes, dn_embed, dn_bbox)
    bs = feats.shape[0]
    if self.shapes != shapes:
        self.anchors, self.valid_mask = self._generate_anchors(shapes, feats)
        self.shapes = shapes
    features = self.enc_output(self.valid_mask * feats)  # bs, h*w, hd
    enc_outputs_scores = self.enc_score_head(features)  # bs, h*w, nc
    k = min(self.num_queries, enc_outputs_scores.shape[1])
    _, _, (top_k_features, top_k_anchors, enc_scores) = topk_select(
        enc_outputs_scores, k, (features, self.anchors.expand(bs, -1, -1), enc_outputs_scores), **_kw(patch.backend))
    refer_bbox = self.enc_bbox_head(top_k_features) + top_k_anchors
    enc_bboxes = refer_bbox.sigmoid()
    if dn_bbox is not None:
        refer_bbox = torch.cat([dn_bbox, refer_bbox], 1)
    embeddings = self.tgt_embed.weight[:k].unsqueeze(0).repeat(bs, 1, 1) if self.learnt_init_query else top_k_features
    if self.training:
        refer_bbox = refer_bbox.detach()
        if not self.learnt_init_query:
            embeddings = embeddings.detach()
    if dn_embed is not None:
        embeddings = torch.cat([dn_embed, embeddings], 1)
    return embeddings, refer_bbox, enc_bboxes, enc_scores


def _postprocess(self, patch: BoundPatch, boxes, scores):
    from ..topk import topk_select_flat

    if self.export or self.dynamic or scores.shape[-1] != self.nc:
        return patch.original(boxes, scores)
    k = min(self.num_queries, scores.shape[1] * self.nc)
    top, labels, _, (top_boxes,) = topk_select_flat(scores, k, (boxes,), **_kw(patch.backend))
    return torch.cat([top_boxes, top[..., None], labels[..., None].float()], dim=-1)


# --------------------------------------------------------------------------------------------
# The family
# --------------------------------------------------------------------------------------------

_TARGETS = (
    # kind, class, attribute, patched function, how, detail
    ("msda", "MSDeformAttn", "forward", _msda_forward, "forward swap",
     "ms_deform_attn on value [N,S,M,D], locations [N,Lq,M,L*P,2]"),
    ("attention", "AIFI", "forward", _aifi_forward, "forward swap", "aifi_attention, q = k = src + pos"),
    ("attention", "DeformableTransformerDecoderLayer", "forward", _decoder_layer_forward, "forward swap",
     "self-attention batch first through aifi_attention"),
    ("topk", "RTDETRDecoder", "_get_decoder_input", _get_decoder_input, "method rebind",
     "query selection: topk_select of (features, anchors, scores)"),
    ("topk", "RTDETRDecoder", "postprocess", _postprocess, "method rebind", "post-processor: topk_select_flat"),
)


def _apply(model: nn.Module, kinds: frozenset, backend: Optional[str]) -> List[Replacement]:
    replaced: List[Replacement] = []
    try:
        for kind, cls, attr, fn, how, detail in _TARGETS:
            if kind not in kinds:
                continue
            for where, module in named_instances(model, [cls], _PREFIX):
                replaced.append(swap(kind, where, module, attr, fn, backend, how, detail))
    except BaseException:
        for r in reversed(replaced):
            r.undo()
        raise
    return replaced


def _unwrap(obj) -> Optional[nn.Module]:
    """``ultralytics.RTDETR`` (any ``ultralytics.engine.model.Model``) -> its ``.model`` network."""
    if not isinstance(obj, nn.Module):
        return None
    if not any(c.__name__ == "Model" and c.__module__ == "ultralytics.engine.model" for c in type(obj).__mro__):
        return None
    inner = obj._modules.get("model")
    return inner if isinstance(inner, nn.Module) else None


FAMILY = register_family(Family(
    name="ultralytics",
    covers="ultralytics RTDETR / RTDETRDetectionModel (MSDeformAttn, AIFI, DeformableTransformerDecoderLayer, "
           "RTDETRDecoder query selection and postprocess)",
    apply=_apply,
    unwrap=_unwrap,
))
