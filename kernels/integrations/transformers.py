"""The ``transformers`` family: Hugging Face transformers' DETR models (read at 5.23.0; 5.17.0 has the same classes).

``rtdetr_kernels.patch(model)`` patches, per instance (nothing process-wide):

- msda:
  - ``MultiScaleDeformableAttention`` (the layer transformers hooks with ``use_kernel_forward_from_hub``;
    ten identical copies: rt_detr, deformable_detr, grounding_dino, mm_grounding_dino, omdet_turbo,
    lw_detr, rf_detr, pp_doclayout_v2/v3/v4), matched by class name: forward swap to
    ``ms_deform_attn(value, shapes_list, locations, weights)``. This covers ``RTDetrModel``'s decoder and
    Deformable-DETR's encoder (Lq = S) and decoder.
  - ``RTDetrV2MultiscaleDeformableAttention``: its forward calls the module function
    ``multi_scale_deformable_attention_v2`` by name, so the forward itself is swapped (a copy of
    5.23's forward up to the sampling locations; a global rebind would reach every model). It
    calls ``ms_deform_attn(..., num_points_list=module.n_points_list, method=module.method,
    discrete_clamp="per_axis")`` and checks the token count against the shapes list (Python ints):
    no host sync, where upstream's ``torch_compilable_check`` on a device tensor syncs once per
    decoder layer.
  - ``DFineMultiscaleDeformableAttention`` / ``Deimv2MultiscaleDeformableAttention``: attribute rebind
    of ``ms_deformable_attn_core`` (called positionally with ``(value, shapes_list, locations, weights,
    num_points_list, decoder_method)``; non-uniform ``num_points_list`` such as [3, 6, 3] is served).
    Their forward is not swapped, so upstream's per-layer host sync stays unless
    ``TRANSFORMERS_DISABLE_TORCH_CHECK=1`` is set.
  transformers' v2 / D-FINE ports clamp discrete sampling per axis (x to W-1, y to H-1), hence
  ``discrete_clamp="per_axis"`` (upstream lyuwenyu/RT-DETR clamps both to H-1).
- attention: the DETR self-attention classes with transformers' shared forward (q = q_proj(x + pos),
  k = k_proj(x + pos), v = v_proj(x), then o_proj): ``RTDetrSelfAttention`` (AIFI and decoder),
  ``RTDetrV2SelfAttention``, ``DFineSelfAttention``, ``Deimv2SelfAttention``, ``DeformableDetrSelfAttention``
  (decoder), ``DetrSelfAttention``, ``ConditionalDetrSelfAttention``, ``MaskFormerDetrSelfAttention`` and
  ``PPDocLayoutV{2,3,4}SelfAttention``: forward swap to ``aifi_attention(x, pos, cat(q, k, v weights),
  cat(biases), o_proj.weight, o_proj.bias, heads, mask)`` returning ``(out, None)`` (transformers' sdpa
  path returns no weights either). The concatenated weights are cached only for inference (eval with
  grad disabled, outside compile), keyed on each parameter's ``data_ptr`` and ``_version`` (the cache
  holds the old tensors, so a freed address cannot be reused under it); in training the concatenation
  runs every call, so the gradients reach q/k/v_proj. The original runs for what the op does not take:
  ``output_attentions``, attention dropout > 0 in training, bool masks (transformers' True = attend),
  a mask other than [T, T] or [N, 1 | H, T, T] float, a position embedding of another shape.
  With ``config.eval_size`` set, RT-DETR's AIFI passes no position embedding in eval (pos=None); the
  decoder's denoising mask in training is a float [T, T] with -inf: both are served.
- topk: the post-processor, which is not part of the model: ``patch_processor(processor)`` overrides
  ``post_process_object_detection`` on an ``RTDetrImageProcessor`` (also RT-DETRv2's, D-FINE's and
  DEIMv2's) or ``DeformableDetrImageProcessor`` instance (and their ``...Pil`` twins), ranking the
  sigmoid scores of every (query, class) pair with ``topk_select_flat`` and gathering the boxes in the
  same call (``sigmoid=True``: ranked on the probabilities, as upstream, since float32's sigmoid is
  exactly 1.0 above a logit of about 17; such saturated pairs are ordered by lower query, then class,
  where ``torch.topk`` leaves them unspecified). ``use_focal_loss=False`` runs the original (its softmax). The query selection sits inline
  in ``RTDetrModel.forward`` (one ``topk`` and three gathers, no hook); patching it would need a
  version-pinned copy of the whole forward for little gain, so it is left alone (``patch`` on a
  transformers model reports "topk: nothing to patch").

Patched callables are ``BoundPatch`` objects: ``copy.deepcopy`` of a patched model is patched the same way,
bound to the copy; pickling stores the original (a checkpoint never needs rtdetr_kernels to load).

The ``kernels`` package path (what transformers users may expect): ``kernels_mapping()`` returns a
mapping for ``kernels.register_kernel_mapping`` / ``use_kernel_mapping`` whose repository loads the
stateless ``dropin.MultiScaleDeformableAttention`` layer locally (no Hub download); ``register_kernels``
also hooks the model's ``MultiScaleDeformableAttention`` classes with ``kernels.replace_kernel_forward_from_hub``
(transformers' own decorator does nothing unless kernels is within its version gate, >= 0.18.2 for 5.23,
[0.16, 0.17) for 5.17) and registers the mapping; ``kernels.kernelize(model, mode=Mode.INFERENCE,
device=...)`` then swaps the layer's forward. See docs/integrations.md.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
import textwrap
import warnings
from types import ModuleType
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .bound import _MARK, BoundPatch, _identity, backend_kw as _kw, swap as _swap
from .patch import _HANDLE_ATTR, Family, PatchHandle, Replacement, named_instances, register_family

_PREFIX = "transformers.models."

HUB_MSDA = "MultiScaleDeformableAttention"
V2_MSDA = ("RTDetrV2MultiscaleDeformableAttention",)
CORE_MSDA = ("DFineMultiscaleDeformableAttention", "Deimv2MultiscaleDeformableAttention")
# the AIFI encoder layers sharing RTDetrEncoderLayer's forward
ENCODER_LAYERS = ("RTDetrEncoderLayer", "RTDetrV2EncoderLayer", "DFineEncoderLayer", "Deimv2EncoderLayer",
                  "PPDocLayoutV2EncoderLayer", "PPDocLayoutV3EncoderLayer", "PPDocLayoutV4EncoderLayer")
SELF_ATTENTION = (
    "RTDetrSelfAttention", "RTDetrV2SelfAttention", "DFineSelfAttention", "Deimv2SelfAttention",
    "DeformableDetrSelfAttention", "DetrSelfAttention", "ConditionalDetrSelfAttention", "MaskFormerDetrSelfAttention",
    "PPDocLayoutV2SelfAttention", "PPDocLayoutV3SelfAttention", "PPDocLayoutV4SelfAttention",
)
RTDETR_PROCESSORS = ("RTDetrImageProcessor", "RTDetrImageProcessorPil")
DEFORMABLE_PROCESSORS = ("DeformableDetrImageProcessor", "DeformableDetrImageProcessorPil")


# --------------------------------------------------------------------------------------------
# Bound patches (per instance; deep copies follow, pickles store the original)
# --------------------------------------------------------------------------------------------


class _Core:
    """An attribute-held core function replaced by ``fn`` (with ``backend``); pickles as the original."""

    __slots__ = ("fn", "original", "backend", _MARK)

    def __init__(self, fn: Callable, original: Callable, backend: Optional[str]):
        self.fn = fn
        self.original = original
        self.backend = backend
        setattr(self, _MARK, True)

    def __call__(self, *args, **kwargs):
        return self.fn(*args, backend=self.backend, **kwargs)

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return (_identity, (self.original,))


def _ops():
    import rtdetr_kernels

    return rtdetr_kernels


# --------------------------------------------------------------------------------------------
# msda
# --------------------------------------------------------------------------------------------


def _hub_msda_forward(self, patch: BoundPatch, value, value_spatial_shapes, value_spatial_shapes_list=None,
                      level_start_index=None, sampling_locations=None, attention_weights=None, im2col_step=64):
    # value [N, S, M, D], locations [N, Lq, M, L, P, 2], weights [N, Lq, M, L, P] -> [N, Lq, M*D];
    # the shapes list holds Python ints (the tensor twin would be read back from the device).
    shapes = value_spatial_shapes_list if value_spatial_shapes_list is not None else value_spatial_shapes
    return _ops().ms_deform_attn(value, shapes, sampling_locations, attention_weights, **_kw(patch.backend))


def _v2_core(value, value_spatial_shapes, sampling_locations, attention_weights, num_points_list,
             method="default", *, backend=None):
    """transformers' ``multi_scale_deformable_attention_v2`` signature (``method`` positional, as D-FINE
    passes its ``decoder_method``); discrete sampling clamps per axis, as transformers' ports do. Discrete
    sampling has no gradient to the locations (upstream's int64 cast cuts the graph, so the offsets'
    gradients are None, not zero: an optimizer then skips them); the locations are detached to match."""
    if method == "discrete":
        sampling_locations = sampling_locations.detach()
    return _ops().ms_deform_attn(value, value_spatial_shapes, sampling_locations, attention_weights,
                                 num_points_list=list(num_points_list), method=method, discrete_clamp="per_axis",
                                 **_kw(backend))


def _v2_msda_forward(self, patch: BoundPatch, hidden_states, attention_mask=None, encoder_hidden_states=None,
                     encoder_attention_mask=None, position_embeddings=None, reference_points=None, spatial_shapes=None,
                     spatial_shapes_list=None, level_start_index=None, **kwargs):
    # RTDetrV2MultiscaleDeformableAttention.forward of transformers 5.23 (same in 5.17) up to the
    # sampling locations; the core is the op, the shape check reads Python ints.
    if spatial_shapes_list is None or reference_points is None or reference_points.shape[-1] not in (2, 4):
        return patch.original(hidden_states, attention_mask=attention_mask, encoder_hidden_states=encoder_hidden_states,
                              encoder_attention_mask=encoder_attention_mask, position_embeddings=position_embeddings,
                              reference_points=reference_points, spatial_shapes=spatial_shapes,
                              spatial_shapes_list=spatial_shapes_list, level_start_index=level_start_index, **kwargs)
    if position_embeddings is not None:
        hidden_states = hidden_states + position_embeddings
    batch_size, num_queries, _ = hidden_states.shape
    batch_size, sequence_length, _ = encoder_hidden_states.shape
    total = sum(h * w for h, w in spatial_shapes_list)
    if isinstance(total, int) and isinstance(sequence_length, int):
        if total != sequence_length:
            raise ValueError("Make sure to align the spatial shapes with the sequence length of the encoder hidden states")
    else:  # symbolic sizes under torch.compile(dynamic=True): a hint, no sync
        torch._check(total == sequence_length)

    value = self.value_proj(encoder_hidden_states)
    if attention_mask is not None:
        value = value.masked_fill(~attention_mask[..., None], float(0))
    value = value.view(batch_size, sequence_length, self.n_heads, self.d_model // self.n_heads)
    sampling_offsets = self.sampling_offsets(hidden_states).view(
        batch_size, num_queries, self.n_heads, self.n_levels * self.n_points, 2)
    attention_weights = self.attention_weights(hidden_states).view(
        batch_size, num_queries, self.n_heads, self.n_levels * self.n_points)
    attention_weights = F.softmax(attention_weights, -1)
    if reference_points.shape[-1] == 2:
        offset_normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
        sampling_locations = (reference_points[:, :, None, :, None, :]
                              + sampling_offsets / offset_normalizer[None, None, None, :, None, :])
    else:
        n_points_scale = self.n_points_scale.to(dtype=hidden_states.dtype).unsqueeze(-1)
        offset = sampling_offsets * n_points_scale * reference_points[:, :, None, :, 2:] * self.offset_scale
        sampling_locations = reference_points[:, :, None, :, :2] + offset
    output = _v2_core(value, spatial_shapes_list, sampling_locations, attention_weights, self.n_points_list,
                      self.method, backend=patch.backend)
    output = self.output_proj(output)
    return output, attention_weights


_V2_MEMBERS = ("value_proj", "sampling_offsets", "attention_weights", "output_proj", "n_points_scale", "n_points_list",
               "method", "offset_scale", "n_heads", "n_levels", "n_points", "d_model")


# --------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------


def _packed_qkv(self, patch: BoundPatch):
    """cat(q, k, v) weights and biases; cached for inference only (see the module docstring)."""
    q, k, v = self.q_proj, self.k_proj, self.v_proj
    params = (q.weight, k.weight, v.weight, q.bias, k.bias, v.bias)
    cacheable = not (self.training or torch.is_grad_enabled() or torch.compiler.is_compiling())
    if cacheable:
        key = tuple(None if p is None else (p.data_ptr(), p._version, p.dtype, p.device, tuple(p.shape)) for p in params)
        hit = patch.cache
        if hit is not None and hit[0] == key:
            return hit[1], hit[2]
    w = torch.cat([q.weight, k.weight, v.weight], 0)
    b = None if q.bias is None else torch.cat([q.bias, k.bias, v.bias], 0)
    if cacheable:
        # the cache holds the parameters' current tensors, so their addresses cannot be reused while it lives
        patch.cache = (key, w, b, tuple(None if p is None else p.detach() for p in params))
    else:
        patch.cache = None
    return w, b


def _op_mask(mask: Optional[torch.Tensor], N: int, T: int, H: int):
    """transformers' additive float mask as the op takes it, or False where the op cannot (the caller
    then runs the original)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or not mask.is_floating_point():
        return False  # bool masks mean True = attend in transformers' sdpa path, the op's True = blocked
    if mask.dim() == 2 and tuple(mask.shape) == (T, T):
        return mask
    if mask.dim() == 4 and mask.shape[0] in (1, N) and mask.shape[1] in (1, H) and tuple(mask.shape[2:]) == (T, T):
        return mask.expand(N, H, T, T).reshape(N * H, T, T)
    return False


