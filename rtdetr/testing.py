"""Helpers for tests and parity checks (not needed for inference)."""
from __future__ import annotations

import torch

__all__ = ["randomize_"]


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0, score_scale: float = 1.0) -> torch.nn.Module:
    """Fill every floating-point parameter/buffer with deterministic, non-trivial random values:
    weights ~ N(0, 1/fan_in), biases ~ N(0, 1), BN/LN scales and running_var in [0.75, 1.25].
    ``score_scale`` multiplies the encoder/decoder class heads (larger -> fewer near-ties in top-k)."""
    g = torch.Generator().manual_seed(seed)
    for name, t in model.state_dict().items():
        if not t.is_floating_point() or name in ("decoder.anchors",) or name.endswith("num_points_scale"):
            continue
        if name.endswith("running_var") or (t.dim() == 1 and "norm" in name and name.endswith("weight")):
            val = torch.rand(t.shape, generator=g, dtype=torch.float64) * 0.5 + 0.75
        elif t.dim() > 1:
            val = torch.randn(t.shape, generator=g, dtype=torch.float64) / max(1, t[0].numel()) ** 0.5
        else:
            val = torch.randn(t.shape, generator=g, dtype=torch.float64) * 0.5
        if "score_head" in name:
            val = val * score_scale
        t.copy_(val.to(t.dtype))
    return model
