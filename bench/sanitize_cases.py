#!/usr/bin/env python3
"""Small cases that drive every compiled kernel, forward and backward, for compute-sanitizer.

``bench/gpu_suite.sh`` runs this under ``compute-sanitizer --tool memcheck`` and ``--tool racecheck``.
It exercises each op that ``rtdetr_kernels`` registers, on the ``cuda`` backend (csrc CUDA kernels)
and the ``triton`` backend, at the places where index math goes wrong: sampling locations exactly
on the pixel edges (0, 1, pixel -1, pixel W/H, their neighbours), NaN and +-inf, huge values,
empty inputs (N=0, Lq=0), odd channel counts (D = 1, 5, 33) and D = 32/64, fp32/fp16/bf16 and the
mixed dtypes AMP produces (bf16/fp16 value, fp32 locations), deterministic and fast backward,
every sampling method, 16 levels, both location layouts and partial gradient requests.

It checks nothing numerically by default (the test suite does parity): a case fails when it raises
(an illegal address surfaces as a CUDA error) or returns a wrongly shaped output; the sanitizer
reports the bad accesses. ``--check`` adds a loose forward comparison with the reference backend.

  python bench/sanitize_cases.py --list            # enumerate the cases (works without a GPU)
  python bench/sanitize_cases.py                   # run all of them on CUDA
  python bench/sanitize_cases.py --backend cuda -k discrete --json out.json
  python bench/sanitize_cases.py --backend triton --interpret --check   # no GPU: bounds-checked interpreter

Ops are discovered from ``rtdetr_kernels.backends.registered_ops()``; an op is run on a backend
only when ``backends.why_not(backend, ...)`` says the backend exists for it. A registered op with no
case builder here is listed as uncovered (and makes the run fail with --strict).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS for matmul-based ops

import torch  # noqa: E402

BACKENDS_UNDER_TEST = ("cuda", "triton")


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


# --------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (value, locations, weights)
DTYPE_CONFIGS = {
    "fp32": ("fp32", "fp32", "fp32"),
    "fp16": ("fp16", "fp16", "fp16"),
    "bf16": ("bf16", "bf16", "bf16"),
    "bf16v-fp32loc": ("bf16", "fp32", "fp32"),  # what autocast(bf16) gives
    "fp16v-fp32loc": ("fp16", "fp32", "fp32"),
}


def _sync(device: str) -> None:
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


def _backward_both_modes(out: torch.Tensor, inputs: Sequence[torch.Tensor], device: str) -> None:
    """Run the backward in fast mode, then under use_deterministic_algorithms(True)."""
    wanted = [t for t in inputs if t.requires_grad]
    if not wanted:
        return
    grad_out = torch.randn_like(out)
    for det in (False, True):
        with deterministic(det):
            try:
                grads = torch.autograd.grad(out, wanted, grad_out, retain_graph=True, allow_unused=True)
            except RuntimeError as exc:
                if det and "determinis" in str(exc).lower():
                    continue  # the op says it cannot be deterministic: allowed by the contract
                raise
        _sync(device)
        for t, g in zip(wanted, grads):
            if g is not None and tuple(g.shape) != tuple(t.shape):
                raise AssertionError(f"gradient shape {tuple(g.shape)} != input shape {tuple(t.shape)}")


def _backend_exists(rk, op: str, backend: str, device: str = "cuda") -> Optional[str]:
    """None when the op has ``backend`` registered (build-level availability ignored for --list)."""
    b = rk.backends
    spec = getattr(b, "_OPS", {}).get(op)
    if spec is not None and backend not in spec.why_not:
        return f"{op} has no {backend} implementation"
    return None


# --------------------------------------------------------------------------------------------
# multi-scale deformable attention
# --------------------------------------------------------------------------------------------


def edge_locations(size: int) -> List[float]:
    """Normalised coordinates whose pixel coordinate (loc * size - 0.5) sits on an edge."""
    px = [-1.0, -0.5, 0.0, size - 1.0, size - 0.5, float(size)]  # pixel -1 and size: just outside
    locs = [(p + 0.5) / size for p in px]
    locs += [0.0, 1.0, -0.5 / size + 1e-7, (size + 0.5) / size - 1e-7]  # just inside the skip test
    locs += [math.nextafter(l, -math.inf) for l in locs[:6]] + [math.nextafter(l, math.inf) for l in locs[:6]]
    locs += [-3.0, 4.0, 0.5]
    return locs


NONFINITE = [float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 3e9, -3e9, 0.5]


def msda_inputs(N: int, Lq: int, M: int, D: int, shapes: Sequence[Tuple[int, int]], points: Sequence[int],
                dtype_cfg: str, locset: str, device: str, grads: str = "all", layout: str = "flat",
                weights_nonfinite: bool = False, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    vd, ld, wd = (DTYPES[n] for n in DTYPE_CONFIGS[dtype_cfg])
    S = sum(h * w for h, w in shapes)
    P = sum(points)
    value = torch.randn(N, S, M, D, generator=gen)
    loc = torch.rand(N, Lq, M, P, 2, generator=gen) * 1.4 - 0.2
    if locset in ("edges", "nonfinite") and N * Lq > 0:
        start = 0
        for (H, W), p in zip(shapes, points):
            if locset == "edges":
                xs, ys = edge_locations(W), edge_locations(H)
            else:
                xs = ys = NONFINITE
            slots = loc[:, :, :, start:start + p].reshape(-1, 2)
            i = torch.arange(slots.shape[0])  # cycle x and y at different strides: many (x, y) pairs
            slots[:, 0] = torch.tensor(xs, dtype=torch.float64)[i % len(xs)].float()
            slots[:, 1] = torch.tensor(ys, dtype=torch.float64)[(i // len(xs) + i) % len(ys)].float()
            loc[:, :, :, start:start + p] = slots.reshape(N, Lq, M, p, 2)
            start += p
    weights = torch.rand(N, Lq, M, P, generator=gen)
    weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-6)
    if weights_nonfinite and weights.numel():
        flat = weights.view(-1)
        flat[0::7] = float("nan")
        flat[1::11] = float("inf")
    value = value.to(device=device, dtype=vd)
    loc = loc.to(device=device, dtype=ld)
    weights = weights.to(device=device, dtype=wd)
    if layout == "v1":
        assert len(set(points)) == 1
        loc = loc.reshape(N, Lq, M, len(shapes), points[0], 2)
        weights = weights.reshape(N, Lq, M, len(shapes), points[0])
    need = {"all": (True, True, True), "value": (True, False, False), "loc_attn": (False, True, True),
            "attn": (False, False, True), "none": (False, False, False)}[grads]
    for t, flag in zip((value, loc, weights), need):
        t.requires_grad_(flag)
    return value, loc, weights


def _msda_case(rk, backend: str, *, N=2, Lq=7, M=2, D=32, shapes=((6, 5), (3, 4), (1, 1)), points=(2, 3, 1),
               dtype_cfg="fp32", method="bilinear", clamp="per_axis", locset="edges", grads="all",
               layout="flat", weights_nonfinite=False) -> Case:
    parts = [backend, dtype_cfg, f"D{D}", method if method == "bilinear" else f"discrete-{clamp}", locset,
             f"N{N}", f"Lq{Lq}", f"L{len(shapes)}", f"grad-{grads}"]
    if layout != "flat":
        parts.append(layout)
    if weights_nonfinite:
        parts.append("nanweights")
    case_id = "ms_deform_attn/" + "-".join(parts)

    def run(device: str, check: bool) -> None:
        value, loc, weights = msda_inputs(N, Lq, M, D, shapes, points, dtype_cfg, locset, device, grads, layout,
                                          weights_nonfinite)
        kwargs = dict(method=method, discrete_clamp=clamp, backend=backend)
        if layout == "flat":
            kwargs["num_points_list"] = list(points)
        try:
            out = rk.ms_deform_attn(value, list(shapes), loc, weights, **kwargs)
        except rk.BackendUnavailableError as exc:
            raise CaseSkipped(str(exc)) from None
        _sync(device)
        if tuple(out.shape) != (N, Lq, M * D):
            raise AssertionError(f"output shape {tuple(out.shape)} != {(N, Lq, M * D)}")
        if out.dtype != value.dtype:
            raise AssertionError(f"output dtype {out.dtype} != value dtype {value.dtype}")
        if check and locset != "nonfinite" and not weights_nonfinite:
            ref = rk.ms_deform_attn(value.detach().float(), list(shapes), loc.detach().float(), weights.detach().float(),
                                    **{**kwargs, "backend": "reference"})
            tol = 1e-4 if dtype_cfg == "fp32" else 3e-2
            err = (out.detach().float() - ref).abs().max().item() if out.numel() else 0.0
            if err > tol * (1 + ref.abs().max().item() if ref.numel() else 1):
                raise AssertionError(f"forward differs from the reference by {err:.3g}")
        _backward_both_modes(out, (value, loc, weights), device)

    tags = (backend, dtype_cfg, method, locset, f"D{D}", "empty" if N * Lq == 0 else "nonempty")
    meta = dict(N=N, Lq=Lq, M=M, D=D, shapes=[list(s) for s in shapes], points=list(points), dtype=dtype_cfg,
                method=method, clamp=clamp, locset=locset, grads=grads, layout=layout)
    return Case(case_id, "ms_deform_attn", backend, run, tags, meta)


def msda_cases(rk, backend: str, quick: bool = False) -> List[Case]:
    cases: List[Case] = []
    dtype_cfgs = list(DTYPE_CONFIGS) if not quick else ["fp32", "bf16", "bf16v-fp32loc"]
    channels = (1, 5, 32, 33, 64) if not quick else (5, 32)
    # A. bilinear, edge locations: every dtype configuration x every channel count
    for dtype_cfg in dtype_cfgs:
        for D in channels:
            cases.append(_msda_case(rk, backend, D=D, dtype_cfg=dtype_cfg))
    # B. discrete, both clamps, on landscape and portrait levels (official clamp goes out of range there)
    disc_shapes, disc_points = ((4, 7), (6, 3), (1, 1), (2, 2)), (3, 2, 1, 2)
    for clamp in ("per_axis", "official"):
        for dtype_cfg in (["fp32", "fp16", "bf16", "bf16v-fp32loc"] if not quick else ["fp32", "bf16v-fp32loc"]):
            for D in ((5, 32) if not quick else (32,)):
                cases.append(_msda_case(rk, backend, D=D, dtype_cfg=dtype_cfg, method="discrete", clamp=clamp,
                                        shapes=disc_shapes, points=disc_points))
    # C. non-finite and huge locations (and non-finite weights), every method
    for method, clamp in (("bilinear", "per_axis"), ("discrete", "per_axis"), ("discrete", "official")):
        for dtype_cfg in (("fp32", "bf16") if not quick else ("fp32",)):
            cases.append(_msda_case(rk, backend, dtype_cfg=dtype_cfg, method=method, clamp=clamp, locset="nonfinite",
                                    shapes=disc_shapes, points=disc_points))
    cases.append(_msda_case(rk, backend, locset="random", weights_nonfinite=True))
    # D. empty inputs
    for N, Lq in ((0, 7), (2, 0)):
        for dtype_cfg in ("fp32", "bf16v-fp32loc"):
            for method in ("bilinear", "discrete"):
                cases.append(_msda_case(rk, backend, N=N, Lq=Lq, dtype_cfg=dtype_cfg, method=method, locset="random"))
    # E. partial gradient requests (backward computes only what is needed)
    for grads in ("value", "loc_attn", "attn", "none"):
        cases.append(_msda_case(rk, backend, grads=grads))
    cases.append(_msda_case(rk, backend, grads="value", dtype_cfg="bf16v-fp32loc", D=33))
    # F. an RT-DETR-like shape in the v1 layout (more blocks than the toy cases), and 16 levels
    cases.append(_msda_case(rk, backend, N=2, Lq=40, M=8, D=32, shapes=((20, 20), (10, 10), (5, 5)), points=(4, 4, 4),
                            dtype_cfg="fp16", locset="random", layout="v1"))
    cases.append(_msda_case(rk, backend, N=1, Lq=40, M=8, D=32, shapes=((20, 20), (10, 10), (5, 5)), points=(4, 4, 4),
                            dtype_cfg="bf16v-fp32loc", locset="edges"))
    sixteen = tuple((1 + i % 4, 1 + (i * 3) % 5) for i in range(16))
    cases.append(_msda_case(rk, backend, shapes=sixteen, points=tuple(1 + i % 2 for i in range(16)), D=5))
    return cases


# --------------------------------------------------------------------------------------------
# AIFI attention and top-K selection (builders guessed from the documented signatures; they run
# only once a cuda/triton backend is registered for the op)
# --------------------------------------------------------------------------------------------


def _call_by_names(fn, values: Dict[str, Any], backend: str):
    params = inspect.signature(fn).parameters
    args, kwargs = [], {}
    for name, p in params.items():
        if name in values:
            if p.kind == p.POSITIONAL_ONLY:
                args.append(values[name])
            else:
                kwargs[name] = values[name]
    if "backend" in params:
        kwargs["backend"] = backend
    return fn(*args, **kwargs)


def _aifi_case(rk, backend: str, N: int, L: int, C: int, heads: int, dtype: str, with_pos: bool = True) -> Case:
    case_id = f"aifi_attention/{backend}-{dtype}-N{N}-L{L}-C{C}-h{heads}{'' if with_pos else '-nopos'}"

    def run(device: str, check: bool) -> None:
        dt = DTYPES[dtype]
        mk = lambda *s: (torch.randn(*s, device=device) * 0.2).to(dt).requires_grad_(True)  # noqa: E731
        x = mk(N, L, C)
        values = {"x": x, "src": x, "query": x, "pos": mk(N, L, C) if with_pos else None,
                  "pos_embed": mk(N, L, C) if with_pos else None,
                  "in_proj_weight": mk(3 * C, C), "in_proj_bias": mk(3 * C), "out_proj_weight": mk(C, C),
                  "out_proj_bias": mk(C), "num_heads": heads, "nhead": heads, "n_heads": heads}
        try:
            out = _call_by_names(rk.aifi_attention, values, backend)
        except rk.BackendUnavailableError as exc:
            raise CaseSkipped(str(exc)) from None
        out = out[0] if isinstance(out, (tuple, list)) else out
        _sync(device)
        _backward_both_modes(out, [v for v in values.values() if isinstance(v, torch.Tensor)], device)

    return Case(case_id, "aifi_attention", backend, run, (backend, dtype), dict(N=N, L=L, C=C, heads=heads))


def aifi_cases(rk, backend: str, quick: bool = False) -> List[Case]:
    cases = []
    for dtype in (("fp32", "fp16", "bf16") if not quick else ("fp32", "bf16")):
        cases.append(_aifi_case(rk, backend, 2, 400, 256, 8, dtype))
    cases += [_aifi_case(rk, backend, 1, 37, 64, 2, "fp32"), _aifi_case(rk, backend, 0, 16, 64, 2, "fp32"),
              _aifi_case(rk, backend, 2, 1, 64, 2, "bf16", with_pos=False)]
    return cases


def _topk_case(rk, backend: str, N: int, Q: int, K: int, k: int, dtype: str, ties: bool = False,
               nonfinite: bool = False) -> Case:
    case_id = f"topk_select/{backend}-{dtype}-N{N}-Q{Q}-K{K}-k{k}{'-ties' if ties else ''}{'-nonfinite' if nonfinite else ''}"

    def run(device: str, check: bool) -> None:
        dt = DTYPES[dtype]
        logits = torch.randn(N, Q, K, device=device)
        if ties:
            logits = logits.round()
        if nonfinite and logits.numel():
            logits.view(-1)[::13] = float("nan")
            logits.view(-1)[1::17] = float("inf")
            logits.view(-1)[2::19] = -float("inf")
        logits = logits.to(dt).requires_grad_(True)
        memory = torch.randn(N, Q, 33, device=device, dtype=dt, requires_grad=True)
        boxes = torch.rand(N, Q, 4, device=device, dtype=torch.float32, requires_grad=True)
        values = {"logits": logits, "scores": logits, "k": k, "topk": k, "gather": (memory, boxes)}
        try:
            out = _call_by_names(rk.topk_select, values, backend)
        except rk.BackendUnavailableError as exc:
            raise CaseSkipped(str(exc)) from None
        _sync(device)
        flat = list(_tensors(out))
        flat = [t for t in flat if t.is_floating_point() and t.requires_grad]
        if flat:
            loss = sum((t.float() * torch.randn_like(t.float())).sum() for t in flat)
            _backward_both_modes(loss, (logits, memory, boxes), device)

    return Case(case_id, "topk_select", backend, run, (backend, dtype), dict(N=N, Q=Q, K=K, k=k))


def _tensors(obj) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)


def topk_cases(rk, backend: str, quick: bool = False) -> List[Case]:
    cases = [_topk_case(rk, backend, 2, 8400, 80, 300, "fp32"), _topk_case(rk, backend, 2, 8400, 80, 300, "bf16")]
    if not quick:
        cases.append(_topk_case(rk, backend, 2, 8400, 80, 300, "fp16"))
    cases += [_topk_case(rk, backend, 3, 500, 7, 300, "fp32", ties=True),
              _topk_case(rk, backend, 2, 300, 80, 300, "fp32"),  # k == Q
              _topk_case(rk, backend, 1, 999, 3, 17, "fp32", nonfinite=True),
              _topk_case(rk, backend, 0, 100, 80, 10, "fp32")]
    return cases


BUILDERS: Dict[str, Callable[..., List[Case]]] = {
    "ms_deform_attn": msda_cases,
    "aifi_attention": aifi_cases,
    "topk_select": topk_cases,
}


# --------------------------------------------------------------------------------------------
# discovery and running
# --------------------------------------------------------------------------------------------


def discover(rk, backends_wanted: Sequence[str], quick: bool) -> Tuple[List[Case], List[str], Dict[str, str]]:
    """(cases, uncovered ops, {op/backend: why it is not exercised})."""
    ops = list(rk.backends.registered_ops())
    cases: List[Case] = []
    uncovered = [op for op in ops if op not in BUILDERS]
    not_run: Dict[str, str] = {}
    for backend in backends_wanted:  # cuda first: its coverage comes first if a timeout cuts the run
        for op in ops:
            if op not in BUILDERS:
                continue
            if not hasattr(rk, op):
                not_run[f"{op}/{backend}"] = f"rtdetr_kernels has no public function {op}"
                continue
            reason = _backend_exists(rk, op, backend)
            if reason:
                not_run[f"{op}/{backend}"] = reason
                continue
            cases.extend(BUILDERS[op](rk, backend, quick))
    return cases, uncovered, not_run


def build_level_reason(rk, op: str, backend: str, device: str) -> Optional[str]:
    call = rk.backends.Call(op, device, (torch.float32,))
    reason = rk.backends._build_why_not(backend, device) if hasattr(rk.backends, "_build_why_not") else None
    if reason is None:
        # the per-call refinement for a plain fp32 call: a backend still being written says so here
        reason = rk.backends.why_not(backend, call)
    return reason


def select(cases: List[Case], patterns: Sequence[str]) -> List[Case]:
    if not patterns:
        return cases
    return [c for c in cases if all(p in c.id for p in patterns)]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="print the cases and exit (no GPU needed)")
    parser.add_argument("--backend", default=",".join(BACKENDS_UNDER_TEST), help="comma-separated (default cuda,triton)")
    parser.add_argument("-k", action="append", default=[], help="run only cases whose id contains this (repeatable)")
    parser.add_argument("--quick", action="store_true", help="a smaller set (fewer dtypes and channel counts)")
    parser.add_argument("--check", action="store_true", help="also compare forwards with the reference backend")
    parser.add_argument("--json", help="write per-case outcomes here (rewritten after every case)")
    parser.add_argument("--require", default="", help="comma-separated backends that must be usable (else exit 1)")
    parser.add_argument("--strict", action="store_true", help="fail when a registered op has no cases here")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--interpret", action="store_true",
                        help="CPU stand-in for memcheck: run the triton backend on CPU tensors under the Triton "
                             "interpreter, with every load, store and atomic bounds-checked (tests/triton_bounds.py)")
    args = parser.parse_args(argv)
    if args.interpret:
        if "triton" in sys.modules or "rtdetr_kernels" in sys.modules:
            print("sanitize_cases: --interpret must be given before triton is imported", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
        import triton_bounds

        if not triton_bounds.install():
            print("sanitize_cases: the Triton interpreter is not available", file=sys.stderr)
            return 2
        args.device = "cpu"

    import rtdetr_kernels as rk

    backends_wanted = [b.strip() for b in args.backend.split(",") if b.strip()]
    cases, uncovered, not_run = discover(rk, backends_wanted, args.quick)
    cases = select(cases, args.k)

    # build-level availability (is _C built with CUDA, is triton usable on this device?)
    usable: Dict[Tuple[str, str], Optional[str]] = {}
    for c in cases:
        key = (c.op, c.backend)
        if key not in usable:
            usable[key] = build_level_reason(rk, c.op, c.backend, args.device)

    if args.list:
        for c in cases:
            print(c.id)
        print(f"# {len(cases)} cases; ops: {', '.join(rk.backends.registered_ops())}")
        for (op, backend), reason in sorted(usable.items()):
            print(f"# {op}/{backend} on {args.device}: {'usable' if reason is None else 'not usable here: ' + reason}")
        for key, reason in sorted(not_run.items()):
            print(f"# {key}: not exercised: {reason}")
        for op in uncovered:
            print(f"# {op}: registered but has no sanitizer cases (add a builder to bench/sanitize_cases.py)")
        return 0 if cases else 1

    if args.device == "cuda" and not torch.cuda.is_available():
        print("sanitize_cases: no CUDA device visible", file=sys.stderr)
        return 2

    records: List[Dict[str, Any]] = []
    summary = {"ok": 0, "error": 0, "skipped": 0, "unusable": 0}
    required_missing = []
    for backend in [b.strip() for b in args.require.split(",") if b.strip()]:
        bad = {k: v for k, v in usable.items() if k[1] == backend and v is not None}
        if bad or not any(k[1] == backend for k in usable):
            required_missing.append(f"{backend}: " + ("; ".join(f"{k[0]}: {v}" for k, v in bad.items()) or "no cases"))

    def dump() -> None:
        if args.json:
            data = {"summary": summary, "cases": records, "uncovered_ops": uncovered, "not_run": not_run,
                    "required_missing": required_missing}
            tmp = args.json + ".tmp"
            with open(tmp, "w") as fh:
                json.dump(data, fh, indent=1)
            os.replace(tmp, args.json)

    t_all = time.perf_counter()
    for c in cases:
        reason = usable[(c.op, c.backend)]
        if reason is not None:
            summary["unusable"] += 1
            records.append({"id": c.id, "status": "unusable", "reason": reason})
            continue
        t0 = time.perf_counter()
        try:
            torch.manual_seed(0)
            c.run(args.device, args.check)
            status, detail = "ok", None
        except CaseSkipped as exc:
            status, detail = "skipped", str(exc)
        except Exception as exc:  # an illegal address, a wrong shape, a crash in a kernel launcher
            status, detail = "error", f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        summary[status] += 1
        records.append({"id": c.id, "status": status, "seconds": round(time.perf_counter() - t0, 3),
                        **({"error" if status == "error" else "reason": detail} if detail else {})})
        print(f"[{status:7}] {c.id}" + (f"  ({detail[:200]})" if detail else ""), flush=True)
        dump()
    dump()
    print(f"sanitize_cases: {summary['ok']} ok, {summary['error']} errors, {summary['skipped']} skipped by the backend, "
          f"{summary['unusable']} on unusable backends, {time.perf_counter() - t_all:.1f} s", flush=True)
    for (op, backend), reason in sorted(usable.items()):
        if reason is not None:
            print(f"sanitize_cases: {op}/{backend} not usable: {reason}")
    for op in uncovered:
        print(f"sanitize_cases: {op} is registered but has no sanitizer cases")
    failed = summary["error"] > 0 or bool(required_missing) or (args.strict and bool(uncovered))
    if summary["ok"] == 0:
        print("sanitize_cases: no case ran on a usable backend", file=sys.stderr)
        failed = True
    for line in required_missing:
        print(f"sanitize_cases: required backend missing: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
