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
        lines.append(f"extension rtdetr_kernels._C: built, {cuda}; CPU kernels: {ext.CPU_ISA} build")
        for op in backends.extension_ops():
            keys = [key for key in ("CPU", "CUDA") if torch._C._dispatch_has_kernel_for_dispatch_key(op, key)]
            lines.append(f"  {op}: kernels for {', '.join(keys) or 'no device'}")
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
    """Every op's representative call (its ``cases.sample()``) on every usable backend, float32,
    against the float64 reference: outputs and gradients; and the reference against the op's
    independent oracle (nn.MultiheadAttention, torch.topk, grid_sample)."""
    from ._cases import compare, run_sample, sample_call, tensors

    failures = 0
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for op in backends.registered_ops():
        sample = backends.op_definition(op).cases().sample()
        print(f"{op}: {sample.description}")
        for device in devices:
            expected = run_sample(sample, "reference", torch.float64, device)
            if sample.oracle is not None:
                args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in sample.args]
                oracle = [t.detach().cpu() for t in tensors(sample.oracle(*args))]
                oracle = [t.double() if t.is_floating_point() else t for t in oracle]
                errors = compare(oracle, expected[:len(oracle)])
                ok = max(errors, default=0.0) < 1e-10  # float64 against float64
                failures += not ok
                print(f"  {device:<4} reference {'ok  ' if ok else 'FAIL'} vs oracle (float64): max rel err {max(errors, default=0.0):.1e}")
            for backend in backends.implemented_backends(op):
                if backend == "reference":
                    continue
                reason = backends.why_not(backend, sample_call(op, sample, device, torch.float32))
                if reason is not None:
                    print(f"  {device:<4} {backend:<9} skipped: {reason}")
                    continue
                errors = compare(run_sample(sample, backend, torch.float32, device), expected)
                ok = max(errors) < 1e-4  # float32 against a float64 reference, relative to the largest entry
                failures += not ok
                print(f"  {device:<4} {backend:<9} {'ok  ' if ok else 'FAIL'} float32 vs float64 reference, max rel err "
                      f"(outputs and grads): {', '.join(f'{e:.1e}' for e in errors)}")
    return 1 if failures else 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["demo"]:  # the demo has its own options: python -m rtdetr_kernels demo --help
        from .demo import main as demo_main
        return demo_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m rtdetr_kernels")
    parser.add_argument("command", choices=["info", "check", "demo"], nargs="?", default="info")
    args = parser.parse_args(argv)
    if args.command == "info":
        print(info())
        return 0
    return check()


if __name__ == "__main__":
    sys.exit(main())
