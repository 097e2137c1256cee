"""The GPU run's own logic, without a GPU: bench/report.py on the committed CPU results, bench/gpu_suite.py's plan,
budgets and Triton JIT count, and the order bench/conftest.py runs the benchmarks in."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_RESULTS = os.path.join(REPO, "bench", "results", "cpu-msda.json")
MODES = ("forward", "backward", "forward+backward")


def _load(name):
    sys.path.insert(0, os.path.join(REPO, "bench"))
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", os.path.join(REPO, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


report, ratios, gpu_suite = _load("report"), _load("ratios"), _load("gpu_suite")


def _block(readme_text):
    start, end = readme_text.index(report.START), readme_text.index(report.END)
    return readme_text[start + len(report.START):end].strip("\n")


def _table(block):
    """{(case, dtype, ours): {column: cell}} of the Markdown table in a README block."""
    lines = [line for line in block.splitlines() if line.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = dict(zip(head, (c.strip() for c in line.strip("|").split("|"))))
        rows[(cells["case"], cells["dtype"], cells["ours"])] = cells
    return rows


@pytest.fixture(scope="module")
def cpu_report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    readme = tmp / "README.md"
    shutil.copy(os.path.join(REPO, "README.md"), readme)
    results, block = report.report(CPU_RESULTS, str(tmp / "out"), str(readme))
    return tmp, readme, results, block


def test_readme_table_has_the_speedups_ratios_computes(cpu_report):
    _, readme, _, _ = cpu_report
    table = _table(_block(readme.read_text()))
    _, groups = ratios.load(CPU_RESULTS, "min")
    expected = {}
    for case, dtype, mode, what, _, _, ratio in ratios.rows(groups):
        ours, anchor = what.split(" vs ")
        expected[(case, dtype, ours, report.ANCHOR_LABELS[anchor], mode)] = ratio
    # the run's 39 (case, dtype, mode) groups against grid_sample, 9 against its compiled form, 21 against the PyPI kernel
    assert [sum(k[3] == label for k in expected) for label in report.ANCHOR_LABELS.values()] == [39, 9, 21]
    for (case, dtype, ours, column, mode), ratio in expected.items():
        cell = table[(case, dtype, ours)][column].split(" / ")[MODES.index(mode)]
        assert cell == f"{ratio:.2f}x", (case, dtype, mode, column)
        assert math.isfinite(ratio) and ratio > 0
    # every (case, dtype) of the CPU run has its speedup against grid_sample in every mode: none missing
    assert len(table) == 13
    for row in table.values():
        assert re.fullmatch(r"[\d.]+x / [\d.]+x / [\d.]+x", row["vs grid_sample"]), row


def test_readme_markers_replaced_and_rest_kept(cpu_report):
    _, readme, _, block = cpu_report
    text, original = readme.read_text(), open(os.path.join(REPO, "README.md")).read()
    assert _block(text) == block.strip("\n")
    assert text[:text.index(report.START)] == original[:original.index(report.START)]
    assert text[text.index(report.END):] == original[original.index(report.END):]
    assert "cpu (x86_64, 2 threads)" in block and "CPU run" in block and "commit 16f1cb2" in block


def test_results_folder(cpu_report):
    tmp, _, results, _ = cpu_report
    out = tmp / "out"
    written = json.loads((out / "results.json").read_text())
    assert written["device"] == "cpu (x86_64, 2 threads)" and written["commit"]["id"].startswith("16f1cb2")
    assert written["date"].startswith("2026-12-01") and written["statistic"] == "min"
    assert written["versions"]["python"] == "3.11.7"
    _, groups = ratios.load(CPU_RESULTS, "min")
    assert len(written["speedups"]) == len(ratios.rows(groups))
    assert all(isinstance(r["speedup"], float) and r["speedup"] > 0 for r in written["speedups"])
    assert len(written["paired"]) == len(ratios.paired(CPU_RESULTS)) > 0
    summary = (out / "summary.md").read_text()
    assert "\n".join(ratios.tables(CPU_RESULTS, "min")) in summary
    for dtype in ("float32", "float16", "bfloat16"):
        png = (out / f"speedup-{dtype}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_committed_readme_is_the_report_of_its_source(tmp_path, monkeypatch):
    """The README block names its source; rendering that source again gives the committed block."""
    block = _block(open(os.path.join(REPO, "README.md")).read())
    source = re.search(r"Source: `([^`]+)`", block).group(1)
    out = re.search(r"all tables: `([^`]+)/summary.md`", block).group(1)
    monkeypatch.chdir(REPO)  # the block's paths are relative to the README's folder
    _, rendered = report.report(source, str(tmp_path / "out"))
    assert rendered.replace(os.path.relpath(tmp_path / "out", REPO), out) == block


def test_gpu_run_files_are_read(tmp_path):
    """steps.json as the driver writes it, a JUnit XML that pytest wrote, compute-sanitizer's summary lines."""
    (tmp_path / "test_sample.py").write_text("def test_ok():\n    pass\n\ndef test_bad():\n    assert False\n")
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_sample.py"),
                    f"--junit-xml={tmp_path / 'junit.xml'}"], capture_output=True, cwd=tmp_path)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "sanitizer-memcheck.log").write_text(
        "========= COMPUTE-SANITIZER\n========= ERROR SUMMARY: 2 errors\n")
    (tmp_path / "logs" / "sanitizer-racecheck.log").write_text(
        "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n")
    entry = gpu_suite.run_step(gpu_suite.Step("tests", [sys.executable, "-c", "print('hi')"], 0), 30, str(tmp_path))
    gpu_suite.record(str(tmp_path), entry)
    results, block = report.report(str(tmp_path))
    run = results["run"]
    assert run["tests"]["tests"] == 2 and run["tests"]["failures"] == 1
    assert run["tests"]["failed"] == ["test_sample::test_bad"]
    assert run["sanitizer"]["memcheck"]["errors"] == 2 and run["sanitizer"]["racecheck"]["errors"] == 0
    assert [s["name"] for s in run["steps"]] == ["tests"] and run["steps"][0]["status"] == "ok"
    assert "No benchmark results" in block
    summary = (tmp_path / "summary.md").read_text()
    assert "| tests | ok |" in summary and "- failed: test_sample::test_bad" in summary


