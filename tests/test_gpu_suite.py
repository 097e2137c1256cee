"""The GPU suite's own logic, without a GPU: bench/gpu_suite.sh --dry-run, collect_results.py, report.py."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(REPO, "bench", "gpu_suite.sh")

needs_bash = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", os.path.join(REPO, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


collect_results = _load("collect_results")
report = _load("report")


def _suite(*args, timeout=120):
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(["bash", SUITE, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------------------------
# the dry run end to end
# --------------------------------------------------------------------------------------------


@needs_bash
def test_dry_run_end_to_end(tmp_path):
    out = tmp_path / "run"
    proc = _suite("--dry-run", "--out", str(out), "--budget", "1h30m")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout
    assert "all 10 checks passed" in proc.stdout
    assert "duration parsing (--budget 1h30m = 5400s)" in proc.stdout
    for name in ("results.json", "summary.md", "env.json", "junit.xml", "bench.json", "steps.tsv"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert results["dry_run"] is True and results["ok"] is True
    assert results["tests"]["summary"]["passed"] == 3 and results["tests"]["summary"]["skipped"] == 2
    items = {i["name"]: i for i in results["benchmarks"]["items"]}
    assert items["test_msda_fwd[cuda]"]["ratios"]["speedup_vs_baseline"] == pytest.approx(4.0)
    assert [s["tool"] for s in results["sanitizer"]] == ["memcheck", "racecheck"]
    assert results["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert results["git"]["source_hash"]
    summary = (out / "summary.md").read_text()
    assert "(dry run)" in summary and "| memcheck | ok | 0 |" in summary and "4.00x" in summary


@needs_bash
@pytest.mark.parametrize("args, message", [
    (("--core-only", "--bench-only"), "exclude each other"),
    (("--budget", "5parsecs"), "--budget: expected a duration"),
    (("--budget",), "--budget needs a value"),
    (("--frobnicate",), "unknown argument"),
])
def test_bad_arguments_are_refused(args, message):
    proc = _suite(*args, timeout=30)
    assert proc.returncode == 2
    assert message in proc.stderr


@needs_bash
def test_help():
    proc = _suite("--help", timeout=30)
    assert proc.returncode == 0
    for flag in ("--out", "--budget", "--core-only", "--bench-only", "--dry-run"):
        assert flag in proc.stdout


# --------------------------------------------------------------------------------------------
# collect_results.py
# --------------------------------------------------------------------------------------------

JUNIT = textwrap.dedent("""\
    <?xml version="1.0" encoding="utf-8"?>
    <testsuites><testsuite name="pytest" errors="1" failures="1" skipped="2" tests="6" time="12.5">
    <testcase classname="tests.test_msda" name="test_fwd[cuda-cuda]" time="1.25"/>
    <testcase classname="tests.test_msda" name="test_bwd[cuda-cuda]" time="2.0"><failure message="AssertionError: mismatch">trace</failure></testcase>
    <testcase classname="tests.test_msda" name="test_fwd[cuda-triton]" time="0"><skipped type="pytest.skip" message="triton: not written">s</skipped></testcase>
    <testcase classname="tests.test_msda" name="test_odd" time="0"><skipped type="pytest.xfail" message="known">x</skipped></testcase>
    <testcase classname="tests.test_build" name="test_import" time="0"><error message="fixture failed">e</error></testcase>
    <testcase classname="tests.test_build" name="test_ok" time="0.5"/>
    </testsuite></testsuites>
    """)


def test_parse_junit_counts_and_cases(tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text(JUNIT)
    parsed = collect_results.parse_junit(str(path))
    assert parsed["summary"] == {"passed": 2, "failed": 1, "errors": 1, "skipped": 1, "xfailed": 1,
                                 "total": 6, "time_s": 12.5}
    by_name = {c["name"]: c for c in parsed["cases"]}
    assert by_name["test_bwd[cuda-cuda]"]["outcome"] == "failed"
    assert by_name["test_bwd[cuda-cuda]"]["message"] == "AssertionError: mismatch"
    assert by_name["test_bwd[cuda-cuda]"]["id"] == "tests/test_msda.py::test_bwd[cuda-cuda]"
    assert by_name["test_fwd[cuda-triton]"]["message"] == "triton: not written"
    assert by_name["test_fwd[cuda-cuda]"]["time_s"] == 1.25
    line = collect_results.junit_line(parsed["summary"])
    assert line.startswith("passed 2, failed 1, errors 1, skipped 1 (total 6")


@pytest.mark.parametrize("text, rc, status, errors, warnings", [
    ("========= COMPUTE-SANITIZER\n========= ERROR SUMMARY: 0 errors\n", 0, "ok", 0, None),
    ("========= Invalid __global__ read of size 4 bytes\n=========     at msda_fwd+0x1a0\n"
     "========= ERROR SUMMARY: 2 errors\n", 86, "failed", 2, None),
    ("========= ERROR SUMMARY: 0 errors\n", 1, "failed", 0, None),  # the program itself failed
    ("========= RACECHECK SUMMARY: 3 hazards displayed (1 errors, 2 warnings)\n", 0, "failed", 1, 2),
    ("========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n", 0, "ok", 0, 0),
    ("Traceback ...\nRuntimeError: CUDA error: an illegal memory access\n", 1, "no-summary", None, None),
])
def test_parse_sanitizer_log(tmp_path, text, rc, status, errors, warnings):
    path = tmp_path / "memcheck.log"
    path.write_text(text)
    parsed = collect_results.parse_sanitizer_log(str(path), rc)
    assert (parsed["status"], parsed["errors"], parsed["warnings"]) == (status, errors, warnings)
    if errors == 2:
        assert parsed["first_errors"] == ["========= Invalid __global__ read of size 4 bytes"]


def _bench(name, group, median, backend=None, extra=None):
    return {"name": name, "fullname": f"bench/test_x.py::{name}", "group": group,
            "params": {"backend": backend} if backend else {}, "extra_info": extra or {},
            "stats": {"min": median * 0.9, "max": median * 1.2, "mean": median * 1.05, "stddev": median * 0.01,
                      "median": median, "iqr": median * 0.02, "rounds": 10, "ops": 1 / median, "data": [median] * 10}}


def test_bench_items_ratios():
    data = {"benchmarks": [
        _bench("fwd[reference]", "fwd", 8e-3, "reference"),
        _bench("fwd[triton]", "fwd", 2e-3, "triton", {"speedup_vs_compiled": 1.7, "note": "x"}),
        _bench("fwd[cuda]", "fwd", 1e-3, "cuda"),
        _bench("bwd[cuda]", "bwd", 3e-3, "cuda"),  # a group without a baseline: no computed ratio
        _bench("loose", None, 1e-3),
    ]}
    items = {i["name"]: i for i in collect_results.bench_items(data, "test_x")}
    assert items["fwd[cuda]"]["ratios"]["speedup_vs_baseline"] == pytest.approx(8.0)
    assert items["fwd[cuda]"]["ratios"]["baseline"] == "fwd[reference]"
    assert items["fwd[triton]"]["ratios"]["speedup_vs_baseline"] == pytest.approx(4.0)
    assert items["fwd[triton]"]["ratios"]["speedup_vs_compiled"] == 1.7
    assert "note" not in items["fwd[triton]"]["ratios"]
    assert items["fwd[reference]"]["baseline"] is True
    assert "speedup_vs_baseline" not in items["bwd[cuda]"]["ratios"]
    assert items["fwd[cuda]"]["median_s"] == 1e-3 and items["fwd[cuda]"]["rounds"] == 10
    assert items["loose"]["source"] == "test_x"


def test_read_steps_keeps_the_latest_run_of_a_step(tmp_path):
    path = tmp_path / "steps.tsv"
    path.write_text("build\tok\t0\t95\tlogs/build.log\tpip-editable\n"
                    "tests\tfailed\t1\t300\tlogs/tests.log\tpassed 10, failed 1\n"
                    "build\treused\t0\t2\tlogs/build.log\treused\n")
    steps = collect_results.read_steps(str(path))
    assert [(s["name"], s["status"], s["seconds"]) for s in steps] == [("tests", "failed", 300.0), ("build", "reused", 2.0)]
    assert steps[0]["rc"] == 1 and steps[0]["detail"] == "passed 10, failed 1"


def test_collect_reports_failures(tmp_path):
    out = tmp_path
    (out / "sanitizer").mkdir()
    (out / "bench").mkdir()
    (out / "env.json").write_text(json.dumps({
        "date": "2026-11-20T10:00:00+00:00", "device": {"name": "NVIDIA H100 80GB HBM3", "capability": "9.0"},
        "versions": {"torch": "2.11.0", "triton": "3.6.0", "driver": "580.159.04", "cuda_toolkit": "13.0",
                     "torch_cuda": "13.0", "python": "3.12.3"},
        "git": {"commit": "abc123", "source_hash": "f00"}}))
    (out / "junit.xml").write_text(JUNIT)
    (out / "sanitizer" / "memcheck.log").write_text("========= Invalid __global__ write\n========= ERROR SUMMARY: 1 error\n")
    (out / "sanitizer" / "memcheck.cases.json").write_text(json.dumps({
        "summary": {"ok": 3, "error": 1, "skipped": 0, "unusable": 0},
        "cases": [{"id": "ms_deform_attn/cuda-x", "status": "error", "error": "RuntimeError: CUDA error"}],
        "uncovered_ops": ["topk_select"]}))
    (out / "sanitizer" / "racecheck.log").write_text("========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n")
    (out / "bench" / "test_msda.json").write_text(json.dumps({"benchmarks": [_bench("a[reference]", "g", 4e-3, "reference"),
                                                                            _bench("a[cuda]", "g", 1e-3, "cuda")]}))
    (out / "steps.tsv").write_text("build\tok\t0\t60\tlogs/build.log\tpip-editable\n"
                                   "tests\tfailed\t1\t200\tlogs/tests.log\t\n"
                                   "sanitizer-memcheck\tfailed\t86\t90\tsanitizer/memcheck.log\t\n"
                                   "sanitizer-racecheck\tok\t0\t80\tsanitizer/racecheck.log\t\n")
    results = collect_results.collect(str(out))
    assert results["ok"] is False
    assert results["problems"] == ["step tests", "step sanitizer-memcheck", "tests failed", "sanitizer memcheck"]
    memcheck = next(s for s in results["sanitizer"] if s["tool"] == "memcheck")
    assert memcheck["errors"] == 1 and memcheck["rc"] == 86 and memcheck["uncovered_ops"] == ["topk_select"]
    assert memcheck["case_failures"][0]["id"] == "ms_deform_attn/cuda-x"
    assert results["device"]["name"] == "NVIDIA H100 80GB HBM3"
    # raw rounds are left in bench.json, not copied into results.json
    assert "data" not in json.dumps(results["benchmarks"])
    assert len(json.loads((out / "bench.json").read_text())["benchmarks"]) == 2
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["tests"]["summary"]["failed"] == 1
    summary = (out / "summary.md").read_text()
    assert "PROBLEMS: step tests" in summary
    assert "failed: `tests/test_msda.py::test_bwd[cuda-cuda]`" in summary
    assert "| memcheck | failed | 1 |" in summary
    assert "| a[cuda] | g | 1 ms | 4.00x |" in summary


def test_slugify():
    assert collect_results.slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert collect_results.slugify("") == "unknown"


# --------------------------------------------------------------------------------------------
# report.py
# --------------------------------------------------------------------------------------------


def _results(date, name, dry=False, items=True):
    return {"schema": 1, "date": date, "dry_run": dry, "device": {"name": name},
            "versions": {"torch": "2.11.0", "triton": "3.6.0", "driver": "580", "torch_cuda": "13.0"},
            "git": {"commit": "0123456789abcdef"},
            "benchmarks": {"items": [
                {"name": "fwd[reference]", "group": "msda fwd", "median_s": 2e-3, "ratios": {"speedup_vs_baseline": 1.0}},
                {"name": "fwd[cuda]", "group": "msda fwd", "median_s": 2.5e-4, "ratios": {"speedup_vs_baseline": 8.0}},
            ]} if items else None,
            "e2e": {"rows": [{"model": "r50", "batch": 1, "speedup": 1.2345, "nested": {"x": 1}}]} if items else None}


def _write_results(root, folder, data):
    os.makedirs(root / folder, exist_ok=True)
    (root / folder / "results.json").write_text(json.dumps(data))


def test_report_picks_the_latest_real_run(tmp_path):
    _write_results(tmp_path, "2026-11-01-nvidia-h100", _results("2026-11-01T00:00:00", "H100 old"))
    _write_results(tmp_path, "2026-11-05-nvidia-h200", _results("2026-11-05T00:00:00", "H200 new"))
    _write_results(tmp_path, "2026-11-09-cpu", _results("2026-11-09T00:00:00", "dry", dry=True))
    _write_results(tmp_path, "2026-11-10-nvidia-h100", _results("2026-11-10T00:00:00", "core only", items=False))
    path, data = report.find_latest(str(tmp_path))
    assert data["device"]["name"] == "H200 new"
    _, data = report.find_latest(str(tmp_path), include_dry_run=True)
    assert data["device"]["name"] == "dry"
    assert report.find_latest(str(tmp_path / "nothing")) is None


def test_report_markdown_and_readme(tmp_path):
    table = report.render_markdown(_results("2026-11-05T12:00:00", "NVIDIA H200"))
    assert "Measured on **NVIDIA H200** on 2026-11-05" in table
    assert "commit 0123456789" in table
    assert "| msda fwd | fwd[cuda] | 250 us | 8.00x |" in table
    assert "| model | batch | speedup |" in table and "| r50 | 1 | 1.234 |" in table
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{report.START}\nold\n{report.END}\n\nafter\n")
    assert report.update_readme(str(readme), table) is True
    text = readme.read_text()
    assert "old" not in text and text.endswith(f"{report.END}\n\nafter\n") and "fwd[cuda]" in text
    assert report.update_readme(str(readme), table) is False  # idempotent
    bare = tmp_path / "BARE.md"
    bare.write_text("# no markers\n")
    with pytest.raises(SystemExit, match="lacks the markers"):
        report.update_readme(str(bare), table)


def test_report_cli_and_charts(tmp_path, capsys, monkeypatch):
    _write_results(tmp_path, "2026-11-05-nvidia-h200", _results("2026-11-05T00:00:00", "NVIDIA H200"))
    assert report.main(["--root", str(tmp_path)]) == 0
    assert "fwd[reference]" in capsys.readouterr().out
    try:
        import matplotlib  # noqa: F401

        have_mpl = True
    except ImportError:
        have_mpl = False
    if have_mpl:
        written = report.write_charts(_results("2026-11-05T00:00:00", "NVIDIA H200"), str(tmp_path / "png"))
        assert [os.path.basename(p) for p in written] == ["msda-fwd.png"]
        assert (tmp_path / "png" / "msda-fwd.png").read_bytes()[:4] == b"\x89PNG"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails -> skipped with a message
    assert report.write_charts(_results("2026-11-05T00:00:00", "x"), str(tmp_path / "none")) == []
    assert "matplotlib is not installed" in capsys.readouterr().err
