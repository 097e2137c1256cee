"""bench/ratios.py: the tables the notes quote are computed from the benchmark JSON as documented."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = {"case": "decoder640", "N": 1, "Lq": 300, "S": 8400, "M": 8, "D": 32, "L": 3, "P": 4}


def _bench(provider, mode, median_ms, min_ms, **extra):
    info = dict(op="ms_deform_attn", provider=provider, mode=mode, dtype="float32", shape=SHAPE, device="cpu (test)",
                median_ms=median_ms, min_ms=min_ms, **extra)
    return {"stats": {"median": median_ms / 1e3, "min": min_ms / 1e3}, "extra_info": info}


def _run(tmp_path, benchmarks, *args):
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"benchmarks": benchmarks}))
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "ratios.py"), str(path), *args],
                         capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line.startswith("| decoder640")]


def test_tables(tmp_path):
    paired = _bench("cpu", "forward", 0.5, 0.4, kind="paired", anchor="reference-grid-sample", rounds=90,
                    paired_ratio_median=5.5, paired_ratio_p10=4.75, paired_ratio_of_mins=6.0, ours_min_ms=0.4,
                    anchor_min_ms=2.4)
    rows = _run(tmp_path, [
        _bench("cpu", "forward", 0.5, 0.4),
        _bench("reference-grid-sample", "forward", 4.0, 2.0),
        _bench("cpu", "forward+backward", 3.0, 2.5, peak_mem_mb=8.0),
        _bench("reference-grid-sample", "forward+backward", 12.0, 10.0, peak_mem_mb=20.0),
        paired,
    ])
    assert "| decoder640 N=1 Lq=300 | float32 | forward | cpu vs reference-grid-sample | 0.500 | 4.000 | 8.00x |" in rows
    assert "| decoder640 N=1 Lq=300 | float32 | forward+backward | cpu vs reference-grid-sample | 3.000 | 12.000 | 4.00x |" in rows
    # the paired entry neither overwrites the per-provider time nor adds a row to that table
    assert sum("| forward | cpu vs reference-grid-sample |" in r for r in rows) == 2
    assert "| decoder640 N=1 Lq=300 | float32 | forward | cpu vs reference-grid-sample | 0.400 | 2.400 | 5.50x | 4.75x | 90 |" in rows
    assert "| decoder640 N=1 Lq=300 | float32 | cpu vs reference-grid-sample | 8.0 | 20.0 | 0.40 |" in rows


def test_min_statistic(tmp_path):
    rows = _run(tmp_path, [_bench("cpu", "forward", 0.5, 0.25), _bench("reference-grid-sample", "forward", 4.0, 2.0)],
                "--stat", "min")
    assert rows == ["| decoder640 N=1 Lq=300 | float32 | forward | cpu vs reference-grid-sample | 0.250 | 2.000 | 8.00x |"]
