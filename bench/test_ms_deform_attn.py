"""Microbenchmarks of ms_deform_attn (pytest-benchmark): our backends against the anchors.

Shapes: the RT-DETR decoder at 640 px (S=8400) and 800 px (S=13125), Lq 300/500, N 1/8/32, M=8,
D=32, L=3, P=4, plus one Deformable-DETR encoder shape (Lq = S = 5440, L=4) and RF-DETR Nano's decoder
(S=576 on one level, M=16, D=16, P=2; Lq 300 in eval, 3900 with training's 13 query groups). Modes: forward,
backward (grads of all three inputs from a retained graph), forward+backward. Providers: our
backends usable on the device (cpu on CPU; cuda and triton, each also in deterministic mode, on
GPU), RT-DETR's grid_sample core eager and under torch.compile, and the PyPI package
torch-ms-deform-attn when it is installed (optional; never a requirement).

On CPU only N in {1, 8} (Lq 500 at N=1 only) and the encoder shape run: the grid_sample reference
takes seconds per call beyond that. torch.compile runs on CPU at the smallest case only (mark
`compiled`), and float16 / bfloat16 (AMP layout: fp32 locations) at the 640 px decoder shapes only.
Every provider's output and three gradients are checked against the float64 reference before it
is timed.

test_ms_deform_attn times each provider on its own: medians, with the minimum also recorded
(min_ms; on CPU about 1.5 s of rounds per provider); GPU times are CUDA-event medians
(extra_info['cuda_event_median_ms']); peak memory of forward+backward (CUDA allocator peak on GPU,
profiler allocation trace on CPU) is in extra_info['peak_mem_mb']. test_ms_deform_attn_paired
(CPU; on GPU with RTDETR_BENCH_PAIRED=1) calls ours and each anchor alternately and records the
median of the per-round ratios, which a shared host's drifting speed does not bias.
`python bench/ratios.py JSON` prints all of it.
"""

from __future__ import annotations

import functools
import os
import statistics

import pytest
import torch

import rtdetr_kernels
from rtdetr_kernels import backends
from rtdetr_kernels.ms_deform_attn.reference import ms_deform_attn_grid_sample

from conftest import budget_left, device_name, quick, time_once_ms, time_rounds_ms

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DECODER_640 = ((80, 80), (40, 40), (20, 20))
DECODER_800 = ((100, 100), (50, 50), (25, 25))
ENCODER = ((64, 64), (32, 32), (16, 16), (8, 8))
RFDETR = ((24, 24),)  # RF-DETR Nano at 384 px (patch 16): one level, 16 heads of 16 channels, 2 points
HEADS = {RFDETR: (16, 16, 2)}  # (M, D, P) where not RT-DETR's (8, 32, 4)


def _cases():
    cases = []
    for name, shapes in (("decoder640", DECODER_640), ("decoder800", DECODER_800)):
        for lq in (300, 500):
            for n in (1, 8, 32):
                if quick() and (name != "decoder640" or lq != 300 or n == 32):
                    continue
                if DEVICE == "cpu" and (n == 32 or (lq == 500 and n != 1)):
                    continue
                cases.append((name, shapes, n, lq))
    if not quick():
        cases.append(("encoder", ENCODER, 1, sum(h * w for h, w in ENCODER)))
    for lq in (300, 3900):  # rfdetr's eval queries; training's 13 query groups of 300
        for n in (1, 8):
            if (quick() and (lq, n) != (300, 1)) or (DEVICE == "cpu" and n != 1):
                continue
            cases.append(("rfdetr", RFDETR, n, lq))
    return cases


CASES = _cases()
DTYPES = [torch.float32] if quick() else [torch.float32, torch.float16, torch.bfloat16]
MODES = ["forward", "backward", "forward+backward"]


