"""HybridEncoder: input projection, AIFI (intra-scale transformer on S5) and CCFM (CSPRep/RepVGG fusion)."""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbone import ConvNormLayer, _act

__all__ = ["RepVggBlock", "CSPRepLayer", "TransformerEncoderLayer", "TransformerEncoder", "HybridEncoder",
           "build_2d_sincos_position_embedding"]


def build_2d_sincos_position_embedding(w: int, h: int, embed_dim: int = 256,
                                       temperature: float = 10000.0) -> torch.Tensor:
    """Official RT-DETR 2D sin-cos embedding, reproduced literally -> [1, w*h, embed_dim] (float32).

    The grid is ``meshgrid(arange(w), arange(h), indexing='ij')`` flattened, i.e. w-major, while the
    tokens it is added to are flattened row-major (y*W + x).  For square maps this equals the usual
    [sin y, cos y, sin x, cos x] embedding; for H != W it is the official (transposed) layout.
    """
    if embed_dim % 4 != 0:
        raise ValueError("embed_dim must be divisible by 4 for the 2D sin-cos position embedding")
    gw, gh = torch.meshgrid(torch.arange(int(w), dtype=torch.float32),
                            torch.arange(int(h), dtype=torch.float32), indexing="ij")
    pos_dim = embed_dim // 4
    omega = 1.0 / (temperature ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim))
    out_w = gw.flatten()[:, None] @ omega[None]
    out_h = gh.flatten()[:, None] @ omega[None]
    return torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)[None]


class RepVggBlock(nn.Module):
    """act(BN(conv3x3(x)) + BN(conv1x1(x))); ``convert_to_deploy`` fuses both into ``self.conv``."""

    def __init__(self, ch_in, ch_out, act="relu"):
        super().__init__()
        self.ch_in, self.ch_out = ch_in, ch_out
        self.conv1 = ConvNormLayer(ch_in, ch_out, 3, 1, padding=1, act=None)
        self.conv2 = ConvNormLayer(ch_in, ch_out, 1, 1, padding=0, act=None)
        self.act = _act(act)

    def forward(self, x):
        if hasattr(self, "conv"):
            y = self.conv(x)
        else:
            y = self.conv1(x) + self.conv2(x)
        return self.act(y)

    @staticmethod
    def _fuse_bn(branch: ConvNormLayer):
        bn = branch.norm
        std = (bn.running_var + bn.eps).sqrt()
        t = (bn.weight / std).reshape(-1, 1, 1, 1)
        return branch.conv.weight * t, bn.bias - bn.running_mean * bn.weight / std

    def get_equivalent_kernel_bias(self):
        k3, b3 = self._fuse_bn(self.conv1)
        k1, b1 = self._fuse_bn(self.conv2)
        return k3 + F.pad(k1, [1, 1, 1, 1]), b3 + b1

    @torch.no_grad()
    def convert_to_deploy(self):
        k, b = self.get_equivalent_kernel_bias()
        if not hasattr(self, "conv"):
            self.conv = nn.Conv2d(self.ch_in, self.ch_out, 3, 1, padding=1).to(device=k.device, dtype=k.dtype)
        self.conv.weight.data = k.detach().clone()
        self.conv.bias.data = b.detach().clone()


class CSPRepLayer(nn.Module):
    def __init__(self, in_channels, out_channels, num_blocks=3, expansion=1.0, bias=False, act="silu"):
        super().__init__()
        hidden = int(out_channels * expansion)
        self.conv1 = ConvNormLayer(in_channels, hidden, 1, 1, bias=bias, act=act)
        self.conv2 = ConvNormLayer(in_channels, hidden, 1, 1, bias=bias, act=act)
        self.bottlenecks = nn.Sequential(*[RepVggBlock(hidden, hidden, act=act) for _ in range(num_blocks)])
        if hidden != out_channels:
            self.conv3 = ConvNormLayer(hidden, out_channels, 1, 1, bias=bias, act=act)
        else:
            self.conv3 = nn.Identity()

    def forward(self, x):
        return self.conv3(self.bottlenecks(self.conv1(x)) + self.conv2(x))


class TransformerEncoderLayer(nn.Module):
    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, activation="relu",
                 normalize_before=False):
        super().__init__()
        self.normalize_before = normalize_before
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = _act(activation)

    def forward(self, src, src_mask=None, pos_embed=None):
        residual = src
        if self.normalize_before:
            src = self.norm1(src)
        q = k = src if pos_embed is None else src + pos_embed
        src, _ = self.self_attn(q, k, value=src, attn_mask=src_mask, need_weights=False)
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


class TransformerEncoder(nn.Module):
    def __init__(self, encoder_layer, num_layers, norm=None):
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(encoder_layer) for _ in range(num_layers)])
        self.num_layers = num_layers
        self.norm = norm

    def forward(self, src, src_mask=None, pos_embed=None):
        for layer in self.layers:
            src = layer(src, src_mask=src_mask, pos_embed=pos_embed)
        return self.norm(src) if self.norm is not None else src


