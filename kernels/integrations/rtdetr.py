"""Put the fused MSDA kernel into the reference RT-DETR model (the package ``rtdetr``).

The model's MSDeformableAttention modules call their sampling core through the instance attribute
``ms_deformable_attn_core`` (official signatures: v1 ``(value, spatial_shapes, locations, weights)``,
v2 adds ``(num_points_list, method)``); patching rebinds that attribute, nothing else, so state
dicts, hooks and the rest of the model are untouched, and ``revert()`` restores the originals.
"""

from __future__ import annotations

import functools
from typing import Callable, List, Optional, Tuple

from torch import nn

from . import dropin

_ATTR = "ms_deformable_attn_core"


class Patch:
    """What ``apply_to_rtdetr`` changed; ``revert()`` puts the originals back."""

    def __init__(self, replaced: List[Tuple[nn.Module, Callable]]):
        self.replaced = replaced

    def __len__(self) -> int:
        return len(self.replaced)

    def revert(self) -> None:
        for module, original in self.replaced:
            setattr(module, _ATTR, original)
        self.replaced = []


def apply_to_rtdetr(model: nn.Module, backend: Optional[str] = None, discrete_clamp: Optional[str] = None) -> Patch:
    """Swap every MSDA sampling core of ``model`` for ``rtdetr_kernels.ms_deform_attn``.

    v2 modules (they have the ``num_points_scale`` buffer) keep their sampling ``method`` ('default' or
    'discrete'). ``discrete_clamp`` is how discrete sampling clamps x: None takes the module's own
    ``discrete_clamp`` attribute (the reference model in ``rtdetr`` declares 'per_axis') and falls back
    to 'official', upstream's clamp of both coordinates to H-1, so a patched upstream model is unchanged.
    """
    replaced = []
    for module in model.modules():
        original = getattr(module, _ATTR, None)
        if original is None:
            continue
        if hasattr(module, "num_points_scale"):  # RT-DETRv2's module (v1 has no such buffer)
            method = getattr(module, "method", None) or getattr(original, "keywords", {}).get("method", "default")
            clamp = discrete_clamp or getattr(module, "discrete_clamp", "official")
            core = functools.partial(dropin.deformable_attention_core_func_v2, method=method, discrete_clamp=clamp)
        else:
            core = dropin.deformable_attention_core_func
        if backend is not None:
            core = functools.partial(_with_backend, core, backend)
        replaced.append((module, original))
        setattr(module, _ATTR, core)
    if not replaced:
        raise ValueError(f"model: found no module with a `{_ATTR}` attribute; is this an rtdetr model?")
    return Patch(replaced)


def _with_backend(core, backend, *args, **kwargs):
    from ..backends import use_backend

    with use_backend(backend):
        return core(*args, **kwargs)
