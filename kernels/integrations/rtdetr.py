"""The ``rtdetr`` family: the reference RT-DETR model (the package ``rtdetr``) and the official
lyuwenyu/RT-DETR modules (``rtdetr_pytorch`` v1 and ``rtdetrv2_pytorch`` v2, which ``rtdetr``
mirrors class for class and attribute for attribute).

Modules are recognised by class name and attributes, never by module path (the official code is
imported as ``src.zoo.rtdetr...`` from a checkout), except that classes of the other codebases that
share a name (``torch.nn.TransformerEncoderLayer``, ultralytics', rfdetr's, transformers') are
left to their own families.

What each kind replaces (per instance; no parameter, buffer or state-dict key changes):

msda
    ``MSDeformableAttention.ms_deformable_attn_core`` (attribute rebind) with
    ``rtdetr_kernels.ms_deform_attn``: v1 ``(value, shapes, loc [N,Lq,M,L,P,2], w)``; v2 (the module
    has the ``num_points_scale`` buffer) keeps its ``method`` ('default' / 'discrete') and clamps
    discrete sampling as the module says (``discrete_clamp``: our model declares 'per_axis'; an
    official module has no such attribute and gets upstream's clamp of both axes to H-1).
attention
    ``TransformerEncoderLayer.forward`` (the AIFI layer) and ``TransformerDecoderLayer.forward``
    (forward swaps) call ``rtdetr_kernels.aifi_attention`` with x and the position embedding
    separately (q = k = x + pos, v = x) on the layer's own ``nn.MultiheadAttention`` parameters
    (``dropin.mha_self_attention``, the call ``dropin.AIFIAttention`` makes); the decoder's
    denoising mask (bool [T, T], True = blocked) goes to the op as it is. The rest of each layer is
    the original code (the v1 decoder layer's ``norm3(tgt.clamp(+-65504))`` included; v2 has none).
    The original forward runs instead when the attention has dropout > 0 in training or the mask is
    of a form the op does not take.
topk
    Query selection: on our model and the official v1 ``RTDETRTransformer``,
    ``_get_decoder_input`` (method rebind) selects with ``rtdetr_kernels.topk_select`` (class max,
    'default'; C = 1, 'agnostic') or ``topk_select_flat`` (token x class, 'one2many'), gathering the
    memory, the logits and the anchors in the one call, and runs ``enc_bbox_head`` on the k selected
    rows only (as ultralytics does): the same rows through the same layers, so the same boxes and
    gradients, without the head's pass over all T tokens. Our ``_select_topk`` and the official v2's
    (``RTDETRTransformerv2``, whose ``_get_decoder_input`` is left as it is) select with the op.
    Post-processor: ``RTDETRPostProcessor.forward`` (forward swap) ranks the sigmoid scores of every
    (query, class) pair with ``topk_select_flat`` and gathers the boxes in the same call; the
    non-focal (softmax) branch, and an official module's ``remap_mscoco_category``, run the original.

``apply_to_rtdetr(model)`` is the older MSDA-only entry point (any module with a
``ms_deformable_attn_core`` attribute); ``rtdetr_kernels.patch(model, attention=False, topk=False)``
does the same for the family's modules.
"""

from __future__ import annotations

import functools
import inspect
import sys
import types
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import dropin
from .patch import Family, Replacement, rebind, register_family

_ATTR = "ms_deformable_attn_core"
# classes of these codebases may share a name with ours (TransformerEncoderLayer, ...): theirs
_OTHER_CODEBASES = ("torch.", "transformers.", "ultralytics.", "rfdetr.", "timm.", "torchvision.")
_FP16_MAX = 65504


def _ours_or_official(m: nn.Module) -> bool:
    return not type(m).__module__.startswith(_OTHER_CODEBASES)


def _instances(model: nn.Module, class_names: Sequence[str]) -> List[Tuple[str, nn.Module]]:
    names = set(class_names)
    return [(q, m) for q, m in model.named_modules() if type(m).__name__ in names and _ours_or_official(m)]


def _has(m: nn.Module, attrs: Sequence[str]) -> bool:
    return all(hasattr(m, a) for a in attrs)


def _original_forward(module: nn.Module) -> Callable:
    """The function ``module.forward`` runs now, as f(self, *args) (no reference to ``module``, so a
    deep copy of a patched model falls back to its own code)."""
    inst = module.__dict__.get("forward")
    if inst is None:
        return type(module).forward
    if isinstance(inst, types.MethodType) and inst.__self__ is module:
        return inst.__func__
    return lambda self, *args, **kwargs: inst(*args, **kwargs)


