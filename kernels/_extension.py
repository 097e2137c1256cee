"""Loading the compiled extension ``rtdetr_kernels._C`` (once), and why it could not be loaded.

An extension is only usable with the torch it was built against (C++ ABI, dispatcher, CUDA
version). setup.py records that torch twice: in ``_build_info.json`` next to the extension, read
before anything is loaded (so a mismatched build is never even imported, and the package warns at
import), and as ``_C.TORCH_VERSION``, checked after the import where the file is missing. A
mismatched extension is refused with a message naming both versions; the cpu and cuda backends
then say it is unavailable, and the ops fall back to Triton or the reference.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import os
import warnings
from typing import List, Optional

import torch

BUILD_INFO = "_build_info.json"  # written by setup.py next to the extension
REBUILD = "pip install --no-build-isolation ."


def _torch_build(version: Optional[str], cuda: Optional[str]) -> str:
    return f"torch {version} (CUDA {cuda})" if cuda else f"torch {version} (no CUDA)"


def version_mismatch(built_torch: Optional[str], built_cuda: Optional[str] = None, *, check_cuda: bool = True,
                     running_torch: Optional[str] = None, running_cuda: Optional[str] = None) -> Optional[str]:
    """Why an extension built against ``built_torch`` (and torch's CUDA ``built_cuda``) cannot be
    used with the running torch, or None when it can (or when the build did not say)."""
    running_torch = torch.__version__ if running_torch is None else running_torch
    running_cuda = torch.version.cuda if running_cuda is None else running_cuda
    if not built_torch:
        return None
    if built_torch == running_torch and (not check_cuda or (built_cuda or None) == (running_cuda or None)):
        return None
    built = _torch_build(built_torch, built_cuda) if check_cuda else f"torch {built_torch}"
    running = _torch_build(running_torch, running_cuda) if check_cuda else f"torch {running_torch}"
    return (f"rtdetr_kernels._C was built against {built} but {running} is installed, so it is not used "
            f"(the ops fall back to Triton or the reference); rebuild it with this torch: {REBUILD}")


def build_info() -> Optional[dict]:
    """What setup.py recorded about the extension next to it (torch, torch_cuda, with_cuda,
    cuda_archs, python), or None when there is no extension or no record."""
    try:
        spec = importlib.util.find_spec("rtdetr_kernels._C")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    try:
        with open(os.path.join(os.path.dirname(spec.origin), BUILD_INFO)) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _recorded_mismatch() -> Optional[str]:
    info = build_info()
    if info is None:
        return None
    return version_mismatch(info.get("torch"), info.get("torch_cuda"))


_EXTENSION_ERROR: List[str] = []
_WARNED: List[str] = []


def _warn(message: str) -> None:
    if message not in _WARNED:
        _WARNED.append(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)


@functools.lru_cache(maxsize=None)
def load_extension():
    """Import ``rtdetr_kernels._C`` once; returns the module or None (see ``extension_error``)."""
    mismatch = _recorded_mismatch()
    if mismatch is not None:  # never load it: a module built against another torch may not even link
        _EXTENSION_ERROR.append(mismatch)
        return None
    try:
        ext = importlib.import_module("rtdetr_kernels._C")
    except Exception as exc:  # ImportError, or an undefined-symbol OSError from a stale build
        _EXTENSION_ERROR.append(f"{type(exc).__name__}: {exc}")
        return None
    # no record next to it (copied by hand?): the version compiled in (torch's own version string only)
    mismatch = version_mismatch(getattr(ext, "TORCH_VERSION", None), check_cuda=False)
    if mismatch is not None:
        _EXTENSION_ERROR.append(mismatch)
        _warn(mismatch)
        return None
    return ext


def extension_error() -> Optional[str]:
    load_extension()
    return _EXTENSION_ERROR[0] if _EXTENSION_ERROR else None


def extension_has_cuda() -> bool:
    ext = load_extension()
    return bool(ext is not None and getattr(ext, "WITH_CUDA", False))


# At import of the package (backends imports this module): say so at once when the extension next to
# it was built against another torch (reading the record only; the extension is loaded on first use).
_mismatch_at_import = _recorded_mismatch()
if _mismatch_at_import is not None:
    _warn(_mismatch_at_import)
