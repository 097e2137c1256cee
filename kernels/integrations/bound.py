"""Method patches bound to one instance, shared by the transformers, ultralytics and rfdetr families.

``swap(kind, where, obj, attr, fn, backend, how)`` rebinds ``obj.attr`` (``forward`` or another
method) on the instance to a ``BoundPatch`` calling ``fn(obj, patch, *args, **kwargs)``, where
``patch.original(...)`` runs what was there before (for the calls the op cannot serve) and
``patch.backend`` is the pinned backend. Unlike a closure or ``types.MethodType``:

- ``copy.deepcopy`` of a patched model (ultralytics' EMA makes one) yields a copy patched the same way,
  bound to the copy (a closure would keep calling the original's modules);
- pickling (``torch.save(model)``) stores the original method instead, so a checkpoint never needs
  rtdetr_kernels to load (a closure cannot be pickled at all);
- patching an already patched instance (a copy's, whose handle does not travel) replaces the
  BoundPatch instead of stacking a second one on it.
"""

from __future__ import annotations

import copy
from typing import Callable, Optional

from torch import nn

from .patch import Replacement

_MARK = "_rtdetr_kernels_patched"


class BoundPatch:
    """A patched method of one instance (a module, or any object: transformers' image processors):
    ``fn(obj, patch, *args, **kwargs)``.

    ``original`` is the method that was there (the class's function unless the instance held its own),
    called for what the op cannot serve. ``cache`` is the patch's own scratch (transformers' packed
    attention weights), never copied or pickled. Deep copies rebind to the copied instance (the memo maps
    it); pickling reduces to ``getattr(obj, attr)`` on load, i.e. the class's method, so the patch is not
    saved with the model."""

    __slots__ = ("fn", "obj", "attr", "own", "backend", "cache", _MARK)

    def __init__(self, fn: Callable, obj, attr: str, own, backend: Optional[str]):
        self.fn = fn
        self.obj = obj
        self.attr = attr
        self.own = own  # the instance's own attribute that was replaced, or None (the class's method)
        self.backend = backend
        self.cache = None
        setattr(self, _MARK, True)

    def original(self, *args, **kwargs):
        if self.own is not None:
            return self.own(*args, **kwargs)
        return getattr(type(self.obj), self.attr)(self.obj, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        return self.fn(self.obj, self, *args, **kwargs)

    def __deepcopy__(self, memo):
        obj = copy.deepcopy(self.obj, memo)
        own = copy.deepcopy(self.own, memo) if self.own is not None else None
        return BoundPatch(self.fn, obj, self.attr, own, self.backend)

    def __reduce__(self):
        return (getattr, (self.obj, self.attr)) if self.own is None else (_identity, (self.own,))


def _identity(x):  # pickles an instance's own callable as itself
    return x


def swap(kind: str, where: str, obj, attr: str, fn: Callable, backend: Optional[str],
         how: str, detail: str = "") -> Replacement:
    """Rebind ``obj.attr`` to ``BoundPatch(fn, ...)`` on the instance; the Replacement's undo puts back
    what was there before any patch. A BoundPatch already there (a deep copy of a patched model, whose
    handle does not travel with it) is replaced, not wrapped, so patching never stacks."""
    had = attr in obj.__dict__
    own = obj.__dict__.get(attr)
    if getattr(own, _MARK, False):
        own = own.own
        had = own is not None

    def undo():
        if had:
            object.__setattr__(obj, attr, own)
        elif attr in obj.__dict__:
            object.__delattr__(obj, attr)

    object.__setattr__(obj, attr, BoundPatch(fn, obj, attr, own, backend))
    return Replacement(kind, where, type(obj).__name__, how, undo, detail)


def backend_kw(backend: Optional[str]) -> dict:
    return {} if backend is None else {"backend": backend}