def _self_attention_forward(self, patch: BoundPatch, hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
    # transformers' DETR self-attention (rt_detr L308 in 5.23): q = k = x + pos, v = x, eager or sdpa
    # core (dropout only in training), o_proj; returns (output, weights).
    x = hidden_states
    fallback = (x.dim() != 3
                or kwargs.get("output_attentions", getattr(getattr(self, "config", None), "output_attentions", False))
                or (self.training and self.attention_dropout > 0))
    mask = None
    if not fallback:
        N, T, E = x.shape
        H = E // self.head_dim
        mask = _op_mask(attention_mask, N, T, H)
        pos = position_embeddings
        fallback = mask is False or (pos is not None and (pos.dim() not in (2, 3) or tuple(pos.shape[-2:]) != (T, E)
                                                          or (pos.dim() == 3 and pos.shape[0] not in (1, N))))
    if fallback:
        return patch.original(hidden_states, attention_mask=attention_mask, position_embeddings=position_embeddings,
                              **kwargs)
    w, b = _packed_qkv(self, patch)
    out = _ops().aifi_attention(x, position_embeddings, w, b, self.o_proj.weight, self.o_proj.bias, H, mask,
                                **_kw(patch.backend))
    return out, None


def _attention_servable(m: nn.Module) -> bool:
    lin = [getattr(m, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    if not all(isinstance(l, nn.Linear) for l in lin) or getattr(m, "is_causal", False):
        return False
    E = lin[0].in_features
    if any(l.in_features != E or l.out_features != E for l in lin) or E % m.head_dim:
        return False
    if len({l.bias is None for l in lin[:3]}) != 1:
        return False
    return abs(float(m.scaling) - m.head_dim ** -0.5) < 1e-9 * m.head_dim ** -0.5


def _encoder_layer_forward(self, patch: BoundPatch, hidden_states, attention_mask=None, spatial_position_embeddings=None,
                           **kwargs):
    # RTDetrEncoderLayer.forward (the same body in RTDetrV2 / DFine / Deimv2 / PPDocLayoutV2-4), with
    # upstream's training-only ``if not torch.isfinite(h).all(): h = clamp(h)`` made branch-free: the
    # same values, no host sync and no graph break under torch.compile.
    residual = hidden_states
    if self.normalize_before:
        hidden_states = self.self_attn_layer_norm(hidden_states)
    hidden_states, _ = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask,
                                      position_embeddings=spatial_position_embeddings, **kwargs)
    hidden_states = F.dropout(hidden_states, p=self.dropout, training=self.training)
    hidden_states = residual + hidden_states
    if not self.normalize_before:
        hidden_states = self.self_attn_layer_norm(hidden_states)
    if self.normalize_before:
        hidden_states = self.final_layer_norm(hidden_states)
    residual = hidden_states
    hidden_states = self.mlp(hidden_states)
    hidden_states = residual + hidden_states
    if not self.normalize_before:
        hidden_states = self.final_layer_norm(hidden_states)
    if self.training:
        clamp_value = torch.finfo(hidden_states.dtype).max - 1000
        hidden_states = torch.where(torch.isfinite(hidden_states).all(), hidden_states,
                                    torch.clamp(hidden_states, min=-clamp_value, max=clamp_value))
    return hidden_states


# --------------------------------------------------------------------------------------------
# Forward copies are applied only where the class's forward is the one they copy
# --------------------------------------------------------------------------------------------

# token fingerprints of the upstream bodies (docstring, comments and layout ignored), transformers 5.17 and 5.23
_V2_MSDA_FORWARD = "RTDetrV2MultiscaleDeformableAttention.forward"
_ENCODER_LAYER_FORWARD = "RTDetrEncoderLayer.forward"
_FINGERPRINTS = {
    _V2_MSDA_FORWARD: {"5f8417898f64639003b5bcf26055a63088d5c09e"},
    _ENCODER_LAYER_FORWARD: {"2de58e2583bf9abe33f02f30fc56f2b652ffae3e"},
}


@functools.lru_cache(maxsize=None)
def _fingerprint(fn) -> Optional[str]:
    """sha1 of the function body's tokens, without its docstring, comments and layout; None without source."""
    import inspect

    try:
        return fingerprint_source(inspect.getsource(fn))
    except (OSError, TypeError):
        return None


def fingerprint_source(src: str) -> str:
    import hashlib
    import io
    import tokenize

    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING,
            tokenize.ENDMARKER}
    toks = [t for t in tokenize.generate_tokens(io.StringIO(textwrap.dedent(src)).readline) if t.type not in skip]
    start = next(i for i, t in enumerate(toks) if t.type == tokenize.NAME and t.string == "def")
    depth, colon = 0, None
    for i in range(start, len(toks)):
        c = toks[i].string
        depth += c in ("(", "[", "{")
        depth -= c in (")", "]", "}")
        if depth == 0 and c == ":" and toks[i].type == tokenize.OP:
            colon = i
            break
    body = toks[colon + 1:]
    if body and body[0].type == tokenize.STRING:
        body = body[1:]
    return hashlib.sha1(" ".join(t.string for t in body).encode()).hexdigest()


def _copy_applies(cls: type, name: str) -> bool:
    return _fingerprint(cls.forward) in _FINGERPRINTS[name]


# --------------------------------------------------------------------------------------------
# topk: the post-processor
# --------------------------------------------------------------------------------------------


def _corners(boxes: torch.Tensor) -> torch.Tensor:
    from transformers.image_transforms import center_to_corners_format

    return center_to_corners_format(boxes)


def _scale(boxes: torch.Tensor, target_sizes, rtdetr: bool) -> torch.Tensor:
    if target_sizes is None:
        return boxes
    if isinstance(target_sizes, list):
        if rtdetr:
            img_h, img_w = torch.as_tensor(target_sizes).unbind(1)
        else:
            img_h = torch.Tensor([i[0] for i in target_sizes])
            img_w = torch.Tensor([i[1] for i in target_sizes])
    else:
        img_h, img_w = target_sizes.unbind(1)
    scale_fct = torch.stack([img_w, img_h, img_w, img_h], dim=1).to(boxes.device)
    return boxes * scale_fct[:, None, :]


def _select(out_logits, boxes, k, backend):
    from ..topk import topk_select_flat

    scores, labels, _, (boxes,) = topk_select_flat(out_logits, k, (boxes,), sigmoid=True, **_kw(backend))
    return scores, labels, boxes


def _results(scores, labels, boxes, threshold):
    results = []
    for s, l, b in zip(scores, labels, boxes):
        keep = s > threshold
        results.append({"scores": s[keep], "labels": l[keep], "boxes": b[keep]})
    return results


def _rtdetr_post_process(self, patch: BoundPatch, outputs, threshold: float = 0.5, target_sizes=None,
                         use_focal_loss: bool = True):
    # RTDetrImageProcessor.post_process_object_detection: sigmoid -> topk over Q*C pairs (k = Q) ->
    # label = idx % C, query = idx // C -> gather boxes; scaling commutes with the gather.
    if not use_focal_loss:
        return patch.original(outputs, threshold=threshold, target_sizes=target_sizes, use_focal_loss=use_focal_loss)
    out_logits, out_bbox = outputs.logits, outputs.pred_boxes
    if target_sizes is not None and len(out_logits) != len(target_sizes):
        raise ValueError("Make sure that you pass in as many target sizes as the batch dimension of the logits")
    scores, labels, boxes = _select(out_logits, _corners(out_bbox), out_logits.shape[1], patch.backend)
    return _results(scores, labels, _scale(boxes, target_sizes, True), threshold)


def _deformable_post_process(self, patch: BoundPatch, outputs, threshold: float = 0.5, target_sizes=None, top_k: int = 100):
    # DeformableDetrImageProcessor.post_process_object_detection: the same with k = min(top_k, Q*C).
    out_logits, out_bbox = outputs.logits, outputs.pred_boxes
    if target_sizes is not None and len(out_logits) != len(target_sizes):
        raise ValueError("Make sure that you pass in as many target sizes as the batch dimension of the logits")
    k = min(top_k, out_logits.shape[1] * out_logits.shape[2])
    scores, labels, boxes = _select(out_logits, _corners(out_bbox), k, patch.backend)
    return _results(scores, labels, _scale(boxes, target_sizes, False), threshold)


def patch_processor(processor, backend: Optional[str] = None) -> PatchHandle:
    """Patch a transformers image processor's ``post_process_object_detection`` in place (on the
    instance) with ``topk_select_flat``; returns a handle (``revert()``, ``report()``). Patching twice
    returns the first handle. Serves ``RTDetrImageProcessor`` (RT-DETR, RT-DETRv2, D-FINE, DEIMv2) and
    ``DeformableDetrImageProcessor``, and their ``...Pil`` twins."""
    existing = getattr(processor, _HANDLE_ATTR, None)
    if existing is not None and existing.active:
        return existing
    names = {c.__name__ for c in type(processor).__mro__ if c.__module__.startswith(_PREFIX)}
    if names & set(RTDETR_PROCESSORS):
        fn, detail = _rtdetr_post_process, "sigmoid scores, topk_select_flat over queries x classes, k = queries"
    elif names & set(DEFORMABLE_PROCESSORS):
        fn, detail = _deformable_post_process, "sigmoid scores, topk_select_flat over queries x classes, k = top_k"
    else:
        raise ValueError(f"processor: expected one of {list(RTDETR_PROCESSORS + DEFORMABLE_PROCESSORS)} (transformers), "
                         f"got {type(processor).__module__}.{type(processor).__name__}")
    r = _swap("topk", "post_process_object_detection", processor, "post_process_object_detection", fn, backend,
              "method rebind", detail)
    handle = PatchHandle(processor, [r], frozenset({"topk"}), backend)
    object.__setattr__(processor, _HANDLE_ATTR, handle)
    return handle


# --------------------------------------------------------------------------------------------
# The family
# --------------------------------------------------------------------------------------------


def _apply(model: nn.Module, kinds: frozenset, backend: Optional[str]) -> List[Replacement]:
    replaced: List[Replacement] = []
    try:
        if "msda" in kinds:
            for where, m in named_instances(model, [HUB_MSDA], _PREFIX):
                replaced.append(_swap("msda", where, m, "forward", _hub_msda_forward, backend, "forward swap",
                                      "ms_deform_attn, value [N, S, M, D]"))
            for where, m in named_instances(model, V2_MSDA, _PREFIX):
                if not _copy_applies(type(m), _V2_MSDA_FORWARD) or any(not hasattr(m, a) for a in _V2_MEMBERS):
                    warnings.warn(f"rtdetr_kernels.patch: {where} ({type(m).__name__}) left unpatched: its forward is not "
                                  "the one the patch copies (transformers 5.17-5.23)", stacklevel=3)
                    continue
                replaced.append(_swap("msda", where, m, "forward", _v2_msda_forward, backend, "forward swap",
                                      "num_points_list, method kept, discrete_clamp='per_axis', no host sync"))
            for where, m in named_instances(model, CORE_MSDA, _PREFIX):
                original = getattr(m, "ms_deformable_attn_core", None)
                if original is None:
                    continue
                base = original.original if getattr(original, _MARK, False) else original
                had = "ms_deformable_attn_core" in m.__dict__
                replaced.append(_rebind_core(where, m, _Core(_v2_core, base, backend), had, base))
        if "attention" in kinds:
            for where, m in named_instances(model, SELF_ATTENTION, _PREFIX):
                if _attention_servable(m):
                    replaced.append(_swap("attention", where, m, "forward", _self_attention_forward, backend,
                                          "forward swap", "aifi_attention, packed q/k/v"))
            for where, m in named_instances(model, ENCODER_LAYERS, _PREFIX):
                if _copy_applies(type(m), _ENCODER_LAYER_FORWARD):
                    replaced.append(_swap("attention", where, m, "forward", _encoder_layer_forward, backend,
                                          "forward swap", "encoder layer: training's non-finite clamp without a host "
                                          "sync or graph break"))
    except BaseException:
        for r in reversed(replaced):
            r.undo()
        raise
    return replaced


def _rebind_core(where: str, m: nn.Module, core: _Core, had: bool, original) -> Replacement:
    def undo():
        if had:
            object.__setattr__(m, "ms_deformable_attn_core", original)
        elif "ms_deformable_attn_core" in m.__dict__:
            object.__delattr__(m, "ms_deformable_attn_core")

    object.__setattr__(m, "ms_deformable_attn_core", core)
    return Replacement("msda", where, type(m).__name__, "attribute rebind", undo,
                       "ms_deformable_attn_core, method positional (decoder_method), discrete_clamp='per_axis'")


FAMILY = register_family(Family(
    name="transformers",
    covers="transformers RTDetr / RTDetrV2 / DFine / Deimv2 / DeformableDetr and every model with its "
           "MultiScaleDeformableAttention (msda); the DETR self-attention classes (attention); "
           "the image processors' post_process_object_detection through patch_processor (topk)",
    apply=_apply,
))


# --------------------------------------------------------------------------------------------
# The kernels package path
# --------------------------------------------------------------------------------------------


def hub_kernels() -> ModuleType:
    """Hugging Face's ``kernels`` package, even where this repository's ``kernels/`` folder (the source of
    ``rtdetr_kernels``) shadows it: with the repository root on ``sys.path`` (``python -m pytest`` and a
    REPL started there put the working directory first) ``import kernels`` finds the folder before the
    installed package. The folder's modules are dropped from ``sys.modules`` (under that name it defines
    nothing) and the package is imported with such roots left out of the path."""
    mod = sys.modules.get("kernels")
    if mod is not None and not _is_source_folder(mod):
        return mod
    for name in [n for n in sys.modules if n == "kernels" or n.startswith("kernels.")]:
        del sys.modules[name]  # all from the folder: its package module is the folder's
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if not os.path.isfile(os.path.join(p or os.curdir, "kernels", "_library.py"))]
    try:
        mod = importlib.import_module("kernels")
    finally:
        sys.path[:] = saved
    if _is_source_folder(mod):  # pragma: no cover - reachable some other way (a .pth file)
        del sys.modules["kernels"]
        raise ModuleNotFoundError("Hugging Face's 'kernels' package is shadowed by " + os.path.dirname(mod.__file__),
                                  name="kernels")
    return mod


