"""The contract every op keeps, on every backend: one suite parametrized by (op, device, backend).

Every op in the registry (``backends.registered_ops()``) times every backend (``backends.BACKENDS``)
times every device here; a triple the registry says cannot run is a visible skip with its reason.
What each test needs to know about an op comes from its tester (tests/op_testers/), so a new backend
is covered by being registered and a new op by its tester:

- bad inputs raise the documented exception, naming the argument; a tensor on another device too;
- the backend matches the reference backend, forward and every gradient;
- empty inputs: output shapes, gradient shapes, zero gradients (default and deterministic mode);
- non-contiguous and stride-0 (expanded) inputs give what contiguous ones give; a stride-0
  grad_output (``out.sum()``) too;
- ``torch.library.opcheck`` (all its checks) of ``rtdetr_kernels::<op>`` and ``<op>_backward``;
- float64 ``gradcheck`` where the backend serves float64;
- ``torch.compile(fullgraph=True)`` with a dynamic size compiles once and matches eager;
- under ``torch.use_deterministic_algorithms(True)`` the flag reaches the backward op, and repeated
  backwards are bitwise equal;
- autocast (bf16, fp16): the dtypes reaching the op are the op's documented per-argument policy, the
  output equals the call with those dtypes, gradients come back in the leaves' dtypes;
- backend selection: argument > ``use_backend`` > environment variable > auto; an explicit backend
  that cannot serve the call raises ``BackendUnavailableError`` with the registry's reason;
  ``explain`` lists every backend with its reason and validates like the op.

The op-specific semantics (MSDA sampling, attention masks, top-K order) live in the per-op files.
"""

from __future__ import annotations

import re

import pytest
import torch

import rtdetr_kernels
from helpers import DEVICES, OpCalls, deterministic_algorithms, op_backend_params, skip_if_interpreted_bf16
from op_testers import TESTERS, get_path, set_path, tensor_dtypes
from rtdetr_kernels import BackendUnavailableError, backends, use_backend

OPS = backends.registered_ops()
TESTED_OPS = [op for op in OPS if op in TESTERS]  # an op without a tester fails test_every_op_has_a_tester
TRIPLES = op_backend_params(TESTED_OPS)
EVERY_TRIPLE = op_backend_params(TESTED_OPS, skips=False)
OP_DEVICES = [pytest.param(op, device, id=f"{op}-{device}") for op in TESTED_OPS for device in DEVICES]


def _with_cases(cases_of):
    """TRIPLES times each op's cases: params (op, device, backend, case)."""
    return [pytest.param(*p.values, case, id=f"{p.id}-{getattr(case, 'id', case)}", marks=p.marks)
            for p in TRIPLES for case in cases_of(TESTERS[p.values[0]])]


# --------------------------------------------------------------------------------------------
# Running a tester's call
# --------------------------------------------------------------------------------------------


def _tensor_paths(args, names=None):
    """Paths ("name" or "name[i]") of the tensors among ``args`` (or among the entries ``names``)."""
    paths = []
    for name in (names if names is not None else list(args)):
        value = args.get(name)
        if isinstance(value, torch.Tensor):
            paths.append(name)
        elif isinstance(value, (list, tuple)):
            paths += [f"{name}[{i}]" for i, t in enumerate(value) if isinstance(t, torch.Tensor)]
    return paths


def _with_leaves(tester, args, names=None):
    """``args`` with fresh leaves (same values and strides) that require grad in place of the floating
    tensors of ``names`` (default: the tester's ``grad_names``); a tensor passed twice (top-K ranks
    and gathers the same logits) becomes one leaf. Returns (args, leaves, the paths of each leaf)."""
    args = dict(args)
    leaves, paths, index = [], [], {}
    for path in _tensor_paths(args, tester.grad_names if names is None else names):
        source = get_path(args, path)
        if not source.is_floating_point():
            continue
        if id(source) not in index:
            index[id(source)] = len(leaves)
            leaves.append(source.detach().requires_grad_())
            paths.append([])
        i = index[id(source)]
        set_path(args, path, leaves[i])
        paths[i].append(path)
    return args, leaves, paths