class HybridEncoder(nn.Module):
    """Position embeddings are computed per input size (official behaviour with ``eval_spatial_size: ~``)
    and cached per (h, w), so any input size that is a multiple of the largest stride works."""

    def __init__(self, in_channels=(512, 1024, 2048), feat_strides=(8, 16, 32), hidden_dim=256, nhead=8,
                 dim_feedforward=1024, dropout=0.0, enc_act="gelu", use_encoder_idx=(2,), num_encoder_layers=1,
                 pe_temperature=10000, expansion=1.0, depth_mult=1.0, act="silu", version="v1"):
        super().__init__()
        self.in_channels = list(in_channels)
        self.feat_strides = list(feat_strides)
        self.hidden_dim = hidden_dim
        self.use_encoder_idx = list(use_encoder_idx)
        self.num_encoder_layers = num_encoder_layers
        self.pe_temperature = pe_temperature
        self.out_channels = [hidden_dim] * len(self.in_channels)
        self.out_strides = self.feat_strides
        self._pe_cache: Dict[Tuple[int, int], torch.Tensor] = {}

        self.input_proj = nn.ModuleList()
        for c in self.in_channels:
            if version == "v1":
                proj = nn.Sequential(nn.Conv2d(c, hidden_dim, 1, bias=False), nn.BatchNorm2d(hidden_dim))
            elif version == "v2":
                proj = nn.Sequential(OrderedDict([("conv", nn.Conv2d(c, hidden_dim, 1, bias=False)),
                                                  ("norm", nn.BatchNorm2d(hidden_dim))]))
            else:
                raise ValueError(f"unknown encoder version {version!r}")
            self.input_proj.append(proj)

        layer = TransformerEncoderLayer(hidden_dim, nhead=nhead, dim_feedforward=dim_feedforward,
                                        dropout=dropout, activation=enc_act)
        self.encoder = nn.ModuleList([TransformerEncoder(copy.deepcopy(layer), num_encoder_layers)
                                      for _ in self.use_encoder_idx])

        n_blocks = round(3 * depth_mult)
        self.lateral_convs = nn.ModuleList()
        self.fpn_blocks = nn.ModuleList()
        for _ in range(len(self.in_channels) - 1, 0, -1):
            self.lateral_convs.append(ConvNormLayer(hidden_dim, hidden_dim, 1, 1, act=act))
            self.fpn_blocks.append(CSPRepLayer(hidden_dim * 2, hidden_dim, n_blocks, act=act, expansion=expansion))
        self.downsample_convs = nn.ModuleList()
        self.pan_blocks = nn.ModuleList()
        for _ in range(len(self.in_channels) - 1):
            self.downsample_convs.append(ConvNormLayer(hidden_dim, hidden_dim, 3, 2, act=act))
            self.pan_blocks.append(CSPRepLayer(hidden_dim * 2, hidden_dim, n_blocks, act=act, expansion=expansion))

    def position_embedding(self, h: int, w: int) -> torch.Tensor:
        key = (int(h), int(w))
        pe = self._pe_cache.get(key)
        if pe is None:
            pe = build_2d_sincos_position_embedding(w, h, self.hidden_dim, self.pe_temperature)
            self._pe_cache[key] = pe
        return pe

    def forward(self, feats: List[torch.Tensor]) -> List[torch.Tensor]:
        if len(feats) != len(self.in_channels):
            raise ValueError(f"HybridEncoder expects {len(self.in_channels)} feature maps, got {len(feats)}")
        proj = [self.input_proj[i](f) for i, f in enumerate(feats)]
        if self.num_encoder_layers > 0:
            for i, idx in enumerate(self.use_encoder_idx):
                h, w = proj[idx].shape[2:]
                src = proj[idx].flatten(2).permute(0, 2, 1)
                pos = self.position_embedding(h, w).to(device=src.device, dtype=src.dtype)
                mem = self.encoder[i](src, pos_embed=pos)
                proj[idx] = mem.permute(0, 2, 1).reshape(-1, self.hidden_dim, h, w).contiguous()

        n = len(self.in_channels)
        inner = [proj[-1]]
        for idx in range(n - 1, 0, -1):
            j = n - 1 - idx
            high = self.lateral_convs[j](inner[0])
            inner[0] = high
            up = F.interpolate(high, scale_factor=2.0, mode="nearest")
            inner.insert(0, self.fpn_blocks[j](torch.cat([up, proj[idx - 1]], dim=1)))
        outs = [inner[0]]
        for idx in range(n - 1):
            down = self.downsample_convs[idx](outs[-1])
            outs.append(self.pan_blocks[idx](torch.cat([down, inner[idx + 1]], dim=1)))
        return outs