def _is_source_folder(mod: ModuleType) -> bool:
    """``mod`` is this project's source folder imported as ``kernels`` (it holds ``_library.py``)."""
    f = getattr(mod, "__file__", None)
    return bool(f) and os.path.isfile(os.path.join(os.path.dirname(f), "_library.py"))


class LocalLayerRepository:
    """A ``kernels`` repository (``load()`` returns the layer class) serving the stateless
    ``dropin.MultiScaleDeformableAttention`` from this package: nothing is downloaded."""

    layer_name = HUB_MSDA

    def load(self):
        from .dropin import MultiScaleDeformableAttention

        return MultiScaleDeformableAttention

    def __eq__(self, other):
        return isinstance(other, LocalLayerRepository)

    def __hash__(self):
        return hash(LocalLayerRepository)

    def __str__(self):
        return "rtdetr_kernels (local layer MultiScaleDeformableAttention)"


def kernels_mapping(devices: Sequence[str] = ("cuda", "cpu")) -> Dict[str, dict]:
    """The mapping for ``kernels.register_kernel_mapping`` / ``kernels.use_kernel_mapping``:
    ``{"MultiScaleDeformableAttention": {device: LocalLayerRepository()}}``."""
    return {HUB_MSDA: {d: LocalLayerRepository() for d in devices}}


