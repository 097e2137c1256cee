"""``rtdetr_kernels.patch(model)``: put the kernels into a model from a codebase people already use.

One entry point for every family (our ``rtdetr`` and the official lyuwenyu/RT-DETR modules,
transformers, ultralytics, rfdetr). Each family is a ``Family`` record in its own module of this
package; ``patch`` asks every family to patch the modules of ``model`` it recognises (a model may
mix families: an rfdetr model holds transformers classes), collects what they replaced and returns
one ``PatchHandle``.

Rules every family follows:

- Per instance: it rebinds attributes or methods of the model's own module instances (forward swap,
  attribute rebind, method rebind, or a swap of a parameter-free child). Parameters, buffers and
  state-dict keys are never touched; other models in the process are unchanged. A family that has
  to rebind a module-level function of a codebase records it as a ``Replacement`` with
  ``how="global rebind"`` (the report says so) and restores it on ``revert()``.
- Each ``Replacement`` carries its own undo, so ``revert()`` restores exactly what was there.
- Patched code calls the public ops (``rtdetr_kernels.ms_deform_attn``, ``aifi_attention``,
  ``topk_select`` / ``topk_select_flat``), so whichever backend serves the call (the reference
  included) is used; ``backend=`` pins one for the patched calls.
- Where a patched call meets something the op cannot do (attention dropout in training,
  ``output_attentions``), the patched code calls the original and the family says so in its docs.
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence

from torch import nn

KINDS = ("msda", "attention", "topk")
_HANDLE_ATTR = "_rtdetr_kernels_patch"


@dataclass
class Replacement:
    """One thing a family replaced.

    kind: one of ``KINDS`` (query selection and the post-processor are both ``topk``).
    where: the module's qualified name in the model ('' for the model itself), or the rebound
        function's dotted path for a global rebind.
    cls: the patched module's class name (or the function's name).
    how: 'attribute rebind', 'forward swap', 'method rebind', 'child swap' or 'global rebind'.
    undo: puts the original back.
    detail: optional words for the report (e.g. "enc_bbox_head after the gather").
    """

    kind: str
    where: str
    cls: str
    how: str
    undo: Callable[[], None]
    detail: str = ""


@dataclass(frozen=True)
class Family:
    """A codebase ``patch`` knows.

    apply(model, kinds, backend) patches the modules of ``model`` this family recognises, for the
    kinds asked for, and returns what it replaced (an empty list when it recognises nothing). It must
    leave nothing half-patched when it raises.
    """

    name: str  # e.g. "transformers"
    covers: str  # the classes it patches, for the error message and docs
    apply: Callable[[nn.Module, frozenset, Optional[str]], List[Replacement]]
    # optional: maps a codebase's wrapper object (e.g. ``ultralytics.RTDETR``, whose ``.model`` is the
    # network) to the nn.Module to patch, or returns None. ``patch`` then works on (and records its
    # handle on) that module, so patching the wrapper and its module are the same call.
    unwrap: Optional[Callable[[object], Optional[nn.Module]]] = None


_FAMILIES: List[Family] = []


def register_family(family: Family) -> Family:
    if any(f.name == family.name for f in _FAMILIES):
        raise ValueError(f"family {family.name!r} is registered already")
    _FAMILIES.append(family)
    return family


def families() -> List[Family]:
    _load_families()
    return list(_FAMILIES)


@functools.lru_cache(maxsize=None)
def _load_families() -> None:
    # Each family module registers itself on import; none imports its codebase until it is asked to
    # patch a model (a family recognises modules by class name and module path).
    import importlib

    for name in ("rtdetr", "transformers", "ultralytics", "rfdetr"):
        try:
            importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as e:  # a family module not written yet; never the codebase itself
            if e.name != f"{__package__}.{name}":
                raise


class PatchHandle:
    """What ``patch`` replaced in one model; ``revert()`` puts the originals back."""

    def __init__(self, model: nn.Module, replaced: List[Replacement], kinds: frozenset, backend: Optional[str]):
        self._model = model
        self.replaced = replaced
        self.kinds = kinds
        self.backend = backend

    @property
    def active(self) -> bool:
        return bool(self.replaced)

    def counts(self) -> Dict[str, Dict[str, int]]:
        """{kind: {class name: number of replacements}}."""
        out: Dict[str, Dict[str, int]] = {}
        for kind in KINDS:
            c = Counter(r.cls for r in self.replaced if r.kind == kind)
            if c:
                out[kind] = dict(c)
        return out

    def report(self) -> str:
        if not self.replaced:
            return "rtdetr_kernels.patch: nothing patched (reverted)"
        lines = [f"rtdetr_kernels.patch: {len(self.replaced)} replacements in {type(self._model).__name__}"
                 + (f" (backend {self.backend!r})" if self.backend else "")]
        for kind in KINDS:
            rows = [r for r in self.replaced if r.kind == kind]
            if not rows:
                if kind in self.kinds:
                    lines.append(f"  {kind}: nothing to patch")
                continue
            groups = Counter((r.cls, r.how, r.detail) for r in rows)
            for (cls, how, detail), n in groups.items():
                lines.append(f"  {kind}: {n} x {cls} ({how}{'; ' + detail if detail else ''})")
        globals_ = [r.where for r in self.replaced if r.how == "global rebind"]
        if globals_:
            lines.append("  process-wide: " + ", ".join(sorted(set(globals_))) + " (restored by revert())")
        return "\n".join(lines)

    __str__ = report

    def __repr__(self) -> str:
        return f"<PatchHandle {self.counts()}>"

    def revert(self) -> None:
        """Restore every original, last replaced first. Safe to call twice."""
        for r in reversed(self.replaced):
            r.undo()
        self.replaced = []
        if getattr(self._model, _HANDLE_ATTR, None) is self:
            object.__delattr__(self._model, _HANDLE_ATTR)

    def __reduce__(self):
        # A copied or unpickled model is not the one this handle patched (its undo closures point at the
        # original's modules), so the copy carries no handle: copy.deepcopy(model) and torch.save(model)
        # store None in its place (a checkpoint then loads without rtdetr_kernels); patch the copy again.
        return (type(None), ())

    def __enter__(self) -> "PatchHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.revert()


def patch(model: nn.Module, msda: bool = True, attention: bool = True, topk: bool = True,
          backend: Optional[str] = None) -> PatchHandle:
    """Patch ``model`` in place with the kernels and return a handle (``revert()``, ``report()``).

    msda, attention, topk: which hot spots to replace (``topk`` covers the query selection and the
        post-processor). backend: pin a backend for the patched calls ('reference', 'cpu', 'triton',
        'cuda'); None lets each call choose ('auto').

    Patching a model twice returns the first handle unchanged (the kinds and backend of the first
    call stay). A model in which no family finds anything to patch raises ValueError naming the
    families supported.
    """
    model = _unwrap(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    existing = getattr(model, _HANDLE_ATTR, None)
    if existing is not None and existing.active:
        return existing
    kinds = frozenset(k for k, on in zip(KINDS, (msda, attention, topk)) if on)
    if not kinds:
        raise ValueError("patch: msda, attention and topk are all False: nothing to patch")
    if backend is not None:
        from ..backends import BACKENDS

        if backend not in BACKENDS and backend != "auto":
            raise ValueError(f"backend: expected one of {list(BACKENDS)} or 'auto', got {backend!r}")
    replaced: List[Replacement] = []
    try:
        for family in families():
            replaced.extend(family.apply(model, kinds, backend))
    except BaseException:
        for r in reversed(replaced):
            r.undo()
        raise
    if not replaced:
        supported = "; ".join(f"{f.name}: {f.covers}" for f in families())
        raise ValueError(f"model: found nothing to patch in {type(model).__name__} for {sorted(kinds)}. "
                         f"Supported families: {supported}")
    handle = PatchHandle(model, replaced, kinds, backend)
    # a plain attribute (not a submodule, parameter or buffer): invisible to state_dict and .to()
    object.__setattr__(model, _HANDLE_ATTR, handle)
    return handle


def _unwrap(model):
    for family in families():
        if family.unwrap is not None:
            inner = family.unwrap(model)
            if inner is not None:
                return inner
    return model


# --------------------------------------------------------------------------------------------
# Helpers the families share
# --------------------------------------------------------------------------------------------


def named_instances(model: nn.Module, class_names: Iterable[str], module_prefix: str = "") -> List[tuple]:
    """(qualified name, module) for every submodule (the model included) whose class ``__name__`` is
    in ``class_names`` and whose class is defined in a module starting with ``module_prefix``. Matching by
    name, not identity, covers the many copies of a class a codebase carries (transformers has ten
    ``MultiScaleDeformableAttention`` classes) without importing the codebase."""
    names = set(class_names)
    return [(q, m) for q, m in model.named_modules()
            if type(m).__name__ in names and type(m).__module__.startswith(module_prefix)]


def rebind(kind: str, where: str, obj, attr: str, new, how: str, detail: str = "", cls: Optional[str] = None) -> Replacement:
    """Set ``obj.attr = new`` (on the instance) and return the Replacement that undoes it: the
    instance attribute is restored if it had one, deleted otherwise (so the class attribute shows
    through again, as before)."""
    had = attr in getattr(obj, "__dict__", {})
    old = obj.__dict__[attr] if had else None

    def undo():
        if had:
            object.__setattr__(obj, attr, old)
        elif attr in obj.__dict__:
            object.__delattr__(obj, attr)

    object.__setattr__(obj, attr, new)
    return Replacement(kind, where, cls or type(obj).__name__, how, undo, detail)


@contextlib.contextmanager
def _no_backend():
    yield


def backend_scope(backend: Optional[str]):
    """A context manager pinning ``backend`` for the calls inside (a no-op for None). Where the
    patched code calls an op directly, pass ``backend=`` to it instead (nothing to trace)."""
    if backend is None:
        return _no_backend()
    from ..backends import use_backend

    return use_backend(backend)


def with_backend(fn: Callable, backend: Optional[str]) -> Callable:
    """``fn`` running under ``backend_scope(backend)``."""
    if backend is None:
        return fn

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with backend_scope(backend):
            return fn(*args, **kwargs)

    return wrapper


def require(kinds: Sequence[str]) -> None:
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"kinds: expected a subset of {list(KINDS)}, got {bad}")
