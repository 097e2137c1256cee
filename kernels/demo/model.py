"""The demo's model configurations.

``tiny`` (the default) is ``rtdetr_r18vd`` as :func:`rtdetr.build_model` wires it (the same PResNet-18-vd backbone
with trainable BatchNorm, strides 8/16/32, hybrid encoder with one AIFI layer on S5, v1 deformable decoder with
3 levels x 4 points, 8 heads), made narrow enough to train in a couple of minutes on two CPU cores: transformer
width 64, 2 decoder layers, 30 queries, 20 denoising queries.  ``build_model`` hard-codes width 256, 300 queries
and 100 denoising queries (at 64x64 inputs there are only 84 memory tokens), so the three modules are built here
directly.  Any :data:`rtdetr.CONFIGS` name (``rtdetr_r18vd`` ... ``rtdetrv2_r101vd``) is accepted as well and
built by ``build_model`` itself (for ``--checkpoint``: the official 80-class COCO models).
"""
from __future__ import annotations

from typing import Any, Dict

import rtdetr
from rtdetr.backbone import PResNet
from rtdetr.decoder import RTDETRTransformer
from rtdetr.encoder import HybridEncoder

SMALL_CONFIGS: Dict[str, Dict[str, Any]] = {
    "tiny": dict(base="rtdetr_r18vd", hidden_dim=64, dim_feedforward=256, num_queries=30, num_layers=2,
                 num_denoising=20),
    "small": dict(base="rtdetr_r18vd", hidden_dim=128, dim_feedforward=512, num_queries=50, num_layers=3,
                  num_denoising=40),
}


def config_names():
    return sorted(SMALL_CONFIGS) + sorted(rtdetr.CONFIGS)


def build(name: str, num_classes: int) -> rtdetr.RTDETR:
    if name in rtdetr.CONFIGS:
        return rtdetr.build_model(name, num_classes=num_classes)
    if name not in SMALL_CONFIGS:
        raise ValueError(f"unknown config {name!r}; available: {', '.join(config_names())}")
    c = SMALL_CONFIGS[name]
    cfg = rtdetr.CONFIGS[c["base"]]
    d = c["hidden_dim"]
    backbone = PResNet(depth=cfg["depth"], variant="d", num_stages=4, return_idx=[1, 2, 3],
                       freeze_at=cfg["freeze_at"], freeze_norm=cfg["freeze_norm"])
    encoder = HybridEncoder(in_channels=cfg["in_channels"], feat_strides=[8, 16, 32], hidden_dim=d, nhead=8,
                            dim_feedforward=c["dim_feedforward"], dropout=0.0, enc_act="gelu", use_encoder_idx=[2],
                            num_encoder_layers=1, pe_temperature=10000, expansion=cfg["expansion"], depth_mult=1.0,
                            act="silu", version="v1")
    decoder = RTDETRTransformer(num_classes=num_classes, hidden_dim=d, num_queries=c["num_queries"],
                                feat_channels=[d] * 3, feat_strides=[8, 16, 32], num_levels=3, nhead=8,
                                num_layers=c["num_layers"], dim_feedforward=c["dim_feedforward"], dropout=0.0,
                                activation="relu", num_denoising=c["num_denoising"], label_noise_ratio=0.5,
                                box_noise_scale=1.0, eval_idx=-1, version="v1", num_points=4)
    model = rtdetr.RTDETR(backbone, encoder, decoder)
    model.config_name = name
    return model
