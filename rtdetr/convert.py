"""State-dict conversion between the official (lyuwenyu) RT-DETR v1 naming used by :mod:`rtdetr` and
HuggingFace transformers' ``RTDetrForObjectDetection`` (5.x naming; the older hub naming with
``encoder.encoder.N``, ``out_proj``, ``fc1``/``fc2`` is accepted by :func:`from_transformers` too)."""
from __future__ import annotations

import re
from typing import Dict, Mapping

import torch

__all__ = ["to_transformers", "from_transformers"]

_ATTN_SPLIT = ("q_proj", "k_proj", "v_proj")
# sub-module names inside one encoder / decoder layer: (official, transformers), applied in order
_ENCODER_LAYER_NAMES = (("self_attn.out_proj", "self_attn.o_proj"), ("linear1", "mlp.fc1"), ("linear2", "mlp.fc2"),
                        ("norm1", "self_attn_layer_norm"), ("norm2", "final_layer_norm"))
_DECODER_LAYER_NAMES = (("self_attn.out_proj", "self_attn.o_proj"), ("cross_attn.", "encoder_attn."),
                        ("linear1", "mlp.fc1"), ("linear2", "mlp.fc2"), ("norm1", "self_attn_layer_norm"),
                        ("norm2", "encoder_attn_layer_norm"), ("norm3", "final_layer_norm"))


def _rename(rest: str, names, to_transformers: bool) -> str:
    for official, hf in names:
        rest = rest.replace(official, hf) if to_transformers else rest.replace(hf, official)
    return rest


def _official_to_hf_key(k: str) -> str:
    # ---------------- backbone
    m = re.match(r"backbone\.conv1\.conv1_(\d)\.(conv|norm)\.(.*)", k)
    if m:
        part = "convolution" if m.group(2) == "conv" else "normalization"
        return f"model.backbone.model.embedder.embedder.{int(m.group(1)) - 1}.{part}.{m.group(3)}"
    m = re.match(r"backbone\.res_layers\.(\d+)\.blocks\.(\d+)\.(.*)", k)
    if m:
        s, j, rest = m.groups()
        pre = f"model.backbone.model.encoder.stages.{s}.layers.{j}."
        m2 = re.match(r"branch2([abc])\.(conv|norm)\.(.*)", rest)
        if m2:
            idx = "abc".index(m2.group(1))
            part = "convolution" if m2.group(2) == "conv" else "normalization"
            return pre + f"layer.{idx}.{part}.{m2.group(3)}"
        m2 = re.match(r"short\.conv\.(conv|norm)\.(.*)", rest)
        if m2:
            part = "convolution" if m2.group(1) == "conv" else "normalization"
            return pre + f"shortcut.1.{part}.{m2.group(2)}"
        m2 = re.match(r"short\.(conv|norm)\.(.*)", rest)
        if m2:
            part = "convolution" if m2.group(1) == "conv" else "normalization"
            return pre + f"shortcut.{part}.{m2.group(2)}"
        raise KeyError(k)
    # ---------------- encoder
    m = re.match(r"encoder\.input_proj\.(\d+)\.(0|1|conv|norm)\.(.*)", k)
    if m:
        idx = {"conv": "0", "norm": "1"}.get(m.group(2), m.group(2))
        return f"model.encoder_input_proj.{m.group(1)}.{idx}.{m.group(3)}"
    m = re.match(r"encoder\.encoder\.(\d+)\.layers\.(\d+)\.(.*)", k)
    if m:
        i, l, rest = m.groups()
        pre = f"model.encoder.aifi.{i}.layers.{l}."
        return pre + _rename(rest, _ENCODER_LAYER_NAMES, to_transformers=True)
    if k.startswith("encoder."):
        return "model." + k
    # ---------------- decoder
    m = re.match(r"decoder\.input_proj\.(\d+)\.(conv|norm)\.(.*)", k)
    if m:
        return f"model.decoder_input_proj.{m.group(1)}.{'0' if m.group(2) == 'conv' else '1'}.{m.group(3)}"
    m = re.match(r"decoder\.decoder\.layers\.(\d+)\.(.*)", k)
    if m:
        l, rest = m.groups()
        return f"model.decoder.layers.{l}.{_rename(rest, _DECODER_LAYER_NAMES, to_transformers=True)}"
    m = re.match(r"decoder\.dec_score_head\.(\d+)\.(.*)", k)
    if m:
        return f"model.decoder.class_embed.{m.group(1)}.{m.group(2)}"
    m = re.match(r"decoder\.dec_bbox_head\.(\d+)\.(.*)", k)
    if m:
        return f"model.decoder.bbox_embed.{m.group(1)}.{m.group(2)}"
    if k.startswith("decoder.query_pos_head."):
        return "model." + k
    m = re.match(r"decoder\.enc_output\.(0|1|proj|norm)\.(.*)", k)
    if m:
        return f"model.enc_output.{ {'proj': '0', 'norm': '1'}.get(m.group(1), m.group(1)) }.{m.group(2)}"
    for name in ("enc_score_head", "enc_bbox_head", "denoising_class_embed"):
        if k.startswith(f"decoder.{name}."):
            return "model." + k[len("decoder."):]
    raise KeyError(k)