def _parameters(fn: Callable) -> Tuple[str, ...]:
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return ()
    return tuple(params[1:])  # without self


# --------------------------------------------------------------------------------------------
# msda: the sampling core (attribute rebind)
# --------------------------------------------------------------------------------------------


def _msda_core(module: nn.Module, backend: Optional[str], discrete_clamp: Optional[str] = None) -> Callable:
    original = getattr(module, _ATTR)
    extra = {} if backend is None else {"backend": backend}
    if hasattr(module, "num_points_scale"):  # RT-DETRv2's module (v1 has no such buffer)
        method = getattr(module, "method", None) or getattr(original, "keywords", {}).get("method", "default")
        clamp = discrete_clamp or getattr(module, "discrete_clamp", "official")
        return functools.partial(dropin.deformable_attention_core_func_v2, method=method, discrete_clamp=clamp,
                                 **extra)
    if extra:
        return functools.partial(dropin.deformable_attention_core_func, **extra)
    return dropin.deformable_attention_core_func


def _msda_replacement(where: str, module: nn.Module, backend: Optional[str],
                      discrete_clamp: Optional[str] = None) -> Replacement:
    core = _msda_core(module, backend, discrete_clamp)
    detail = "v2, " + core.keywords["method"] if isinstance(core, functools.partial) and "method" in core.keywords else "v1"
    return rebind("msda", where, module, _ATTR, core, "attribute rebind", f"{_ATTR}: ms_deform_attn ({detail})")


def _patch_msda(model: nn.Module, backend: Optional[str]) -> List[Replacement]:
    return [_msda_replacement(q, m, backend) for q, m in _instances(model, ["MSDeformableAttention"])
            if callable(getattr(m, _ATTR, None))]


class Patch:
    """What ``apply_to_rtdetr`` changed; ``revert()`` puts the originals back."""

    def __init__(self, replaced: List[Replacement]):
        self.replaced = replaced

    def __len__(self) -> int:
        return len(self.replaced)

    def revert(self) -> None:
        for r in reversed(self.replaced):
            r.undo()
        self.replaced = []


def apply_to_rtdetr(model: nn.Module, backend: Optional[str] = None, discrete_clamp: Optional[str] = None) -> Patch:
    """Swap every MSDA sampling core of ``model`` (any module with a ``ms_deformable_attn_core``
    attribute) for ``rtdetr_kernels.ms_deform_attn``; the older MSDA-only form of
    ``rtdetr_kernels.patch(model, attention=False, topk=False)``. Calling it again patches again.

    v2 modules (they have the ``num_points_scale`` buffer) keep their sampling ``method`` ('default' or
    'discrete'). ``discrete_clamp`` is how discrete sampling clamps x: None takes the module's own
    ``discrete_clamp`` attribute (the reference model in ``rtdetr`` declares 'per_axis') and falls back
    to 'official', upstream's clamp of both coordinates to H-1, so a patched upstream model is unchanged.
    """
    replaced = [_msda_replacement(q, m, backend, discrete_clamp) for q, m in model.named_modules()
                if getattr(m, _ATTR, None) is not None]
    if not replaced:
        raise ValueError(f"model: found no module with a `{_ATTR}` attribute; is this an rtdetr model?")
    return Patch(replaced)


# --------------------------------------------------------------------------------------------
# attention: the encoder (AIFI) and decoder self-attention (forward swaps)
# --------------------------------------------------------------------------------------------

_ENCODER_ATTRS = ("self_attn", "normalize_before", "norm1", "norm2", "linear1", "linear2", "dropout", "dropout1",
                  "dropout2", "activation")
_DECODER_ATTRS = ("self_attn", "cross_attn", "norm1", "norm2", "norm3", "linear1", "linear2", "dropout1", "dropout2",
                  "dropout3", "dropout4", "activation")
_ENCODER_SIGNATURE = ("src", "src_mask", "pos_embed")
_DECODER_TAIL = ("reference_points", "memory", "memory_spatial_shapes")
_DECODER_SIGNATURES = {
    ("tgt",) + _DECODER_TAIL + ("attn_mask", "memory_mask", "query_pos_embed"): "rtdetr",  # ours, v1 and v2
    ("target",) + _DECODER_TAIL + ("attn_mask", "memory_mask", "query_pos_embed"): "official v2",
    ("tgt",) + _DECODER_TAIL + ("memory_level_start_index", "attn_mask", "memory_mask", "query_pos_embed"): "official v1",
}


