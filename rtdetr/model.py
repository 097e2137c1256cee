"""RT-DETR top level: model, post-processor, config registry, checkpoint loading."""
from __future__ import annotations

import copy
import os
from typing import Any, Dict, List, Mapping, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from .backbone import PResNet
from .decoder import RTDETRTransformer
from .encoder import HybridEncoder

__all__ = ["RTDETR", "RTDETRPostProcessor", "CONFIGS", "build_model", "load_checkpoint", "extract_state_dict",
           "MSCOCO_CATEGORY_IDS"]


class RTDETR(nn.Module):
    """backbone -> HybridEncoder -> RTDETRTransformer.  Input: [N, 3, H, W] in [0, 1], H and W multiples of 32.
    Eval output: {"pred_logits": [N, 300, C], "pred_boxes": [N, 300, 4] (cxcywh, normalised)}."""

    def __init__(self, backbone: nn.Module, encoder: nn.Module, decoder: nn.Module, in_channels: int = 3,
                 size_divisor: int = 32):
        super().__init__()
        # assignment order (backbone, decoder, encoder) fixes the official state-dict order
        self.backbone = backbone
        self.decoder = decoder
        self.encoder = encoder
        self.in_channels = in_channels
        self.size_divisor = size_divisor

    def _check_input(self, x: torch.Tensor):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"expected input of shape [N, {self.in_channels}, H, W], got {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels (RGB), got {x.shape[1]} "
                             f"(input shape {tuple(x.shape)})")
        h, w = x.shape[-2:]
        if h % self.size_divisor or w % self.size_divisor or h == 0 or w == 0:
            raise ValueError(f"input height and width must be positive multiples of {self.size_divisor}, "
                             f"got size {h}x{w}")

    def forward(self, x: torch.Tensor, targets: Optional[List[Dict[str, torch.Tensor]]] = None):
        self._check_input(x)
        feats = self.backbone(x)
        feats = self.encoder(feats)
        return self.decoder(feats, targets)

    def deploy(self):
        """Fuse every RepVGG block into a single 3x3 conv (official ``convert_to_deploy``); eval mode.
        Load checkpoints *before* calling this."""
        self.eval()
        for m in self.modules():
            if hasattr(m, "convert_to_deploy"):
                m.convert_to_deploy()
        return self


MSCOCO_CATEGORY_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


class RTDETRPostProcessor(nn.Module):
    """sigmoid -> top-k over (query x class) -> boxes cxcywh->xyxy scaled by ``orig_target_sizes`` = [[w, h]]."""

    def __init__(self, num_classes=80, use_focal_loss=True, num_top_queries=300, remap_mscoco_category=False):
        super().__init__()
        self.num_classes = num_classes
        self.use_focal_loss = use_focal_loss
        self.num_top_queries = num_top_queries
        self.remap_mscoco_category = remap_mscoco_category
        self.deploy_mode = False

    def forward(self, outputs, orig_target_sizes: torch.Tensor):
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        bbox = torchvision.ops.box_convert(boxes, in_fmt="cxcywh", out_fmt="xyxy")
        bbox = bbox * orig_target_sizes.repeat(1, 2).unsqueeze(1).to(bbox.dtype)
        if self.use_focal_loss:
            scores = torch.sigmoid(logits)
            scores, index = torch.topk(scores.flatten(1), self.num_top_queries, dim=-1)
            labels = index % self.num_classes
            index = index // self.num_classes
            boxes = bbox.gather(1, index.unsqueeze(-1).expand(-1, -1, bbox.shape[-1]))
        else:
            scores = F.softmax(logits, dim=-1)[:, :, :-1]
            scores, labels = scores.max(-1)
            boxes = bbox
            if scores.shape[1] > self.num_top_queries:
                scores, index = torch.topk(scores, self.num_top_queries, dim=-1)
                labels = labels.gather(1, index)
                boxes = boxes.gather(1, index.unsqueeze(-1).expand(-1, -1, boxes.shape[-1]))
        if self.deploy_mode:
            return labels, boxes, scores
        if self.remap_mscoco_category:
            lut = torch.tensor(MSCOCO_CATEGORY_IDS, device=labels.device)
            labels = lut[labels]
        return [dict(labels=l, boxes=b, scores=s) for l, b, s in zip(labels, boxes, scores)]

    def deploy(self):
        self.eval()
        self.deploy_mode = True
        return self


# --------------------------------------------------------------------------------------------- configs
_BASE = dict(depth=50, freeze_norm=True, freeze_at=0, in_channels=[512, 1024, 2048], hidden_dim=256,
             dim_feedforward=1024, expansion=1.0, feat_channels=[256, 256, 256], num_layers=6, eval_idx=-1)
_V1 = {
    "rtdetr_r18vd": dict(depth=18, freeze_norm=False, freeze_at=-1, in_channels=[128, 256, 512], expansion=0.5,
                         num_layers=3),
    "rtdetr_r34vd": dict(depth=34, freeze_norm=False, freeze_at=-1, in_channels=[128, 256, 512], expansion=0.5,
                         num_layers=4),
    "rtdetr_r50vd_m": dict(expansion=0.5, eval_idx=2),
    "rtdetr_r50vd": dict(),
    "rtdetr_r101vd": dict(depth=101, hidden_dim=384, dim_feedforward=2048, feat_channels=[384, 384, 384]),
}
CONFIGS: Dict[str, Dict[str, Any]] = {}
for _name, _over in _V1.items():
    CONFIGS[_name] = {**_BASE, **_over, "version": "v1"}
    CONFIGS[_name.replace("rtdetr_", "rtdetrv2_")] = {**_BASE, **_over, "version": "v2", "num_points": [4, 4, 4],
                                                      "cross_attn_method": "default",
                                                      "query_select_method": "default"}


