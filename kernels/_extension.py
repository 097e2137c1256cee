"""Loading the compiled extension ``rtdetr_kernels._C`` (once), and why it could not be loaded."""

from __future__ import annotations

import functools
import importlib
from typing import List, Optional


@functools.lru_cache(maxsize=None)
def load_extension():
    """Import ``rtdetr_kernels._C`` once; returns the module or None (see ``extension_error``)."""
    try:
        return importlib.import_module("rtdetr_kernels._C")
    except Exception as exc:  # ImportError, or an undefined-symbol OSError from a stale build
        _EXTENSION_ERROR.append(f"{type(exc).__name__}: {exc}")
        return None


_EXTENSION_ERROR: List[str] = []


def extension_error() -> Optional[str]:
    load_extension()
    return _EXTENSION_ERROR[0] if _EXTENSION_ERROR else None


def extension_has_cuda() -> bool:
    ext = load_extension()
    return bool(ext is not None and getattr(ext, "WITH_CUDA", False))
