"""The eager fast path's memory of validated calls: ``_C.call_signature`` (csrc/signature.cpp) encodes
exactly the metadata the ops' validation reads, and ``backends.remembered`` skips validation only for a
call whose metadata a validated call had. tests/test_op_contract.py's bad-input test runs every bad
input right after the valid call it breaks, so a bad call taken for a remembered one fails there too.
"""

from __future__ import annotations

import pytest
import torch

import helpers
from rtdetr_kernels import aifi_attention, backends, topk_select
from rtdetr_kernels.topk import topk_select_flat
from rtdetr_kernels.attention import op as attention_op
from rtdetr_kernels.topk import op as topk_op


@pytest.fixture
def signature():
    return helpers.compiled_kernel(backends._call_signature, "csrc/signature.cpp")


def test_same_metadata_same_key(signature):
    a, b = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    strided = torch.randn(4, 3, 2).permute(2, 1, 0)
    assert signature(a, None, 3, True) == signature(b, None, 3, True)
    assert signature(a) == signature(strided)  # strides are not read by validation
    assert signature(a) == signature(a.clone().requires_grad_())
    assert signature(torch.nn.Parameter(a)) == signature(a)
    assert signature([a, b]) == signature([b, a])


@pytest.mark.parametrize("other", [
    lambda a: a.double(), lambda a: a.reshape(2, 12), lambda a: a.reshape(6, 4), lambda a: a[:1],
    lambda a: a.to(torch.int64), lambda a: None, lambda a: a.unsqueeze(0),
], ids=["dtype", "dims", "shape", "size", "int-dtype", "none", "leading-1"])
def test_other_metadata_other_key(signature, other):
    a = torch.randn(2, 3, 4)
    assert signature(a) != signature(other(a))


def test_plain_values_are_encoded(signature):
    a = torch.randn(2)
    keys = {signature(a, 3), signature(a, 4), signature(a, True), signature(a, False), signature(a, None),
            signature([a]), signature((a,)), signature([a, a]), signature([])}
    assert len(keys) == 9  # all distinct: an int is not a bool, a list is not a tuple


class _Sub(torch.Tensor):
    pass


@pytest.mark.parametrize("value", [
    lambda: 1.5, lambda: "cpu", lambda: 1 << 70, lambda: object(), lambda: (t for t in [torch.randn(2)]),
    lambda: torch.randn(3).as_subclass(_Sub), lambda: [torch.randn(2), 3], lambda: {"a": 1},
], ids=["float", "str", "huge-int", "object", "generator", "subclass", "mixed-list", "dict"])
def test_anything_else_has_no_signature(signature, value):
    assert signature(torch.randn(2), value()) is None


def test_fake_tensors_have_no_signature(signature):
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake = FakeTensorMode().from_tensor(torch.randn(2, 3))
    assert signature(fake) is None


def _attention_args(L=5, E=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, L, E, generator=g), torch.randn(1, L, E, generator=g), torch.randn(3 * E, E, generator=g),
            torch.randn(3 * E, generator=g), torch.randn(E, E, generator=g), torch.randn(E, generator=g))


def _count_validate(monkeypatch, module):
    calls = []
    original = module.validate
    monkeypatch.setattr(module, "validate", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def test_a_remembered_call_skips_validation_and_an_other_one_does_not(signature, monkeypatch):
    backends._REMEMBERED.clear()
    calls = _count_validate(monkeypatch, attention_op)
    args = _attention_args()
    want = aifi_attention(*args, 4)
    assert len(calls) == 1
    got = aifi_attention(*_attention_args(seed=1)[:1], *args[1:], 4)  # other values, same metadata
    assert len(calls) == 1
    assert torch.equal(aifi_attention(*args, 4), want)
    aifi_attention(*args, 2)  # another head count
    aifi_attention(*_attention_args(L=7), 4)  # another length
    aifi_attention(*args, 4, backend="reference")  # another backend asked for
    with torch.autocast("cpu", dtype=torch.bfloat16):
        aifi_attention(*args, 4)
    assert len(calls) == 5
    assert got.shape == want.shape
    with pytest.raises(ValueError, match="num_heads"):  # a bad variant still fails, remembered neighbours or not
        aifi_attention(*args, 3)


def test_topk_forms_are_remembered_apart(signature, monkeypatch):
    backends._REMEMBERED.clear()
    calls = _count_validate(monkeypatch, topk_op)
    logits, boxes = torch.randn(1, 20, 4), torch.randn(1, 20, 4)
    topk_select(logits, 5, [boxes])
    topk_select(logits, 5, [boxes])
    assert len(calls) == 1
    topk_select(logits, 5, (boxes,))
    topk_select(logits, 6, [boxes])
    topk_select_flat(logits, 5, [boxes])
    assert len(calls) == 4
    scores, indices, gathered = topk_select(logits, 3, iter([boxes]))  # an iterable: no signature, validated
    assert len(gathered) == 1 and len(calls) == 5


def test_registering_a_record_forgets(signature):
    aifi_attention(*_attention_args(), 4)
    assert backends._REMEMBERED
    impl = backends.implementation("aifi_attention", "reference")
    backends.register(impl)
    assert not backends._REMEMBERED


def test_not_under_compile(signature):
    seen = []

    def f(x):
        seen.append(backends.remembered("aifi_attention", None, (x,)))
        return x + 1

    torch.compile(f, backend="eager", fullgraph=True)(torch.randn(3))
    assert seen == [(None, None)]