def _fused_attention_serves(layer: nn.Module, x: torch.Tensor, attn_mask: Optional[torch.Tensor]) -> bool:
    mha = layer.self_attn
    return not (layer.training and mha.dropout > 0) and dropin.mask_supported(attn_mask, x, mha.num_heads)


def _encoder_forward(original: Callable, backend: Optional[str]) -> Callable:
    def forward(self, src, src_mask=None, pos_embed=None):
        if not _fused_attention_serves(self, src, src_mask):
            return original(self, src, src_mask, pos_embed)
        residual = src
        if self.normalize_before:
            src = self.norm1(src)
        src = dropin.mha_self_attention(self.self_attn, src, pos_embed, src_mask, backend)
        src = residual + self.dropout1(src)
        if not self.normalize_before:
            src = self.norm1(src)
        residual = src
        if self.normalize_before:
            src = self.norm2(src)
        src = self.linear2(self.dropout(self.activation(self.linear1(src))))
        src = residual + self.dropout2(src)
        if not self.normalize_before:
            src = self.norm2(src)
        return src

    return forward


def _decoder_layer(self, tgt, reference_points, memory, memory_spatial_shapes, attn_mask, memory_mask,
                   query_pos_embed, clamp: bool, backend: Optional[str]):
    tgt2 = dropin.mha_self_attention(self.self_attn, tgt, query_pos_embed, attn_mask, backend)
    tgt = self.norm1(tgt + self.dropout1(tgt2))
    query = tgt if query_pos_embed is None else tgt + query_pos_embed
    tgt2 = self.cross_attn(query, reference_points, memory, memory_spatial_shapes, memory_mask)
    tgt = self.norm2(tgt + self.dropout2(tgt2))
    tgt2 = self.linear2(self.dropout3(self.activation(self.linear1(tgt))))
    tgt = tgt + self.dropout4(tgt2)
    if clamp:  # the v1 layer's fp16 overflow guard
        tgt = tgt.clamp(min=-_FP16_MAX, max=_FP16_MAX)
    return self.norm3(tgt)


def _decoder_forward(original: Callable, variant: str, clamp: bool, backend: Optional[str]) -> Callable:
    if variant == "official v1":
        def forward(self, tgt, reference_points, memory, memory_spatial_shapes, memory_level_start_index,
                    attn_mask=None, memory_mask=None, query_pos_embed=None):
            if not _fused_attention_serves(self, tgt, attn_mask):
                return original(self, tgt, reference_points, memory, memory_spatial_shapes, memory_level_start_index,
                                attn_mask, memory_mask, query_pos_embed)
            return _decoder_layer(self, tgt, reference_points, memory, memory_spatial_shapes, attn_mask, memory_mask,
                                  query_pos_embed, clamp, backend)
    elif variant == "official v2":
        def forward(self, target, reference_points, memory, memory_spatial_shapes, attn_mask=None, memory_mask=None,
                    query_pos_embed=None):
            if not _fused_attention_serves(self, target, attn_mask):
                return original(self, target, reference_points, memory, memory_spatial_shapes, attn_mask,
                                memory_mask, query_pos_embed)
            return _decoder_layer(self, target, reference_points, memory, memory_spatial_shapes, attn_mask,
                                  memory_mask, query_pos_embed, clamp, backend)
    else:
        def forward(self, tgt, reference_points, memory, memory_spatial_shapes, attn_mask=None, memory_mask=None,
                    query_pos_embed=None):
            if not _fused_attention_serves(self, tgt, attn_mask):
                return original(self, tgt, reference_points, memory, memory_spatial_shapes, attn_mask, memory_mask,
                                query_pos_embed)
            return _decoder_layer(self, tgt, reference_points, memory, memory_spatial_shapes, attn_mask, memory_mask,
                                  query_pos_embed, clamp, backend)
    return forward


def _patch_attention(model: nn.Module, backend: Optional[str]) -> List[Replacement]:
    out = []
    for q, m in _instances(model, ["TransformerEncoderLayer"]):
        original = _original_forward(m)
        if (_has(m, _ENCODER_ATTRS) and dropin.mha_unsupported(m.self_attn) is None
                and _parameters(original) == _ENCODER_SIGNATURE):
            out.append(rebind("attention", q, m, "forward", types.MethodType(_encoder_forward(original, backend), m),
                              "forward swap", "self_attn: aifi_attention(x, pos)"))
    for q, m in _instances(model, ["TransformerDecoderLayer"]):
        original = _original_forward(m)
        variant = _DECODER_SIGNATURES.get(_parameters(original))
        if variant is None or not _has(m, _DECODER_ATTRS) or dropin.mha_unsupported(m.self_attn) is not None:
            continue
        # ours says its version; both official v1 layers (the ones taking memory_level_start_index) clamp
        clamp = m.version == "v1" if hasattr(m, "version") else variant == "official v1"
        fwd = _decoder_forward(original, variant, clamp, backend)
        out.append(rebind("attention", q, m, "forward", types.MethodType(fwd, m), "forward swap",
                          "self_attn: aifi_attention(x, pos, mask)" + ("; norm3(clamp)" if clamp else "")))
    return out