def _ours():
    """Every backend the registry has for the op and that runs here, but the reference (timed below
    as RT-DETR's own grid_sample core)."""
    names = []
    for backend in backends.implemented_backends("ms_deform_attn"):
        if backend != "reference" and backends.why_not(backend, backends.Call("ms_deform_attn", DEVICE, (torch.float32,) * 3)) is None:
            names.append(backend)
            if DEVICE == "cuda":
                names.append(backend + "-deterministic")
    return names


def _pypi():
    try:
        import torch_ms_deform_attn  # noqa: F401

        return ["torch-ms-deform-attn"]
    except ImportError:
        return []


PROVIDERS = _ours() + ["reference-grid-sample", "reference-grid-sample-compiled"] + _pypi()


@functools.lru_cache(maxsize=None)
def _inputs(shapes, n, lq, dtype):
    gen = torch.Generator().manual_seed(n * 1000 + lq)
    S = sum(h * w for h, w in shapes)
    L, (M, D, P) = len(shapes), HEADS.get(shapes, (8, 32, 4))
    value = torch.randn(n, S, M, D, generator=gen)
    loc = torch.rand(n, lq, M, L, P, 2, generator=gen) * 1.1 - 0.05
    weights = torch.randn(n, lq, M, L * P, generator=gen).softmax(-1).view(n, lq, M, L, P)
    grad = torch.randn(n, lq, M * D, generator=gen)
    # AMP's layout: value in the low precision, locations and weights in float32
    return value.to(DEVICE, dtype), loc.to(DEVICE), weights.to(DEVICE), grad.to(DEVICE, dtype)


