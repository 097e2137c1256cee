"""Small helpers shared by the ops' torch.library registrations."""

from __future__ import annotations

from typing import Callable

import torch

NAMESPACE = "rtdetr_kernels"
if not __name__.startswith(NAMESPACE + "."):  # see __init__.py: the ops are defined by rtdetr_kernels alone
    raise ImportError(f"{__file__} belongs to the 'rtdetr_kernels' package and cannot be imported as {__name__!r}; "
                      "import rtdetr_kernels")
_IMPL_LIB = torch.library.Library(NAMESPACE, "IMPL")


def register_autocast_policy(op_name: str, cast_args: Callable[[str, tuple], tuple]) -> None:
    """Register an Autocast kernel for ``rtdetr_kernels::<op_name>`` on CPU and CUDA.

    ``torch.library.register_autocast`` casts every floating input to one dtype; our ops need a
    policy per argument (for example MSDA casts ``value`` to the autocast dtype but keeps the
    sampling locations in float32). ``cast_args(device_type, args)`` returns the new arguments.
    """
    op = getattr(getattr(torch.ops, NAMESPACE), op_name).default
    for device_type in ("cuda", "cpu"):
        key_name = "Autocast" + ("CUDA" if device_type == "cuda" else "CPU")
        key = getattr(torch._C.DispatchKey, key_name)

        def kernel(*args, _key=key, _device_type=device_type):
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_key)):
                return op(*cast_args(_device_type, args))

        _IMPL_LIB.impl(op_name, kernel, key_name)


def autocast_dtype(device_type: str) -> torch.dtype:
    if hasattr(torch, "get_autocast_dtype"):
        return torch.get_autocast_dtype(device_type)
    return torch.get_autocast_gpu_dtype() if device_type == "cuda" else torch.get_autocast_cpu_dtype()


def empty_grad(like: torch.Tensor) -> torch.Tensor:
    """Placeholder returned by backward ops for a gradient nobody asked for."""
    return like.new_empty(0)


class reenable_autograd:
    """Run autograd inside a custom op's implementation.

    A custom op's kernels run below the Autograd dispatch keys (grad mode off, Autograd keys
    excluded); the reference backends compute their backward by differentiating the reference,
    so they switch autograd back on for the duration of that computation.
    """

    _KEYS = [getattr(torch._C.DispatchKey, name) for name in
             ("AutogradFunctionality", "AutogradOther", "AutogradCPU", "AutogradCUDA", "AutogradNestedTensor") if hasattr(torch._C.DispatchKey, name)]

    def __enter__(self):
        self._excluded = [torch._C._dispatch_tls_is_dispatch_key_excluded(k) for k in self._KEYS]
        for key in self._KEYS:
            torch._C._dispatch_tls_set_dispatch_key_excluded(key, False)
        self._grad = torch.enable_grad()
        self._grad.__enter__()
        return self

    def __exit__(self, *exc):
        self._grad.__exit__(*exc)
        for key, was in zip(self._KEYS, self._excluded):
            torch._C._dispatch_tls_set_dispatch_key_excluded(key, was)
        return False
