"""Test configuration shared by every test file.

Triton kernels run on CPU tensors under the interpreter when no GPU is visible; the variable has
to be set before triton is first imported, hence here at collection time.
"""

import os

import pytest

if os.environ.get("RTDETR_TEST_NO_INTERPRETER", "0") != "1":
    try:
        import torch

        _has_gpu = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        _has_gpu = False
    if not _has_gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
    yield
