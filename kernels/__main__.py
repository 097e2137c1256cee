"""``python -m rtdetr_kernels info`` (what was built, which backend serves each op) and
``python -m rtdetr_kernels check`` (a quick parity check of every usable backend against the
reference on random inputs)."""

from __future__ import annotations

import argparse
import platform
import sys

import torch

from . import backends


def info() -> str:
    lines = [f"rtdetr_kernels {__import__('rtdetr_kernels').__version__}",
             f"python {platform.python_version()}  torch {torch.__version__} (CUDA {torch.version.cuda})"]
    ok, triton_version = backends.triton_status()
    lines.append(f"triton {triton_version if ok else 'unavailable: ' + triton_version}"
                 + ("  [interpreter: TRITON_INTERPRET=1]" if backends.triton_interpreter() else ""))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append(f"device cuda:{i}: {props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)")
    else:
        lines.append("devices: cpu only (no CUDA device visible)")
    ext = backends.load_extension()
    if ext is None:
        lines.append(f"extension rtdetr_kernels._C: not available ({backends.extension_error()})")
    else:
        cuda = f"with CUDA {ext.CUDA_VERSION} kernels for archs {ext.CUDA_ARCHS}" if ext.WITH_CUDA else "CPU kernels only (built without CUDA)"
        lines.append(f"extension rtdetr_kernels._C: built, {cuda}; CPU kernels: {ext.CPU_ISA} build; ops: {ext.OPS}")
        for op in ext.OPS.split(","):
            keys = [key for key in ("CPU", "CUDA") if torch._C._dispatch_has_kernel_for_dispatch_key(f"rtdetr_kernels_C::{op}", key)]
            lines.append(f"  rtdetr_kernels_C::{op}: kernels for {', '.join(keys) or 'no device'}")
    lines.append("backends per op (device: chosen by auto; every backend with its status):")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() or backends.extension_has_cuda() else [])
    for op in backends.registered_ops():
        for device in devices:
            call = backends.Call(op, device, (torch.float32,))
            try:
                chosen = backends.select(call, "auto")
            except backends.BackendUnavailableError:
                chosen = "none"
            lines.append(f"  {op} on {device}: auto -> {chosen}")
            for backend in backends.BACKENDS:
                reason = backends.why_not(backend, call)
                lines.append(f"      {backend:<9} {'ok' if reason is None else 'unavailable: ' + reason}")
    return "\n".join(lines)


def check() -> int:
    """Forward and gradients of every usable backend against the reference on random inputs."""
    from .ms_deform_attn import ms_deform_attn

    torch.manual_seed(0)
    failures = 0
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    shapes = [(10, 12), (5, 6), (3, 3)]
    for device in devices:
        N, Lq, M, D, P = 2, 30, 8, 32, 4
        S = sum(h * w for h, w in shapes)
        value = torch.randn(N, S, M, D, device=device, dtype=torch.float64)
        loc = torch.rand(N, Lq, M, len(shapes), P, 2, device=device, dtype=torch.float64) * 1.2 - 0.1
        weights = torch.rand(N, Lq, M, len(shapes), P, device=device, dtype=torch.float64).softmax(-1)
        grad = torch.randn(N, Lq, M * D, device=device, dtype=torch.float64)

        def run(backend, dtype):
            args = [t.to(dtype).requires_grad_() for t in (value, loc, weights)]
            out = ms_deform_attn(args[0], shapes, args[1], args[2], backend=backend)
            grads = torch.autograd.grad(out, args, grad.to(dtype))
            return [out.double()] + [g.double() for g in grads]

        expected = run("reference", torch.float64)
        for backend in backends.BACKENDS:
            call = backends.Call("ms_deform_attn", device, (torch.float32,) * 3)
            reason = backends.why_not(backend, call)
            if reason is not None:
                print(f"ms_deform_attn {device:<4} {backend:<9} skipped: {reason}")
                continue
            got = run(backend, torch.float32)
            errors = [(g - e).abs().max().item() / max(e.abs().max().item(), 1e-12) for g, e in zip(got, expected)]
            ok = max(errors) < 1e-4  # float32 against a float64 reference, relative to the largest entry
            failures += not ok
            names = ("out", "d_value", "d_loc", "d_weights")
            print(f"ms_deform_attn {device:<4} {backend:<9} {'ok  ' if ok else 'FAIL'} max rel err vs fp64 reference: "
                  + ", ".join(f"{n} {e:.1e}" for n, e in zip(names, errors)))
    failures += _check_attention_and_topk()
    return 1 if failures else 0


def _check_attention_and_topk() -> int:
    """The reference AIFI attention against nn.MultiheadAttention, top-K against torch.topk."""
    from .attention import aifi_attention
    from .topk import topk_select

    failures = 0
    mha = torch.nn.MultiheadAttention(256, 8, batch_first=True).double()
    x, pos = torch.randn(2, 400, 256, dtype=torch.float64), torch.randn(1, 400, 256, dtype=torch.float64)
    expected = mha(x + pos, x + pos, x, need_weights=False)[0]
    got = aifi_attention(x, pos, mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight, mha.out_proj.bias, 8)
    err = (got - expected).abs().max().item()
    failures += not err < 1e-10
    print(f"aifi_attention  cpu  reference {'ok  ' if err < 1e-10 else 'FAIL'} max abs err vs nn.MultiheadAttention (fp64): {err:.1e}")
    logits = torch.randn(2, 8400, 80)
    memory = torch.randn(2, 8400, 256)
    scores, indices, (gathered,) = topk_select(logits, 300, (memory,))
    ref_scores, ref_indices = logits.max(-1).values.topk(300, dim=1)
    ok = torch.equal(indices, ref_indices) and torch.equal(scores, ref_scores) and torch.equal(
        gathered, memory.gather(1, ref_indices.unsqueeze(-1).expand(-1, -1, 256)))
    failures += not ok
    print(f"topk_select     cpu  reference {'ok  ' if ok else 'FAIL'} indices, scores and gather equal to torch.topk (8400x80, k=300)")
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rtdetr_kernels")
    parser.add_argument("command", choices=["info", "check"], nargs="?", default="info")
    args = parser.parse_args(argv)
    if args.command == "info":
        print(info())
        return 0
    return check()


if __name__ == "__main__":
    sys.exit(main())