def register_kernels(model: Optional[nn.Module] = None, devices: Sequence[str] = ("cuda", "cpu")) -> List[type]:
    """Make ``kernels.kernelize`` serve transformers' ``MultiScaleDeformableAttention`` with this package.

    Process-wide, as the kernels package works: every ``MultiScaleDeformableAttention`` class of ``model``
    (or, with no model, of every transformers modeling module imported so far) that transformers did
    not hook (its gate wants another kernels version) gets ``kernels.replace_kernel_forward_from_hub(cls,
    "MultiScaleDeformableAttention")`` (a class attribute), and ``kernels_mapping(devices)`` is
    registered globally. Returns the classes hooked now. Then call ``kernels.kernelize(model,
    mode=kernels.Mode.INFERENCE, device="cpu")`` (or TRAINING, TORCH_COMPILE: the layer has a backward
    and compiles)."""
    kernels = hub_kernels()
    if model is not None:
        classes = {type(m) for _, m in named_instances(model, [HUB_MSDA], _PREFIX)}
    else:
        classes = {getattr(mod, HUB_MSDA) for name, mod in list(sys.modules.items())
                   if name.startswith(_PREFIX) and isinstance(getattr(mod, HUB_MSDA, None), type)}
    hooked = []
    for cls in sorted(classes, key=lambda c: c.__module__):
        if getattr(cls, "kernel_layer_name", None) is None:
            kernels.replace_kernel_forward_from_hub(cls, HUB_MSDA)
            hooked.append(cls)
    kernels.register_kernel_mapping(kernels_mapping(devices))
    return hooked
