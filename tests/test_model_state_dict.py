"""State-dict names / shapes / dtypes of the reference RT-DETR equal the official dumps.

The dumps (name, shape, dtype per line; from the project's shared/data/rtdetr_state_dict_keys) are kept
gzipped in tests/data so that the spec travels with the repository and a missing file fails the test."""
import gzip
from pathlib import Path

import pytest
import torch

import rtdetr

KEYS_DIR = Path(__file__).resolve().parent / "data" / "rtdetr_state_dict_keys"
CFGS = {"r18": "rtdetr_r18vd", "r34": "rtdetr_r34vd", "r50m": "rtdetr_r50vd_m", "r50": "rtdetr_r50vd",
        "r101": "rtdetr_r101vd"}


def _expected(prefix, short):
    path = KEYS_DIR / f"keys_{prefix}_{short}.txt.gz"
    rows = []
    for line in gzip.decompress(path.read_bytes()).decode().splitlines():
        if line.strip():
            name, shape, dtype = line.split("\t")
            rows.append((name, shape, dtype))
    return rows


def _actual(name):
    with torch.device("meta"):  # no memory, no init cost; shapes/dtypes/names only
        model = rtdetr.build_model(name)
    return [(k, str(tuple(v.shape)), str(v.dtype)) for k, v in model.state_dict().items()]


def _compare(expected, actual):
    exp_d, act_d = {r[0]: r[1:] for r in expected}, {r[0]: r[1:] for r in actual}
    missing = sorted(set(exp_d) - set(act_d))
    extra = sorted(set(act_d) - set(exp_d))
    assert not missing, f"missing keys: {missing[:20]}"
    assert not extra, f"unexpected keys: {extra[:20]}"
    bad = [(k, exp_d[k], act_d[k]) for k in exp_d if exp_d[k] != act_d[k]]
    assert not bad, f"shape/dtype mismatches: {bad[:20]}"
    assert [r[0] for r in actual] == [r[0] for r in expected], "key order differs from the official model"


@pytest.mark.parametrize("short", list(CFGS))
def test_v1_state_dict_matches_official(short):
    _compare(_expected("v1", short), _actual(CFGS[short]))


@pytest.mark.parametrize("short", list(CFGS))
def test_v1_in_v2_repo_state_dict_matches(short):
    # v1 models as defined in the rtdetrv2 repo: same naming as v1
    _compare(_expected("v1in2", short), _actual(CFGS[short]))


@pytest.mark.parametrize("short", list(CFGS))
def test_v2_state_dict_matches_official(short):
    _compare(_expected("v2", short), _actual(CFGS[short].replace("rtdetr_", "rtdetrv2_")))


def test_frozen_bn_where_official():
    with torch.device("meta"):
        r18 = rtdetr.build_model("rtdetr_r18vd")
        r50 = rtdetr.build_model("rtdetr_r50vd")
    assert not any(isinstance(m, rtdetr.FrozenBatchNorm2d) for m in r18.modules())
    assert all(not isinstance(m, torch.nn.BatchNorm2d) for m in r50.backbone.modules())
    assert isinstance(r50.encoder.input_proj[0][1], torch.nn.BatchNorm2d)


def test_unknown_config():
    with pytest.raises(ValueError, match="unknown RT-DETR config"):
        rtdetr.build_model("rtdetr_r152vd")
