"""What every op's ``cases.py`` builds on: a representative call (``Sample``) that
``python -m rtdetr_kernels check`` runs on every usable backend against the reference, and the
edge cases (``Case``) that drive each compiled kernel under compute-sanitizer
(``bench/sanitize_cases.py``). The op folders hold the op-specific inputs; the running and
comparing is here, once.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from . import backends

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------------------------
# check: every usable backend against the reference
# --------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One call of an op's public function, built in float64 (the reference's precision).

    ``differentiable`` names the positions of ``args`` whose gradients are compared. ``oracle``
    (optional) computes the same outputs independently of the reference (nn.MultiheadAttention,
    torch.topk, grid_sample), so that the check also checks the reference itself.
    """

    fn: Callable
    args: Tuple[Any, ...]
    kwargs: Dict[str, Any] = field(default_factory=dict)
    differentiable: Tuple[int, ...] = ()
    oracle: Optional[Callable[..., Any]] = None
    description: str = ""


def tensors(obj) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from tensors(item)


def _cast(obj, dtype):
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast(o, dtype) for o in obj)
    return obj


def run_sample(sample: Sample, backend: str, dtype: torch.dtype, device: str) -> List[torch.Tensor]:
    """Outputs, then the gradients of the differentiable inputs, as float64 on the CPU (integer
    outputs as they are). The output gradient is a fixed function of each output's shape."""
    args = [_cast(a, dtype) for a in sample.args]
    args = [a.to(device) if isinstance(a, torch.Tensor) else type(a)(t.to(device) for t in a)
            if isinstance(a, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in a) else a for a in args]
    wanted = [args[i].requires_grad_() for i in sample.differentiable]
    out = list(tensors(sample.fn(*args, **sample.kwargs, backend=backend)))
    floats = [o for o in out if o.is_floating_point() and o.requires_grad]
    generator = torch.Generator().manual_seed(1)
    grads_out = [torch.randn(o.shape, generator=generator, dtype=torch.float64).to(device=device, dtype=o.dtype)
                 for o in floats]
    grads = torch.autograd.grad(floats, wanted, grads_out, allow_unused=True) if floats and wanted else ()
    grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wanted)]
    return [o.detach().cpu().double() if o.is_floating_point() else o.cpu() for o in out + list(grads)]


def compare(got: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> List[float]:
    """Per tensor: the largest error relative to the largest expected entry (exact for integers:
    0 or inf)."""
    errors = []
    for g, e in zip(got, expected):
        if g.shape != e.shape:
            errors.append(float("inf"))
        elif not e.is_floating_point():
            errors.append(0.0 if torch.equal(g, e) else float("inf"))
        elif e.numel() == 0:
            errors.append(0.0)
        else:
            scale = max(e.abs().max().item(), 1e-12)
            errors.append((g - e).abs().max().item() / scale)
    return errors


def sample_call(op: str, sample: Sample, device: str, dtype: torch.dtype) -> backends.Call:
    """The backends.Call of ``sample`` at ``dtype`` on ``device`` (what why_not decides on)."""
    opdef = backends.op_definition(op)
    args = [_cast(a, dtype) for a in sample.args]
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    return opdef.describe(opdef.validate(*args, **sample.kwargs))


# --------------------------------------------------------------------------------------------
# sanitizer cases
# --------------------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    op: str
    backend: str
    run: Callable[[str, bool], None]  # run(device, check)
    tags: Tuple[str, ...] = ()
    meta: Dict[str, Any] = field(default_factory=dict)


class CaseSkipped(Exception):
    """The backend declines this particular call (dtype, shape, option): not a failure."""


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def deterministic(flag: bool) -> Iterator[None]:
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(flag)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def call_or_skip(fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)``; a backend that declines the call makes the case a skip."""
    try:
        return fn(*args, **kwargs)
    except backends.BackendUnavailableError as exc:
        raise CaseSkipped(str(exc)) from None


def backward_both_modes(outputs, inputs: Sequence[torch.Tensor], device: str) -> None:
    """Backward of every floating output that requires grad, in fast mode and then under
    use_deterministic_algorithms(True); gradients must have their inputs' shapes."""
    outs = [o for o in tensors(outputs) if o.is_floating_point() and o.requires_grad]
    wanted = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if not outs or not wanted:
        return
    grads_out = [torch.randn_like(o) for o in outs]
    for det in (False, True):
        with deterministic(det):
            try:
                grads = torch.autograd.grad(outs, wanted, grads_out, retain_graph=True, allow_unused=True)
            except RuntimeError as exc:
                if det and "determinis" in str(exc).lower():
                    continue  # the op says it cannot be deterministic: allowed by the contract
                raise
        sync(device)
        for t, g in zip(wanted, grads):
            if g is not None and tuple(g.shape) != tuple(t.shape):
                raise AssertionError(f"gradient shape {tuple(g.shape)} != input shape {tuple(t.shape)}")