def _function(provider, shapes):
    shapes_list = [list(s) for s in shapes]
    # grid_sample needs one dtype; under AMP it runs in the widest (float32), which is what a
    # drop-in kernel has to match, so the reference gets float32 for low-precision value too
    if provider == "reference-grid-sample":
        return lambda v, l, w: ms_deform_attn_grid_sample(v.float(), shapes, l, w).to(v.dtype)
    if provider == "reference-grid-sample-compiled":
        for knob in ("cache_size_limit", "recompile_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 256)
        compiled = torch.compile(ms_deform_attn_grid_sample, dynamic=False)
        return lambda v, l, w: compiled(v.float(), shapes, l, w).to(v.dtype)
    if provider == "torch-ms-deform-attn":
        from torch_ms_deform_attn import ms_deform_attn as pypi_msda

        shape_t = torch.tensor(shapes_list, device=DEVICE)
        starts = torch.cat([shape_t.new_zeros(1), (shape_t[:, 0] * shape_t[:, 1]).cumsum(0)[:-1]])
        # that package wants weights in value's dtype
        return lambda v, l, w: pypi_msda(v, shape_t, starts, l.to(v.dtype), w.to(v.dtype))
    backend = provider.split("-")[0]
    return lambda v, l, w: rtdetr_kernels.ms_deform_attn(v, shapes_list, l, w, backend=backend)


def _deterministic(provider):
    return provider.endswith("-deterministic")


def _check(provider, fn, shapes, n, lq, dtype):
    """Forward and all three grads against the float64 reference before anything is timed."""
    v, l, w, g = _inputs(shapes, n, min(lq, 64) if lq > 64 else lq, dtype)
    v, l, w, g = v[:1], l[:1], w[:1], g[:1]  # one image is enough for correctness
    args = [t.detach().clone().requires_grad_() for t in (v, l, w)]
    with torch.autograd.set_grad_enabled(True):
        out = fn(*args)
        grads = torch.autograd.grad(out, args, g)
    ref_args = [t.detach().double().requires_grad_() for t in (v, l, w)]
    ref = rtdetr_kernels.ms_deform_attn(ref_args[0], [list(s) for s in shapes], ref_args[1], ref_args[2], backend="reference")
    ref_grads = torch.autograd.grad(ref, ref_args, g.double())
    # fp32: accumulated rounding over 48 samples; fp16/bf16 output is rounded once at the end
    tol = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    for name, got, exp in zip(("out", "d_value", "d_loc", "d_weights"), (out,) + grads, (ref,) + ref_grads):
        scale = exp.abs().max().item() or 1.0
        err = (got.double() - exp).abs().max().item() / scale
        assert err < tol, f"{provider} {name}: relative error {err:.2e} >= {tol} before timing"


def _once(fn):
    return time_once_ms(fn, DEVICE)


def _timer(fn, rounds):
    return time_rounds_ms(fn, rounds, DEVICE)


def _cpu_peak_mb(fn):
    """Peak of the bytes ``fn`` holds allocated at once through torch's CPU allocator, from the
    profiler's trace of every allocation and free in order (the CPU has no allocator statistics like
    CUDA's max_memory_allocated). None where this torch's profiler does not expose the trace."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    results = getattr(prof.profiler, "kineto_results", None)
    if results is None:
        return None
    events = sorted((e for e in results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    held = peak = 0
    for event in events:
        held += event.nbytes()
        peak = max(peak, held)
    return peak / 2**20


def _skip_unless_timed(provider, case, dtype):
    """The CPU runs a subset (see the module docstring); every run stops at the time budget."""
    if provider == "reference-grid-sample-compiled" and DEVICE == "cpu" and case != CASES[0]:
        pytest.skip("torch.compile of the reference runs on CPU at the smallest case only")
    if provider == "torch-ms-deform-attn" and DEVICE == "cpu" and dtype != torch.float32:
        pytest.skip("compared in float32 on CPU")
    if DEVICE == "cpu" and dtype != torch.float32 and case[0] != "decoder640":
        pytest.skip("float16 / bfloat16 run on CPU at the 640 px decoder shapes only")
    if budget_left() <= 0:
        pytest.skip("benchmark time budget spent")


def _runner(fn, inputs, mode):
    """A no-argument callable doing ``mode`` on fresh leaves (backward: from a graph built once)."""
    v, l, w, g = inputs
    leaves = [t.detach().clone().requires_grad_(mode != "forward") for t in (v, l, w)]
    if mode == "forward":
        def run():
            with torch.no_grad():
                return fn(*leaves)
    elif mode == "backward":
        out = fn(*leaves)

        def run():
            return torch.autograd.grad(out, leaves, g, retain_graph=True)
    else:
        def run():
            return torch.autograd.grad(fn(*leaves), leaves, g)
    return run


def _shape_info(case):
    name, shapes, n, lq = case
    M, D, P = HEADS.get(shapes, (8, 32, 4))
    return {"case": name, "N": n, "Lq": lq, "S": sum(h * w for h, w in shapes), "M": M, "D": D, "L": len(shapes),
            "P": P}


PARAMS = [pytest.mark.parametrize("mode", MODES),
          pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", "")),
          pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-N{c[2]}-Lq{c[3]}")]


def _over_cases(test):
    for mark in PARAMS:
        test = mark(test)
    return test


@_over_cases
@pytest.mark.parametrize("provider", PROVIDERS)
def test_ms_deform_attn(benchmark, provider, case, dtype, mode):
    name, shapes, n, lq = case
    _skip_unless_timed(provider, case, dtype)
    fn = _function(provider, shapes)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(_deterministic(provider))
    try:
        _check(provider, fn, shapes, n, lq, dtype)
        run = _runner(fn, _inputs(shapes, n, lq, dtype), mode)

        def synced():
            result = run()
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            return result

        # on a shared CPU host other work only ever adds time: min_ms (also recorded) is the steadier
        # statistic there (`ratios.py --stat min` uses it), the more so the more rounds it sees: on CPU
        # every provider gets about 1.5 s of rounds (10 to 200)
        if DEVICE == "cpu":
            _, once_ms = _timer(run, 1)
            rounds = max(10, min(200, int(1500 / max(once_ms, 1e-3))))
        else:
            rounds = 50
        median_ms, min_ms = _timer(run, rounds)
        peak_mb = None
        if DEVICE == "cuda" and mode == "forward+backward":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            run()
            torch.cuda.synchronize()
            peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
        elif mode == "forward+backward":
            peak_mb = _cpu_peak_mb(run)
        benchmark.extra_info.update(
            op="ms_deform_attn", provider=provider, mode=mode, dtype=str(dtype).replace("torch.", ""),
            shape=_shape_info(case), device=device_name(DEVICE), median_ms=median_ms, min_ms=min_ms)
        if DEVICE == "cuda":
            benchmark.extra_info["cuda_event_median_ms"] = median_ms
        if peak_mb is not None:
            benchmark.extra_info["peak_mem_mb"] = peak_mb
        # pytest-benchmark's own statistics (the JSON's "stats"), from a few more rounds
        benchmark.pedantic(synced, rounds=min(rounds, 20), iterations=1, warmup_rounds=1)
    finally:
        torch.use_deterministic_algorithms(previous)


# --------------------------------------------------------------------------------------------
# Paired ratios: ours and one anchor called in alternation
# --------------------------------------------------------------------------------------------
# On a shared host the machine's speed drifts over seconds, and the per-provider benchmarks above
# time each provider at a different moment; their ratios then carry that drift. Here ours and the
# anchor run alternately (A B A B ...), so neighbouring calls see the same machine: the recorded
# ratio is the median over the rounds of anchor_i / ours_i (and the ratio of the two minimums).

PAIRED_ANCHORS = ["reference-grid-sample"] + _pypi()


def _paired_ours():
    return "cuda" if DEVICE == "cuda" and "cuda" in PROVIDERS else ("cpu" if "cpu" in PROVIDERS else None)


@_over_cases
@pytest.mark.parametrize("anchor", PAIRED_ANCHORS)
def test_ms_deform_attn_paired(benchmark, anchor, case, dtype, mode):
    name, shapes, n, lq = case
    ours = _paired_ours()
    if ours is None:
        pytest.skip("no compiled backend to pair")
    if DEVICE == "cuda" and os.environ.get("RTDETR_BENCH_PAIRED", "0") != "1":
        pytest.skip("paired timing is for shared CPU hosts; CUDA events are steady (RTDETR_BENCH_PAIRED=1 runs it)")
    _skip_unless_timed(anchor, case, dtype)
    runs = {}
    for provider in (ours, anchor):
        fn = _function(provider, shapes)
        _check(provider, fn, shapes, n, lq, dtype)
        runs[provider] = _runner(fn, _inputs(shapes, n, lq, dtype), mode)
    _, once_ours = _timer(runs[ours], 1)
    _, once_anchor = _timer(runs[anchor], 1)
    budget_ms = 3000 if DEVICE == "cpu" else 1000
    rounds = max(8, min(200, int(budget_ms / max(once_ours + once_anchor, 1e-3))))
    times = {ours: [], anchor: []}
    for i in range(rounds):
        order = (ours, anchor) if i % 2 == 0 else (anchor, ours)
        for provider in order:
            times[provider].append(_once(runs[provider]))
    ratios = sorted(a / o for a, o in zip(times[anchor], times[ours]))
    benchmark.extra_info.update(
        op="ms_deform_attn", kind="paired", provider=ours, anchor=anchor, mode=mode,
        dtype=str(dtype).replace("torch.", ""),
        shape=_shape_info(case), device=device_name(DEVICE), rounds=rounds, paired_ratio_median=statistics.median(ratios),
        paired_ratio_p10=ratios[len(ratios) // 10], paired_ratio_of_mins=min(times[anchor]) / min(times[ours]),
        ours_min_ms=min(times[ours]), anchor_min_ms=min(times[anchor]))
    benchmark.pedantic(runs[ours], rounds=3, iterations=1, warmup_rounds=0)