def _detached(args):
    args = dict(args)
    for path in _tensor_paths(args):
        set_path(args, path, get_path(args, path).detach())
    return args


def _output_grads(outputs, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o) for o in outputs]


def _forward_backward(tester, args, backend, names=None):
    """(outputs, gradients of the leaves) of one call with fresh random output gradients."""
    args, leaves, _ = _with_leaves(tester, args, names)
    outputs = tester.call(args, backend)
    differentiable = [o for o in outputs if o.requires_grad]
    if differentiable:
        torch.autograd.backward(differentiable, _output_grads(differentiable))
    return [o.detach() for o in outputs], [leaf.grad for leaf in leaves]


def _assert_close(tester, got, want, what):
    atol, rtol = tester.tolerance
    assert len(got) == len(want), what
    for i, (g, w) in enumerate(zip(got, want)):
        assert g is not None and w is not None, f"{what} [{i}]: a gradient is missing"
        assert g.dtype == w.dtype and g.shape == w.shape, f"{what} [{i}]: {g.dtype} {list(g.shape)} vs {w.dtype} {list(w.shape)}"
        if not g.is_floating_point():
            assert torch.equal(g, w), f"{what} [{i}]"
            continue
        finite = w[torch.isfinite(w)]
        scale = max(float(finite.abs().max()) if finite.numel() else 0.0, 1.0)
        torch.testing.assert_close(g, w, atol=atol * scale, rtol=rtol, msg=lambda m: f"{what} [{i}]: {m}")


def _served_by(tester, args, backend=None) -> str:
    """The backend the public wrapper resolved (the last argument of the registered op's call)."""
    with OpCalls(tester.op) as spy:
        tester.call(args, backend)
    assert len(spy.calls) == 1
    return tester.backend_of(spy.calls[0])


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------


def test_every_op_has_a_tester():
    assert OPS, "no op is registered"
    missing = sorted(set(OPS) - set(TESTERS))
    assert not missing, f"ops without a tester in tests/op_testers/: {missing}"
    for op in OPS:
        assert hasattr(torch.ops.rtdetr_kernels, op) and hasattr(torch.ops.rtdetr_kernels, f"{op}_backward"), op