# --------------------------------------------------------------------------------------------
# topk: query selection and the post-processor
# --------------------------------------------------------------------------------------------


def _select(self, logits: torch.Tensor, k: int, gather: Sequence[torch.Tensor], backend: Optional[str]):
    """The decoder's query selection through the op: the gathered tensors in ``gather``'s order.
    'default': top k tokens by class max; 'agnostic': by the single logit (C = 1, the same call);
    'one2many': the top k (token, class) pairs, each giving its token (a token may come twice)."""
    from ..topk import topk_select, topk_select_flat

    if getattr(self, "query_select_method", "default") == "one2many":
        return topk_select_flat(logits, k, gather, backend=backend)[3]
    return topk_select(logits, k, gather, backend=backend)[2]


def _select_topk(backend: Optional[str]) -> Callable:
    def _select_topk(self, memory, outputs_logits, outputs_coords_unact, topk):
        return _select(self, outputs_logits, topk, (memory, outputs_logits, outputs_coords_unact), backend)

    return _select_topk


def _get_decoder_input_rtdetr(backend: Optional[str]) -> Callable:
    """``rtdetr.RTDETRTransformer._get_decoder_input`` with the selection through the op and
    ``enc_bbox_head`` on the selected rows."""

    def _get_decoder_input(self, memory, spatial_shapes, denoising_class=None, denoising_bbox_unact=None):
        if (self.version == "v2" and not self.training and self.eval_spatial_size
                and list(spatial_shapes) == self._eval_shapes()):
            anchors, valid_mask = self.anchors, self.valid_mask
        else:
            anchors, valid_mask = self._anchors_for(spatial_shapes, memory.device, memory.dtype)
        memory = valid_mask.to(memory.dtype) * memory
        output_memory = self.enc_output(memory)
        enc_logits = self.enc_score_head(output_memory)
        anchors = anchors.to(memory.dtype).expand(memory.shape[0], -1, -1)
        topk_memory, topk_logits, topk_anchors = _select(self, enc_logits, self.num_queries,
                                                         (output_memory, enc_logits, anchors), backend)
        topk_coords = self.enc_bbox_head(topk_memory) + topk_anchors
        enc_topk_bboxes = torch.sigmoid(topk_coords)
        if self.learnt_init_query:
            target = self.tgt_embed.weight.unsqueeze(0).tile([memory.shape[0], 1, 1])
        else:
            target = topk_memory.detach()
        ref_unact = topk_coords.detach()
        if denoising_bbox_unact is not None:
            ref_unact = torch.cat([denoising_bbox_unact, ref_unact], 1)
            target = torch.cat([denoising_class, target], 1)
        return target, ref_unact, enc_topk_bboxes, topk_logits

    return _get_decoder_input


def _get_decoder_input_official_v1(backend: Optional[str]) -> Callable:
    """lyuwenyu/RT-DETR v1 ``RTDETRTransformer._get_decoder_input`` (rtdetr_pytorch, commit 068dfde)
    with the selection through the op and ``enc_bbox_head`` on the selected rows."""

    def _get_decoder_input(self, memory, spatial_shapes, denoising_class=None, denoising_bbox_unact=None):
        bs = memory.shape[0]
        if self.training or self.eval_spatial_size is None:
            anchors, valid_mask = self._generate_anchors(spatial_shapes, device=memory.device)
        else:
            anchors, valid_mask = self.anchors.to(memory.device), self.valid_mask.to(memory.device)
        memory = valid_mask.to(memory.dtype) * memory
        output_memory = self.enc_output(memory)
        enc_outputs_class = self.enc_score_head(output_memory)
        topk_memory, enc_topk_logits, topk_anchors = _select(
            self, enc_outputs_class, self.num_queries, (output_memory, enc_outputs_class, anchors.expand(bs, -1, -1)),
            backend)
        reference_points_unact = self.enc_bbox_head(topk_memory) + topk_anchors
        enc_topk_bboxes = F.sigmoid(reference_points_unact)
        if denoising_bbox_unact is not None:
            reference_points_unact = torch.concat([denoising_bbox_unact, reference_points_unact], 1)
        if self.learnt_init_query:
            target = self.tgt_embed.weight.unsqueeze(0).tile([bs, 1, 1])
        else:
            target = topk_memory.detach()
        if denoising_class is not None:
            target = torch.concat([denoising_class, target], 1)
        return target, reference_points_unact.detach(), enc_topk_bboxes, enc_topk_logits

    return _get_decoder_input