def test_run_records_steps_jit_count_and_failures(tmp_path):
    """The driver's loop on stand-in steps: statuses, the JIT count of the tests step, a failing sanitizer."""
    cache, out = tmp_path / "cache", tmp_path / "out"
    compile_one = f"import os; os.makedirs('{cache}/H1'); open('{cache}/H1/__grp__msda_fwd.json', 'w').write('{{}}')"
    sanitizer = "print('========= ERROR SUMMARY: 1 error'); raise SystemExit(86)"
    steps = [gpu_suite.Step(name, [sys.executable, "-c", code], 0) for name, code in
             (("build", "pass"), ("tests", compile_one), ("sanitizer-memcheck", sanitizer))]
    bench = [gpu_suite.Step("bench", [sys.executable, "-c", "raise SystemExit('must not run')"], 0)]
    ok = gpu_suite.run({"core": lambda: steps, "bench": lambda: bench}, {"core": 120, "bench": 0}, str(out), str(cache))
    assert ok is False
    recorded = json.loads((out / "steps.json").read_text())
    assert [(s["name"], s["status"], s["rc"]) for s in recorded] == [("build", "ok", 0), ("tests", "ok", 0),
                                                                        ("sanitizer-memcheck", "failed", 86)]
    assert recorded[1]["triton_jit"] == {"msda_fwd": 1} and "1 Triton JIT compilations" in recorded[1]["detail"]
    assert all(s["timeout_s"] <= 120 - gpu_suite.REPORT_S - gpu_suite.GRACE_S for s in recorded)
    results, _ = report.report(str(out))
    assert results["run"]["sanitizer"]["memcheck"]["errors"] == 1


def test_dry_run_plan(capsys):
    assert gpu_suite.main(["--dry-run", "--out", "/tmp/gpu-plan"]) == 0
    plan = capsys.readouterr().out
    steps = re.findall(r"^  (\S+) \(ends by (\d+) s\): (.*)$", plan, re.M)
    assert [s[0] for s in steps] == ["build", "tests", "sanitizer-memcheck", "sanitizer-racecheck"] + \
        (["build"] if not gpu_suite.build_is_current() else []) + ["bench"]
    commands = {name: command for name, _, command in steps}
    assert "TORCH_CUDA_ARCH_LIST=<this GPU's capability> FORCE_CUDA=1" in commands["build"]
    assert commands["build"].endswith("setup.py build_ext --inplace")
    assert "-m pytest tests" in commands["tests"] and "--junit-xml=/tmp/gpu-plan/junit.xml" in commands["tests"]
    assert "TRITON_CACHE_DIR=" in commands["tests"]
    for tool in ("memcheck", "racecheck"):
        assert f"compute-sanitizer --tool {tool}" in commands[f"sanitizer-{tool}"]
        assert "bench/sanitize_cases.py --backend cuda,triton" in commands[f"sanitizer-{tool}"]
    assert "-m pytest bench" in commands["bench"] and "--benchmark-json=/tmp/gpu-plan/bench.json" in commands["bench"]
    assert "RTDETR_BENCH_BUDGET_S=" in commands["bench"]
    assert re.search(r"^report: .*bench/report.py /tmp/gpu-plan$", plan, re.M)
    core_ends = [int(end) for _, end, _ in steps[:4]]
    assert core_ends == sorted(core_ends) and core_ends[-1] <= 7 * 60 - gpu_suite.REPORT_S