# --------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op,device,backend,case", _with_cases(lambda t: t.every_bad_input()))
def test_bad_input_names_the_argument(op, device, backend, case):
    """Right after the valid call it breaks has run: the eager path remembers the choice made for a
    valid call's argument metadata (backends.remembered), and a bad call must never be taken for it."""
    args = TESTERS[op].valid(device)
    args["backend"] = backend
    if backends.why_not(backend, TESTERS[op].describe(args)) is None:
        TESTERS[op].function(**args)
    case.edit(args)
    with pytest.raises(case.error, match=case.argument):
        TESTERS[op].function(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second real device (CUDA)")
@pytest.mark.parametrize("op,device,backend", TRIPLES)
def test_mismatched_real_devices(op, device, backend):
    tester = TESTERS[op]
    other = "cpu" if device == "cuda" else "cuda"
    for path in tester.device_bound:
        args = tester.valid(device)
        set_path(args, path, get_path(args, path).to(other))
        with pytest.raises(ValueError, match=re.escape(path)):
            tester.call(args, backend)


# --------------------------------------------------------------------------------------------
# Values: the reference, empty inputs, strides
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op,device,backend", TRIPLES)
def test_matches_the_reference_backend(op, device, backend):
    if backend == "reference":
        pytest.skip("the reference backend is the spec the others are compared with")
    tester = TESTERS[op]
    args = tester.valid(device, seed=1)
    got_out, got_grads = _forward_backward(tester, args, backend)
    want_out, want_grads = _forward_backward(tester, args, "reference")
    _assert_close(tester, got_out, want_out, f"{backend} outputs")
    _assert_close(tester, got_grads, want_grads, f"{backend} gradients")
    assert any(float(g.abs().sum()) > 0 for g in want_grads)


@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
@pytest.mark.parametrize("op,device,backend,case", _with_cases(lambda t: t.empty_cases))
def test_empty_inputs(op, device, backend, case, deterministic):
    tester = TESTERS[op]
    empty = tester.empty(case, device)
    with deterministic_algorithms(deterministic):
        args, leaves, paths = _with_leaves(tester, empty.args, empty.grads)
        outputs = tester.call(args, backend)
        assert [tuple(o.shape) for o in outputs] == [tuple(s) for s in empty.shapes]
        assert all(o.dtype == torch.float32 for o in outputs if o.is_floating_point())
        differentiable = [o for o in outputs if o.requires_grad]
        assert differentiable
        torch.autograd.backward(differentiable, _output_grads(differentiable))
    assert leaves
    for path, leaf in zip(paths, leaves):
        assert leaf.grad is not None and leaf.grad.shape == leaf.shape, path
        # where only the queries are empty a gradient is a real (non-empty) tensor that must be zero
        assert (leaf.grad == 0).all(), path


@pytest.mark.parametrize("op,device,backend", TRIPLES)
def test_non_contiguous_inputs(op, device, backend):
    tester = TESTERS[op]
    args, variants = tester.non_contiguous(device)
    expected = _forward_backward(tester, args, backend)
    for i, variant in enumerate(variants):
        restrided = [p for p in _tensor_paths(variant) if not get_path(variant, p).is_contiguous()]
        assert restrided, f"variant {i} is contiguous"
        for path in _tensor_paths(variant):
            assert torch.equal(get_path(variant, path), get_path(args, path)), f"variant {i} changes {path}"
        got = _forward_backward(tester, variant, backend)
        _assert_close(tester, got[0], expected[0], f"outputs, {restrided} re-strided")
        _assert_close(tester, got[1], expected[1], f"gradients, {restrided} re-strided")


@pytest.mark.parametrize("op,device,backend", TRIPLES)
def test_stride_zero_inputs(op, device, backend):
    """Expanded (stride-0) inputs, as a position embedding broadcast over the batch, give what their
    contiguous copies give; the gradient of an expanded leaf is a full tensor like the copy's."""
    tester = TESTERS[op]
    args, expanded = tester.broadcast(device)
    stride_zero = [p for p in _tensor_paths(expanded) if 0 in get_path(expanded, p).stride()]
    assert stride_zero
    for path in _tensor_paths(expanded):
        assert torch.equal(get_path(expanded, path), get_path(args, path)), path
    got = _forward_backward(tester, expanded, backend)
    want = _forward_backward(tester, args, backend)
    _assert_close(tester, got[0], want[0], f"outputs, {stride_zero} expanded")
    _assert_close(tester, got[1], want[1], f"gradients, {stride_zero} expanded")


@pytest.mark.parametrize("op,device,backend", TRIPLES)
def test_stride_zero_grad_output(op, device, backend):
    """out.sum().backward() hands the backward an expanded (stride-0) grad_output."""
    tester = TESTERS[op]
    args = tester.valid(device, seed=2)
    grads = []
    for make_loss in (lambda out: out.sum(), lambda out: (out * torch.ones_like(out)).sum()):
        leaf_args, leaves, _ = _with_leaves(tester, args)
        outputs = [o for o in tester.call(leaf_args, backend) if o.requires_grad]
        sum(make_loss(o) for o in outputs).backward()
        grads.append([leaf.grad for leaf in leaves])
    _assert_close(tester, grads[0], grads[1], "gradients of out.sum()")
    assert all(float(g.abs().sum()) > 0 for g in grads[0])


# --------------------------------------------------------------------------------------------
# torch.library: opcheck, gradcheck, torch.compile
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op,device,backend,case", _with_cases(lambda t: t.opcheck_cases))
def test_opcheck(op, device, backend, case):
    tester = TESTERS[op]
    check = tester.opcheck(case, device, backend)
    reason = backends.why_not(backend, tester.describe(check.public))
    if reason is not None:
        pytest.skip(f"{backend} does not serve this call: {reason}")
    ops = torch.ops.rtdetr_kernels
    for overload, args in [(getattr(ops, op).default, check.forward)] + [
            (getattr(ops, f"{op}_backward").default, a) for a in check.backward]:
        results = torch.library.opcheck(overload, args)  # schema, autograd registration, fake, aot dispatch
        assert len(results) >= 4 and set(results.values()) == {"SUCCESS"}, results


@pytest.mark.parametrize("op,device,backend,case", _with_cases(lambda t: t.gradcheck_cases))
def test_gradcheck_float64(op, device, backend, case):
    tester = TESTERS[op]
    args = tester.gradcheck(case, device)
    reason = backends.why_not(backend, tester.describe(args))
    if reason is not None:
        pytest.skip(f"{backend} does not serve this float64 call: {reason}")
    args, leaves, paths = _with_leaves(tester, args)

    def fn(*tensors):
        call = dict(args)
        for shared, t in zip(paths, tensors):
            for path in shared:
                set_path(call, path, t)
        return tuple(o for o in tester.call(call, backend) if o.is_floating_point())

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("op,device,backend", TRIPLES)
def test_torch_compile_fullgraph_dynamic(op, device, backend):
    from torch._dynamo.testing import CompileCounterWithBackend

    tester = TESTERS[op]
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    first, _ = tester.compile_args(device, tester.compile_sizes[0])
    paths = _tensor_paths(first)
    template = dict(first)
    for path in paths:
        set_path(template, path, None)  # the constants (shapes, k, heads) stay in the closure

    @torch.compile(backend=counter, fullgraph=True)
    def step(*tensors):
        call = dict(template)
        for path, t in zip(paths, tensors):
            set_path(call, path, t)
        return [o * 2 if o.is_floating_point() else o for o in tester.call(call, backend)]

    for size in tester.compile_sizes:
        args, dynamic = tester.compile_args(device, size)
        assert _tensor_paths(args) == paths
        results = []
        for compiled in (True, False):
            leaf_args, leaves, _ = _with_leaves(tester, args)
            tensors = [get_path(leaf_args, p) for p in paths]
            if compiled:
                for path, dim in dynamic:
                    torch._dynamo.mark_dynamic(get_path(leaf_args, path), dim)
                outputs = step(*tensors)
            else:
                outputs = [o * 2 if o.is_floating_point() else o for o in tester.call(leaf_args, backend)]
            differentiable = [o for o in outputs if o.requires_grad]
            torch.autograd.backward(differentiable, _output_grads(differentiable, seed=size))
            results.append(([o.detach() for o in outputs], [leaf.grad for leaf in leaves]))
        (got_out, got_grads), (want_out, want_grads) = results
        _assert_close(tester, got_out, want_out, f"compiled outputs at size {size}")
        _assert_close(tester, got_grads, want_grads, f"compiled gradients at size {size}")
    assert counter.frame_count == 1, f"recompiled for a new size ({counter.frame_count} compiles)"


# --------------------------------------------------------------------------------------------
# Determinism, autocast
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op,device,backend", TRIPLES)
def test_deterministic_flag_reaches_the_backward(op, device, backend):
    tester = TESTERS[op]
    args = tester.valid(device, seed=3)
    for enabled in (False, True):
        with deterministic_algorithms(enabled), OpCalls(f"{op}_backward") as spy:
            _forward_backward(tester, args, backend)
        assert len(spy.calls) == 1, f"{len(spy.calls)} backward calls"
        flag = tester.deterministic_flag(spy.calls[0])
        assert flag is enabled, f"the backward op was told deterministic={flag} in mode {enabled}"
    with deterministic_algorithms(True):
        runs = [_forward_backward(tester, args, backend) for _ in range(2)]
    for a, b in zip(runs[0][0] + runs[0][1], runs[1][0] + runs[1][1]):
        assert torch.equal(a, b), f"runs differ by up to {float((a.double() - b.double()).abs().max()):.3e}"


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("op,device,backend", TRIPLES)
def test_autocast(op, device, backend, low):
    skip_if_interpreted_bf16(device, backend, low)
    tester = TESTERS[op]
    args, leaves, paths = _with_leaves(tester, tester.autocast_args(device, low))
    with OpCalls(op) as spy, torch.autocast(device, dtype=low):
        traced = tester.call(args, backend)
    with torch.autocast(device, dtype=low):
        eager = tester.call(args, backend)
    with OpCalls(op) as expected_spy, torch.no_grad():
        expected = tester.call(tester.autocast_cast(_detached(args), low), backend)
    # the dtypes that reach the registered op are the op's documented policy
    assert [tensor_dtypes(c) for c in spy.calls] == [tensor_dtypes(c) for c in expected_spy.calls]
    for outputs in (traced, eager):
        for got, want in zip(outputs, expected):
            assert got.dtype == want.dtype and torch.equal(got, want)
    differentiable = [o for o in eager if o.requires_grad]
    torch.autograd.backward(differentiable, _output_grads(differentiable))
    for path, leaf in zip(paths, leaves):
        assert leaf.grad is not None and leaf.grad.dtype == leaf.dtype, path
        assert float(leaf.grad.abs().sum()) > 0, f"{path}: no gradient reached the leaf through the casts"


# --------------------------------------------------------------------------------------------
# Backend selection
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op,device,backend", EVERY_TRIPLE)
def test_backend_selection(op, device, backend, monkeypatch):
    """explicit argument > use_backend > environment variable; a backend that cannot serve the call
    raises BackendUnavailableError with the registry's reason, however it was asked for."""
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    tester = TESTERS[op]
    args = tester.valid(device)
    call = tester.describe(args)
    reason = backends.why_not(backend, call)
    if reason is not None:
        match = f"'{backend}'.*{re.escape(reason)}"
        with pytest.raises(BackendUnavailableError, match=match):
            tester.call(args, backend)
        with use_backend(backend), pytest.raises(BackendUnavailableError, match=match):
            tester.call(args, None)
        monkeypatch.setenv(backends.ENV_VAR, backend)
        with pytest.raises(BackendUnavailableError, match=match):
            tester.call(args, None)
        return
    with use_backend(backend):
        assert _served_by(tester, args) == backend
    monkeypatch.setenv(backends.ENV_VAR, backend)
    assert _served_by(tester, args) == backend
    others = [b for b in backends.BACKENDS if b != backend and backends.why_not(b, call) is None]
    for other in others:
        with use_backend(other):  # the context manager wins over the environment ...
            assert _served_by(tester, args) == other
            assert _served_by(tester, args, backend) == backend  # ... and the argument over both
        monkeypatch.setenv(backends.ENV_VAR, other)
        assert _served_by(tester, args, backend) == backend


@pytest.mark.parametrize("op,device", OP_DEVICES)
def test_auto_selection_and_unknown_names(op, device, monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    tester = TESTERS[op]
    args = tester.valid(device)
    call = tester.describe(args)
    expected = next(b for b in backends.AUTO_PRIORITY[device] if backends.why_not(b, call) is None)
    assert _served_by(tester, args) == expected
    assert _served_by(tester, args, "auto") == expected
    with pytest.raises(ValueError, match="use_backend.*unknown backend 'tpu'"):
        with use_backend("tpu"):
            pass
    monkeypatch.setenv(backends.ENV_VAR, "tpu")
    with pytest.raises(ValueError, match=f"{backends.ENV_VAR}.*unknown backend 'tpu'"):
        tester.call(args, None)
    with use_backend("reference"):  # the context manager wins over the environment
        assert _served_by(tester, args) == "reference"


@pytest.mark.parametrize("op,device", OP_DEVICES)
def test_explain_names_every_backend(op, device):
    tester = TESTERS[op]
    args = tester.valid(device)
    lines = rtdetr_kernels.explain(op, **args).splitlines()
    for backend in backends.BACKENDS:
        (line,) = [ln for ln in lines if ln[2:].split()[:1] == [backend]]
        reason = backends.why_not(backend, tester.describe(args))
        assert ("ok" in line) == (reason is None), line
        if reason is not None:
            assert reason in line
    chosen = [ln[2:].split()[0] for ln in lines if ln.startswith("*")]
    assert chosen == [_served_by(tester, args)]
    with pytest.raises(ValueError, match="op"):
        rtdetr_kernels.explain("no_such_op", **args)
    # explain validates like the op
    for case in tester.every_bad_input():
        broken = tester.valid(device)
        case.edit(broken)
        if "backend" in broken:
            continue
        with pytest.raises(case.error, match=case.argument):
            rtdetr_kernels.explain(op, **broken)