def to_transformers(state_dict: Mapping[str, torch.Tensor], drop_backbone_num_batches_tracked: bool = True
                    ) -> Dict[str, torch.Tensor]:
    """Official/rtdetr naming -> transformers ``RTDetrForObjectDetection`` naming.
    Packed ``in_proj_weight/bias`` are split into q/k/v; v2-only buffers (anchors, valid_mask,
    num_points_scale) and fused deploy convs are dropped; backbone ``num_batches_tracked`` is dropped because
    transformers freezes all backbone BNs by default."""
    out: Dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        if k in ("decoder.anchors", "decoder.valid_mask") or k.endswith("num_points_scale"):
            continue
        if re.search(r"bottlenecks\.\d+\.conv\.(weight|bias)$", k):
            continue
        if k.startswith("backbone.") and k.endswith("num_batches_tracked") and drop_backbone_num_batches_tracked:
            continue
        if k.endswith("self_attn.in_proj_weight") or k.endswith("self_attn.in_proj_bias"):
            base = _official_to_hf_key(k.replace("in_proj_weight", "PLACEHOLDER").replace("in_proj_bias",
                                                                                          "PLACEHOLDER"))
            suffix = "weight" if k.endswith("weight") else "bias"
            for name, chunk in zip(_ATTN_SPLIT, v.chunk(3, dim=0)):
                out[base.replace("PLACEHOLDER", f"{name}.{suffix}")] = chunk.clone()
            continue
        out[_official_to_hf_key(k)] = v
    return out