_DECODER_INPUT_SIGNATURE = ("memory", "spatial_shapes", "denoising_class", "denoising_bbox_unact")
_SELECT_TOPK_SIGNATURE = ("memory", "outputs_logits", "outputs_coords_unact", "topk")
_HEADS = ("enc_output", "enc_score_head", "enc_bbox_head", "num_queries")


def _postprocessor_forward(original: Callable, backend: Optional[str]) -> Callable:
    def forward(self, outputs, orig_target_sizes):
        lut = getattr(sys.modules.get(type(self).__module__), "MSCOCO_CATEGORY_IDS", None)  # ours has one
        if not self.use_focal_loss or (self.remap_mscoco_category and lut is None):
            return original(self, outputs, orig_target_sizes)
        import torchvision

        from ..topk import topk_select_flat

        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        bbox = torchvision.ops.box_convert(boxes, in_fmt="cxcywh", out_fmt="xyxy")
        bbox = bbox * orig_target_sizes.repeat(1, 2).unsqueeze(1).to(bbox.dtype)
        scores, labels, _, (boxes,) = topk_select_flat(torch.sigmoid(logits), self.num_top_queries, (bbox,),
                                                       backend=backend)
        if self.deploy_mode:
            return labels, boxes, scores
        if self.remap_mscoco_category:
            labels = torch.tensor(lut, device=labels.device)[labels]
        return [dict(labels=lab, boxes=box, scores=sco) for lab, box, sco in zip(labels, boxes, scores)]

    return forward


def _patch_topk(model: nn.Module, backend: Optional[str]) -> List[Replacement]:
    out = []
    for q, m in _instances(model, ["RTDETRTransformer", "RTDETRTransformerv2"]):
        if not _has(m, _HEADS):
            continue
        ours = hasattr(m, "_anchors_for")
        decoder_input = _parameters(getattr(type(m), "_get_decoder_input", None))
        if decoder_input == _DECODER_INPUT_SIGNATURE and (ours or not hasattr(m, "_select_topk")):
            make = _get_decoder_input_rtdetr if ours else _get_decoder_input_official_v1
            out.append(rebind("topk", q, m, "_get_decoder_input", types.MethodType(make(backend), m), "method rebind",
                              "_get_decoder_input: topk_select, enc_bbox_head on the k selected tokens"))
        if _parameters(getattr(type(m), "_select_topk", None)) == _SELECT_TOPK_SIGNATURE:
            out.append(rebind("topk", q, m, "_select_topk", types.MethodType(_select_topk(backend), m),
                              "method rebind", "_select_topk: topk_select"))
    for q, m in _instances(model, ["RTDETRPostProcessor"]):
        if _has(m, ("use_focal_loss", "num_top_queries", "num_classes", "deploy_mode", "remap_mscoco_category")):
            fwd = _postprocessor_forward(_original_forward(m), backend)
            out.append(rebind("topk", q, m, "forward", types.MethodType(fwd, m), "forward swap",
                              "top-k of (query, class) pairs: topk_select_flat"))
    return out


# --------------------------------------------------------------------------------------------
# The family
# --------------------------------------------------------------------------------------------


def _apply(model: nn.Module, kinds: frozenset, backend: Optional[str]) -> List[Replacement]:
    out: List[Replacement] = []
    try:
        if "msda" in kinds:
            out += _patch_msda(model, backend)
        if "attention" in kinds:
            out += _patch_attention(model, backend)
        if "topk" in kinds:
            out += _patch_topk(model, backend)
    except BaseException:
        for r in reversed(out):
            r.undo()
        raise
    return out


FAMILY = register_family(Family(
    name="rtdetr",
    covers=("the reference model (package rtdetr) and lyuwenyu/RT-DETR v1/v2: MSDeformableAttention, "
            "TransformerEncoderLayer, TransformerDecoderLayer, RTDETRTransformer(v2), RTDETRPostProcessor"),
    apply=_apply,
))