def test_core_and_bench_only_plans(capsys):
    gpu_suite.main(["--dry-run", "--core-only"])
    assert "bench (budget" not in capsys.readouterr().out
    gpu_suite.main(["--dry-run", "--bench-only", "--bench-budget", "4m"])
    plan = capsys.readouterr().out
    assert "core (budget" not in plan and "bench (budget 240 s)" in plan
    with pytest.raises(SystemExit):
        gpu_suite.main(["--dry-run", "--core-only", "--bench-only"])


def test_sanitize_cases_accepts_the_flags_the_driver_passes():
    help_text = subprocess.run([sys.executable, os.path.join(REPO, "bench", "sanitize_cases.py"), "--help"],
                               capture_output=True, text=True, check=True).stdout
    for flag in [a for a in gpu_suite.SANITIZE if a.startswith("-")] + ["--json"]:
        assert flag in help_text


@pytest.mark.parametrize("text, seconds", [("7m", 420), ("90s", 90), ("1m30s", 90), ("1h", 3600), ("300", 300)])
def test_parse_duration(text, seconds):
    assert gpu_suite.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "7x", "m7", "1.5m", "-5", "7m "])
def test_parse_duration_refuses(text):
    with pytest.raises(Exception):
        gpu_suite.parse_duration(text)


def test_deadlines_keep_each_later_steps_reserve():
    steps = [gpu_suite.Step(name, [], reserve) for name, reserve in (("a", 0), ("b", 100), ("c", 50))]
    last = 420 - gpu_suite.REPORT_S - gpu_suite.GRACE_S
    assert gpu_suite.deadlines(steps, 420) == [last - 150, last - 50, last]


def test_step_timeout_stops_the_step(tmp_path):
    step = gpu_suite.Step("slow", [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"], 0)
    (tmp_path / "logs").mkdir()
    entry = gpu_suite.run_step(step, 10, str(tmp_path))
    assert entry["status"] == "timeout" and entry["seconds"] < 10 + gpu_suite.GRACE_S + 5
    assert "started" in (tmp_path / entry["log"]).read_text()
    assert gpu_suite.run_step(step, 5, str(tmp_path))["status"] == "skipped"  # too little time left to start


def test_triton_jit_count_on_this_triton(tmp_path):
    """Compile one kernel for two dtypes, for sm_90, into a fresh cache: two compilations counted."""
    pytest.importorskip("triton")
    code = """
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

@triton.jit
def copy_kernel(x, y, n):
    i = tl.program_id(0) * 64 + tl.arange(0, 64)
    tl.store(y + i, tl.load(x + i, mask=i < n), mask=i < n)

for dtype in ("fp32", "fp16"):  # no constexpr: ASTSource's argument for them changed between triton versions
    source = ASTSource(fn=copy_kernel, signature={"x": "*" + dtype, "y": "*" + dtype, "n": "i32"})
    triton.compile(source, target=GPUTarget("cuda", 90, 32))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    (tmp_path / "compile_two.py").write_text(code)  # triton.jit reads the kernel's source file
    subprocess.run([sys.executable, str(tmp_path / "compile_two.py")], env=env, check=True, capture_output=True,
                   timeout=300)
    assert gpu_suite.count_triton_jit(str(tmp_path / "cache")) == {"copy_kernel": 2}


def test_benchmarks_run_each_group_together():
    """bench/conftest.py's order: the first benchmarks are ours and an anchor of one (dtype, case, mode)."""
    out = subprocess.run([sys.executable, "-m", "pytest", "bench", "--collect-only", "-q", "-p", "no:cacheprovider"],
                         cwd=REPO, capture_output=True, text=True).stdout
    ids = re.findall(r"::test_ms_deform_attn\[(.*)\]", out)
    assert len(ids) > 50, out[-2000:]
    first_case = ids[0].split("-", 1)[1]  # e.g. forward-float32-decoder640-N1-Lq300
    assert f"reference-grid-sample-{first_case}" in ids[:8], ids[:8]
    compiled = [i for i, name in enumerate(ids) if name.startswith("reference-grid-sample-compiled")]
    assert compiled and compiled == list(range(len(ids) - len(compiled), len(ids)))
