"""PResNet (ResNet-vd) backbone, module tree and names as lyuwenyu/RT-DETR ``PResNet``."""
from __future__ import annotations

from collections import OrderedDict
from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["FrozenBatchNorm2d", "ConvNormLayer", "BasicBlock", "BottleNeck", "PResNet", "RESNET_DEPTHS"]

RESNET_DEPTHS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}


def _act(name):
    if name is None:
        return nn.Identity()
    name = name.lower()
    if name == "relu":
        return nn.ReLU()
    if name == "silu":
        return nn.SiLU()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"unknown activation {name!r}")


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics/affine parameters held as buffers (no ``num_batches_tracked``)."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, x):
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + self.eps).rsqrt()
        shift = self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale
        return x * scale + shift

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}"


class ConvNormLayer(nn.Module):
    """conv (no bias unless asked, 'same'-style padding (k-1)//2) -> norm -> act."""

    def __init__(self, ch_in, ch_out, kernel_size, stride, padding=None, bias=False, act=None):
        super().__init__()
        pad = (kernel_size - 1) // 2 if padding is None else padding
        self.conv = nn.Conv2d(ch_in, ch_out, kernel_size, stride, padding=pad, bias=bias)
        self.norm = nn.BatchNorm2d(ch_out)
        self.act = _act(act)

    def forward(self, x):
        return self.act(self.norm(self.conv(x)))


def _shortcut(ch_in, ch_out, stride, variant):
    if variant == "d" and stride == 2:
        return nn.Sequential(OrderedDict([
            ("pool", nn.AvgPool2d(2, 2, 0, ceil_mode=True)),
            ("conv", ConvNormLayer(ch_in, ch_out, 1, 1)),
        ]))
    return ConvNormLayer(ch_in, ch_out, 1, stride)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, ch_in, ch_out, stride, shortcut, act="relu", variant="d"):
        super().__init__()
        self.shortcut = shortcut
        if not shortcut:
            self.short = _shortcut(ch_in, ch_out, stride, variant)
        self.branch2a = ConvNormLayer(ch_in, ch_out, 3, stride, act=act)
        self.branch2b = ConvNormLayer(ch_out, ch_out, 3, 1, act=None)
        self.act = _act(act)

    def forward(self, x):
        out = self.branch2b(self.branch2a(x))
        return self.act(out + (x if self.shortcut else self.short(x)))


class BottleNeck(nn.Module):
    expansion = 4

    def __init__(self, ch_in, ch_out, stride, shortcut, act="relu", variant="d"):
        super().__init__()
        s1, s2 = (stride, 1) if variant == "a" else (1, stride)
        self.branch2a = ConvNormLayer(ch_in, ch_out, 1, s1, act=act)
        self.branch2b = ConvNormLayer(ch_out, ch_out, 3, s2, act=act)
        self.branch2c = ConvNormLayer(ch_out, ch_out * self.expansion, 1, 1)
        self.shortcut = shortcut
        if not shortcut:
            self.short = _shortcut(ch_in, ch_out * self.expansion, stride, variant)
        self.act = _act(act)

    def forward(self, x):
        out = self.branch2c(self.branch2b(self.branch2a(x)))
        return self.act(out + (x if self.shortcut else self.short(x)))


class Blocks(nn.Module):
    def __init__(self, block, ch_in, ch_out, count, stage_num, act="relu", variant="d"):
        super().__init__()
        self.blocks = nn.ModuleList()
        for i in range(count):
            self.blocks.append(block(ch_in, ch_out, stride=2 if (i == 0 and stage_num != 2) else 1,
                                     shortcut=(i != 0), act=act, variant=variant))
            if i == 0:
                ch_in = ch_out * block.expansion

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def _freeze_norm(m: nn.Module) -> nn.Module:
    if isinstance(m, nn.BatchNorm2d):
        return FrozenBatchNorm2d(m.num_features, eps=m.eps)
    for name, child in m.named_children():
        new = _freeze_norm(child)
        if new is not child:
            setattr(m, name, new)
    return m


class PResNet(nn.Module):
    def __init__(self, depth: int = 50, variant: str = "d", num_stages: int = 4,
                 return_idx: Sequence[int] = (1, 2, 3), act: str = "relu", freeze_at: int = -1,
                 freeze_norm: bool = True):
        super().__init__()
        if depth not in RESNET_DEPTHS:
            raise ValueError(f"unsupported ResNet depth {depth}; expected one of {sorted(RESNET_DEPTHS)}")
        block_nums = RESNET_DEPTHS[depth]
        ch_in = 64
        if variant in ("c", "d"):
            conv_def = [(3, ch_in // 2, 3, 2, "conv1_1"), (ch_in // 2, ch_in // 2, 3, 1, "conv1_2"),
                        (ch_in // 2, ch_in, 3, 1, "conv1_3")]
        else:
            conv_def = [(3, ch_in, 7, 2, "conv1_1")]
        self.conv1 = nn.Sequential(OrderedDict(
            [(name, ConvNormLayer(ci, co, k, s, act=act)) for ci, co, k, s, name in conv_def]))
        ch_out_list = [64, 128, 256, 512]
        block = BottleNeck if depth >= 50 else BasicBlock
        out_channels = [block.expansion * c for c in ch_out_list]
        out_strides = [4, 8, 16, 32]
        self.res_layers = nn.ModuleList()
        for i in range(num_stages):
            self.res_layers.append(Blocks(block, ch_in, ch_out_list[i], block_nums[i], i + 2, act=act,
                                          variant=variant))
            ch_in = out_channels[i]
        self.return_idx = list(return_idx)
        self.out_channels = [out_channels[i] for i in self.return_idx]
        self.out_strides = [out_strides[i] for i in self.return_idx]
        if freeze_at >= 0:
            for p in self.conv1.parameters():
                p.requires_grad_(False)
            for i in range(min(freeze_at, num_stages)):
                for p in self.res_layers[i].parameters():
                    p.requires_grad_(False)
        if freeze_norm:
            _freeze_norm(self)

    def forward(self, x) -> List[torch.Tensor]:
        x = F.max_pool2d(self.conv1(x), kernel_size=3, stride=2, padding=1)
        outs = []
        for i, stage in enumerate(self.res_layers):
            x = stage(x)
            if i in self.return_idx:
                outs.append(x)
        return outs