def from_transformers(state_dict: Mapping[str, torch.Tensor], version: str = "v1",
                      backbone_num_batches_tracked: bool = False) -> Dict[str, torch.Tensor]:
    """transformers naming -> official/rtdetr naming (``version='v1'``; ``'v2'`` renames ``enc_output`` and the
    encoder input projections like the rtdetrv2 code; v2 buffers are not created).  Top-level
    ``class_embed``/``bbox_embed`` aliases of the decoder heads are ignored.  With
    ``backbone_num_batches_tracked=True`` zero counters are added for backbone norms (R18/R34 use plain BN);
    :func:`rtdetr.load_checkpoint` tolerates their absence anyway."""
    sd = {}
    for k, v in state_dict.items():
        k2 = k
        # older (hub checkpoint / transformers 4.x) names
        k2 = re.sub(r"^model\.encoder\.encoder\.(\d+)\.layers\.", r"model.encoder.aifi.\1.layers.", k2)
        k2 = re.sub(r"self_attn\.out_proj\.", "self_attn.o_proj.", k2)
        k2 = re.sub(r"(layers\.\d+)\.fc([12])\.", r"\1.mlp.fc\2.", k2)
        sd[k2] = v

    # build the inverse map from the forward rules on the fly: enumerate official keys by pattern
    out: Dict[str, torch.Tensor] = {}
    pending_qkv: Dict[str, Dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if not k.startswith("model."):
            continue  # e.g. top-level class_embed / bbox_embed aliases
        official = _hf_to_official_key(k, version)
        if official is None:
            continue
        m = re.match(r"(.*)\.self_attn\.(q_proj|k_proj|v_proj)\.(weight|bias)$", official)
        if m:
            pending_qkv.setdefault(f"{m.group(1)}.self_attn.in_proj_{m.group(3)}", {})[m.group(2)] = v
            continue
        out[official] = v
    for key, parts in pending_qkv.items():
        if set(parts) != set(_ATTN_SPLIT):
            raise KeyError(f"incomplete q/k/v projections for {key}: {sorted(parts)}")
        out[key] = torch.cat([parts[n] for n in _ATTN_SPLIT], dim=0)
    if backbone_num_batches_tracked:
        for k in list(out):
            if k.startswith("backbone.") and k.endswith(".running_mean"):
                out[k[: -len("running_mean")] + "num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    return out


def _hf_to_official_key(k: str, version: str):
    nb = lambda part: "conv" if part == "convolution" else "norm"  # noqa: E731
    m = re.match(r"model\.backbone\.model\.embedder\.embedder\.(\d)\.(convolution|normalization)\.(.*)", k)
    if m:
        return f"backbone.conv1.conv1_{int(m.group(1)) + 1}.{nb(m.group(2))}.{m.group(3)}"
    m = re.match(r"model\.backbone\.model\.encoder\.stages\.(\d+)\.layers\.(\d+)\.(.*)", k)
    if m:
        s, j, rest = m.groups()
        pre = f"backbone.res_layers.{s}.blocks.{j}."
        m2 = re.match(r"layer\.(\d)\.(convolution|normalization)\.(.*)", rest)
        if m2:
            return pre + f"branch2{'abc'[int(m2.group(1))]}.{nb(m2.group(2))}.{m2.group(3)}"
        m2 = re.match(r"shortcut\.1\.(convolution|normalization)\.(.*)", rest)
        if m2:
            return pre + f"short.conv.{nb(m2.group(1))}.{m2.group(2)}"
        m2 = re.match(r"shortcut\.(convolution|normalization)\.(.*)", rest)
        if m2:
            return pre + f"short.{nb(m2.group(1))}.{m2.group(2)}"
        raise KeyError(k)
    m = re.match(r"model\.encoder_input_proj\.(\d+)\.([01])\.(.*)", k)
    if m:
        idx = m.group(2) if version == "v1" else ("conv" if m.group(2) == "0" else "norm")
        return f"encoder.input_proj.{m.group(1)}.{idx}.{m.group(3)}"
    m = re.match(r"model\.encoder\.aifi\.(\d+)\.layers\.(\d+)\.(.*)", k)
    if m:
        i, l, rest = m.groups()
        return f"encoder.encoder.{i}.layers.{l}.{_rename(rest, _ENCODER_LAYER_NAMES, to_transformers=False)}"
    if k.startswith("model.encoder."):
        return k[len("model."):]
    m = re.match(r"model\.decoder_input_proj\.(\d+)\.([01])\.(.*)", k)
    if m:
        return f"decoder.input_proj.{m.group(1)}.{'conv' if m.group(2) == '0' else 'norm'}.{m.group(3)}"
    m = re.match(r"model\.decoder\.layers\.(\d+)\.(.*)", k)
    if m:
        l, rest = m.groups()
        return f"decoder.decoder.layers.{l}.{_rename(rest, _DECODER_LAYER_NAMES, to_transformers=False)}"
    m = re.match(r"model\.decoder\.class_embed\.(\d+)\.(.*)", k)
    if m:
        return f"decoder.dec_score_head.{m.group(1)}.{m.group(2)}"
    m = re.match(r"model\.decoder\.bbox_embed\.(\d+)\.(.*)", k)
    if m:
        return f"decoder.dec_bbox_head.{m.group(1)}.{m.group(2)}"
    if k.startswith("model.decoder.query_pos_head."):
        return k[len("model."):]
    m = re.match(r"model\.enc_output\.([01])\.(.*)", k)
    if m:
        idx = m.group(1) if version == "v1" else ("proj" if m.group(1) == "0" else "norm")
        return f"decoder.enc_output.{idx}.{m.group(2)}"
    for name in ("enc_score_head", "enc_bbox_head", "denoising_class_embed"):
        if k.startswith(f"model.{name}."):
            return "decoder." + k[len("model."):]
    if k.startswith("model.decoder.") and ("class_embed" in k or "bbox_embed" in k):
        return None
    raise KeyError(f"no rtdetr name for transformers key {k!r}")
