#!/usr/bin/env python3
"""Small cases that drive every compiled kernel, forward and backward, for compute-sanitizer.

``bench/gpu_suite.py`` runs this under ``compute-sanitizer --tool memcheck`` and ``--tool racecheck``.
It exercises each op that ``rtdetr_kernels`` registers, on the ``cuda`` backend (csrc CUDA kernels)
and the ``triton`` backend, with the cases of the op's own folder (``<op>/cases.py``,
``sanitizer_cases``): for MSDA, sampling locations exactly on the pixel edges, NaN and +-inf, huge
values, empty inputs, odd channel counts, every dtype mix AMP produces, deterministic and fast
backward, every sampling method, 16 levels, both location layouts and partial gradient requests.

It checks nothing numerically by default (the test suite does parity): a case fails when it raises
(an illegal address surfaces as a CUDA error) or returns a wrongly shaped output; the sanitizer
reports the bad accesses. ``--check`` adds a loose forward comparison with the reference backend.

  python bench/sanitize_cases.py --list            # enumerate the cases (works without a GPU)
  python bench/sanitize_cases.py                   # run all of them on CUDA
  python bench/sanitize_cases.py --backend cuda -k discrete --json out.json
  python bench/sanitize_cases.py --backend triton --interpret --check   # no GPU: bounds-checked interpreter

Ops are discovered from the registry (``rtdetr_kernels.backends.registered_ops()``); an op is run on
a backend when it has an implementation record for it. A registered op whose cases.py has no
``sanitizer_cases`` is listed as uncovered (and makes the run fail with --strict).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from typing import Any, Dict, List, Optional, Sequence, Tuple

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS for matmul-based ops

import torch  # noqa: E402

BACKENDS_UNDER_TEST = ("cuda", "triton")


def discover(rk, backends_wanted: Sequence[str], quick: bool) -> Tuple[List, List[str], Dict[str, str]]:
    """(cases, uncovered ops, {op/backend: why it is not exercised}), from the op registry: every
    registered op with an implementation record for the backend, its cases from the op folder's
    ``cases.sanitizer_cases``."""
    ops = rk.backends.registered_ops()
    cases: List = []
    uncovered = []
    not_run: Dict[str, str] = {}
    for backend in backends_wanted:  # cuda first: its coverage comes first if a timeout cuts the run
        for op in ops:
            if backend not in rk.backends.implemented_backends(op):
                not_run[f"{op}/{backend}"] = f"{op} has no {backend} implementation"
                continue
            builder = getattr(rk.backends.op_definition(op).cases(), "sanitizer_cases", None)
            if builder is None:
                uncovered.append(op)
                continue
            cases.extend(builder(backend, quick))
    return cases, sorted(set(uncovered)), not_run


def build_level_reason(rk, op: str, backend: str, device: str) -> Optional[str]:
    """Why ``backend`` cannot run here at all (not built, no device), or a plain fp32 call's reason."""
    return rk.backends.build_why_not(backend, device) or rk.backends.why_not(
        backend, rk.backends.Call(op, device, (torch.float32,)))


def select(cases: List, patterns: Sequence[str]) -> List:
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
            print(f"# {op}: registered but has no sanitizer cases (add sanitizer_cases() to its cases.py)")
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
        except rk._cases.CaseSkipped as exc:
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
