"""Test configuration shared by every test file.

Triton kernels run on CPU tensors under the interpreter when no GPU is visible; the variable has
to be set before triton is first imported, hence here at collection time.
"""

import os

import pytest

# cuBLAS raises under torch.use_deterministic_algorithms(True) unless its workspace is fixed; the
# determinism tests need it, and it must be set before the first CUDA context.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

if os.environ.get("RTDETR_TEST_NO_INTERPRETER", "0") != "1":
    try:
        import torch

        _has_gpu = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        _has_gpu = False
    if not _has_gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        from rtdetr_kernels.backends import triton_interpreter  # imports no triton

        if triton_interpreter():
            # every interpreted load/store/atomic must stay inside its launch's tensors
            import triton_bounds

            triton_bounds.install()


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
    yield



def _forbid_op_redefinition():
    """Fail loudly where an ``rtdetr_kernels::`` op is defined a second time (torch would replace it and
    leave the first definition's handles dangling; see kernels/__init__.py)."""
    try:
        from torch._library import custom_ops
    except Exception:  # pragma: no cover
        return
    original = getattr(custom_ops, "get_library_allowing_overwrite", None)
    if original is None or getattr(original, "_rtdetr_guard", False):
        return

    def guarded(namespace, name):
        if namespace == "rtdetr_kernels" and f"{namespace}::{name}" in custom_ops.OPDEF_TO_LIB:
            raise RuntimeError(f"rtdetr_kernels::{name} is being defined a second time (is the package imported "
                               "under two names?)")
        return original(namespace, name)

    guarded._rtdetr_guard = True
    custom_ops.get_library_allowing_overwrite = guarded


_forbid_op_redefinition()