def build_model(name: str, num_classes: int = 80, **overrides) -> RTDETR:
    """Build a model by config name: ``rtdetr_r18vd``, ``rtdetr_r34vd``, ``rtdetr_r50vd_m``, ``rtdetr_r50vd``,
    ``rtdetr_r101vd`` (v1) and the same names with ``rtdetrv2_`` (v2 decoder; overrides such as
    ``num_points=[4, 4, 2]`` or ``cross_attn_method='discrete'`` are accepted)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown RT-DETR config {name!r}; available: {sorted(CONFIGS)}")
    cfg = {**CONFIGS[name], **overrides}
    version = cfg["version"]
    backbone = PResNet(depth=cfg["depth"], variant="d", num_stages=4, return_idx=[1, 2, 3],
                       freeze_at=cfg["freeze_at"], freeze_norm=cfg["freeze_norm"])
    encoder = HybridEncoder(in_channels=cfg["in_channels"], feat_strides=[8, 16, 32], hidden_dim=cfg["hidden_dim"],
                            nhead=8, dim_feedforward=cfg["dim_feedforward"], dropout=0.0, enc_act="gelu",
                            use_encoder_idx=[2], num_encoder_layers=1, pe_temperature=10000,
                            expansion=cfg["expansion"], depth_mult=1.0, act="silu", version=version)
    dec_kwargs = dict(num_classes=num_classes, hidden_dim=256, num_queries=300, feat_channels=cfg["feat_channels"],
                      feat_strides=[8, 16, 32], num_levels=3, nhead=8, num_layers=cfg["num_layers"],
                      dim_feedforward=1024, dropout=0.0, activation="relu", num_denoising=100,
                      label_noise_ratio=0.5, box_noise_scale=1.0, eval_idx=cfg["eval_idx"], version=version,
                      num_points=cfg.get("num_points", 4))
    if version == "v2":
        dec_kwargs.update(cross_attn_method=cfg.get("cross_attn_method", "default"),
                          query_select_method=cfg.get("query_select_method", "default"))
    decoder = RTDETRTransformer(**dec_kwargs)
    model = RTDETR(backbone, encoder, decoder)
    model.config_name = name
    return model


# --------------------------------------------------------------------------------------------- checkpoints
def extract_state_dict(obj: Union[str, os.PathLike, Mapping[str, Any]]) -> Dict[str, torch.Tensor]:
    """Accepts a path or a loaded object: ``{"ema": {"module": sd}}``, ``{"model": sd}`` or a bare state dict."""
    if isinstance(obj, (str, os.PathLike)):
        obj = torch.load(os.fspath(obj), map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping):
        raise TypeError(f"checkpoint must be a mapping, got {type(obj).__name__}")
    if "ema" in obj and isinstance(obj["ema"], Mapping) and "module" in obj["ema"]:
        obj = obj["ema"]["module"]
    elif "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    sd = dict(obj)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _list(keys, limit=20):
    keys = sorted(keys)
    s = ", ".join(keys[:limit])
    return s + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_checkpoint(model: nn.Module, path_or_state_dict, strict: bool = True):
    """Load an official RT-DETR checkpoint (EMA weights preferred) strictly.
    ``num_batches_tracked`` entries are ignored for FrozenBatchNorm2d layers (as the official code does).
    Raises ``RuntimeError`` listing missing / unexpected keys and shape mismatches."""
    sd = extract_state_dict(path_or_state_dict)
    own = model.state_dict()
    # fused RepVGG convs (``...bottlenecks.N.conv``) only exist after deploy(); they are derived, not loaded
    # ``num_batches_tracked`` is a training counter with no effect on the forward pass; a checkpoint without
    # it (e.g. converted from transformers) keeps the model's current value
    missing = [k for k in own if k not in sd and not _is_deploy_key(k) and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own and not (k.endswith("num_batches_tracked")
                                                            and k.rsplit(".", 1)[0] + ".running_mean" in own)]
    mismatched = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sd if k in own and tuple(sd[k].shape) != tuple(own[k].shape)]
    if strict and (missing or unexpected or mismatched):
        msg = ["checkpoint does not match the model"]
        if missing:
            msg.append(f"missing keys ({len(missing)}): {_list(missing)}")
        if unexpected:
            msg.append(f"unexpected keys ({len(unexpected)}): {_list(unexpected)}")
        if mismatched:
            msg.append(f"shape mismatches ({len(mismatched)}): {'; '.join(mismatched[:20])}")
        raise RuntimeError("\n".join(msg))
    result = model.load_state_dict(sd, strict=False)
    if any(_is_deploy_key(k) for k in own):  # already deployed: refresh the fused kernels
        for m in model.modules():
            if hasattr(m, "convert_to_deploy") and hasattr(m, "conv"):
                m.convert_to_deploy()
    return result


def _is_deploy_key(k: str) -> bool:
    parts = k.split(".")
    return len(parts) >= 2 and parts[-2] == "conv" and "bottlenecks" in parts and parts[-3].isdigit()
