#!/usr/bin/env python3
"""The GPU run (`make gpu`): build, tests on CUDA, compute-sanitizer, benchmarks, report.

    python bench/gpu_suite.py --core-only --out DIR    # build, tests, sanitizer, within --core-budget (7m)
    python bench/gpu_suite.py --bench-only --out DIR   # the benchmarks, within --bench-budget (5m)
    python bench/gpu_suite.py --dry-run                # print the plan; needs no GPU

core: `setup.py build_ext --inplace` for this GPU's arch only; pytest tests on CUDA with a JUnit XML, counting
the Triton JIT compilations in a fresh TRITON_CACHE_DIR; compute-sanitizer memcheck and racecheck over
bench/sanitize_cases.py (cuda and triton, the quick cases). bench: rebuild if csrc/ changed, then pytest bench
--benchmark-json. Then bench/report.py writes results.json, summary.md and charts into DIR. Each step must end by
a deadline that leaves the later steps their reserve; there it gets SIGINT (pytest still writes its XML/JSON),
GRACE_S later SIGKILL. Logs: DIR/logs/<step>.log; times and statuses: DIR/steps.json. The python this runs
with is the one used (no venv, no network); this checkout's kernels/ is imported as rtdetr_kernels.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRACE_S = 10  # between SIGINT and SIGKILL
REPORT_S = 30  # kept free at the end of each budget for the report
SANITIZE = ["bench/sanitize_cases.py", "--backend", "cuda,triton", "--require", "cuda,triton", "--quick"]


@dataclass
class Step:
    name: str
    argv: list
    reserve_s: float  # the least time the steps before this one leave it
    env: dict = field(default_factory=dict)
    stop_margin_s: float = 0  # > 0: RTDETR_BENCH_BUDGET_S tells it to start no benchmark this long before its timeout


def parse_duration(text):
    """'7m', '90s', '1m30s', '1h' or plain seconds -> seconds."""
    parts = re.fullmatch(r"(\d+)|(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text)
    if not text or parts is None:
        raise argparse.ArgumentTypeError(f"expected a duration like 7m, 90s or 1m30s, got {text!r}")
    plain, h, m, s = (int(p or 0) for p in parts.groups())
    return plain + h * 3600 + m * 60 + s


def deadlines(steps, budget_s):
    """Seconds after the start by which each step must end: the budget less the report's time, the kill grace
    and the reserves of the steps after it."""
    ends, later = [], 0.0
    for step in reversed(steps):
        ends.append(budget_s - REPORT_S - GRACE_S - later)
        later += step.reserve_s
    return ends[::-1]


def plan(python, arch, out, triton_cache, pytest_args=()):
    """{phase: steps}; the bench phase rebuilds only where csrc/ or setup.py changed since the last build."""
    import setup  # the one place that finds the CUDA toolkit (nvcc may be a wrapper script outside it)

    home = setup.find_cuda_home()
    sanitizer = shutil.which("compute-sanitizer") or os.path.join(home or "/usr/local/cuda", "bin", "compute-sanitizer")
    build = Step("build", [python, "setup.py", "build_ext", "--inplace"], 90,
                 {"TORCH_CUDA_ARCH_LIST": arch, "FORCE_CUDA": "1", **({"CUDA_HOME": home} if home else {})})
    tests = Step("tests", [python, "-m", "pytest", "tests", "-q", "-rs", "-p", "no:cacheprovider",
                           f"--junit-xml={out}/junit.xml", *pytest_args], 120,
                 {"RTDETR_REQUIRE_EXTENSION": "1", "RTDETR_REQUIRE_CUDA_EXTENSION": "1", "TRITON_CACHE_DIR": triton_cache})
    # each tensor its own cudaMalloc, so that memcheck sees every buffer's true bounds
    sanitize = [Step(f"sanitizer-{tool}", [sanitizer, "--tool", tool, "--error-exitcode", "86", "--print-limit", "50",
                                           python, *SANITIZE, "--json", f"{out}/logs/sanitizer-{tool}.json"], 45,
                     {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1", "TRITON_CACHE_DIR": triton_cache})
                for tool in ("memcheck", "racecheck")]
    # one benchmark (a torch.compile'd anchor) can take a minute
    bench = Step("bench", [python, "-m", "pytest", "bench", "-q", "-p", "no:cacheprovider",
                           f"--benchmark-json={out}/bench.json"], 120, stop_margin_s=60)
    return {"core": lambda: [build, tests, *sanitize], "bench": lambda: ([] if build_is_current() else [build]) + [bench]}


def build_is_current():
    built = [os.path.join(REPO, "kernels", n) for n in os.listdir(os.path.join(REPO, "kernels")) if n.startswith("_C")]
    sources = [os.path.join(d, n) for d, _, files in os.walk(os.path.join(REPO, "csrc")) for n in files]
    newest_source = max(map(os.path.getmtime, sources + [os.path.join(REPO, "setup.py")]))
    return bool(built) and newest_source < min(map(os.path.getmtime, built))


def count_triton_jit(cache):
    """{kernel name: compilations} in a Triton cache folder: each compilation leaves one __grp__<name>.json."""
    counts = {}
    for _, _, files in os.walk(cache):
        for name in files:
            if name.startswith("__grp__") and name.endswith(".json"):
                counts[name[7:-5]] = counts.get(name[7:-5], 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def run_step(step, timeout_s, out):
    """Run one step with its log in out/logs; its entry for steps.json."""
    log_path = os.path.join(out, "logs", step.name + ".log")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the tests must see the GPU
    env.update(step.env, PYTHONUNBUFFERED="1")
    if step.stop_margin_s:
        env["RTDETR_BENCH_BUDGET_S"] = str(max(10, round(timeout_s - step.stop_margin_s)))
    t0, status, rc = time.monotonic(), "skipped", None
    if timeout_s >= 10:
        with open(log_path, "w") as log:
            log.write(f"$ {shlex.join(step.argv)}\n")
            log.flush()
            try:
                proc = subprocess.Popen(step.argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
                rc = proc.wait(timeout=timeout_s)
                status = "ok" if rc == 0 else "failed"
            except OSError as exc:  # e.g. no compute-sanitizer
                log.write(f"cannot start: {exc}\n")
                status = "failed"
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGINT)
                try:
                    rc = proc.wait(timeout=GRACE_S)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    rc = proc.wait()
                status = "timeout"
    seconds = time.monotonic() - t0
    print(f"gpu_suite: {step.name}: {status} in {seconds:.0f} s (timeout {timeout_s:.0f} s, log {log_path})", flush=True)
    return {"name": step.name, "status": status, "rc": rc, "seconds": round(seconds, 1), "timeout_s": round(timeout_s),
            "command": " ".join(f"{k}={v}" for k, v in step.env.items()) + " " + shlex.join(step.argv),
            "log": os.path.relpath(log_path, out)}


def record(out, entry):
    """Add one step's entry to out/steps.json, replacing an earlier run of the same step."""
    path = os.path.join(out, "steps.json")
    steps = [s for s in (json.load(open(path)) if os.path.exists(path) else []) if s["name"] != entry["name"]]
    with open(path, "w") as f:
        json.dump(steps + [entry], f, indent=1)


def run(phases, budgets, out, triton_cache):
    """Run each phase's steps inside its budget, recording each in out/steps.json; True when every step passed."""
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    ok = True
    for phase, steps in phases.items():
        if not budgets[phase]:
            continue
        start, steps = time.monotonic(), steps()
        for step, end in zip(steps, deadlines(steps, budgets[phase])):
            entry = run_step(step, end - (time.monotonic() - start), out)
            if step.name == "tests":
                entry["triton_jit"] = jit = count_triton_jit(triton_cache)
                entry["detail"] = f"{sum(jit.values())} Triton JIT compilations of {len(jit)} kernels"
                print(f"gpu_suite: tests: {entry['detail']}: {jit}")
            record(out, entry)
            ok &= entry["status"] == "ok"
        print(f"gpu_suite: {phase} took {time.monotonic() - start:.0f} s of its {budgets[phase]} s")
    return ok


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--core-only", action="store_true")
    which.add_argument("--bench-only", action="store_true")
    parser.add_argument("--out", help="results folder (default bench/results/<UTC date>-<gpu>)")
    parser.add_argument("--core-budget", type=parse_duration, default="7m")
    parser.add_argument("--bench-budget", type=parse_duration, default="5m")
    parser.add_argument("--pytest-args", default="", help="more arguments for the tests step, e.g. '-n 4'")
    parser.add_argument("--archive", help="also pack the results folder into this .tgz")
    parser.add_argument("--dry-run", action="store_true", help="print the steps and their commands; run nothing")
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    probe = ("import json, torch; ok = torch.cuda.is_available(); print(json.dumps([torch.cuda.get_device_name(), "
             "'%d.%d' % torch.cuda.get_device_capability()] if ok else [None, None]))")
    gpu, arch = json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout)
    if arch is None and not args.dry_run:
        parser.error("no CUDA device visible to this python (--dry-run prints the plan)")
    slug = re.sub(r"[^a-z0-9]+", "-", (gpu or "no-gpu").lower()).strip("-")
    out = os.path.abspath(args.out or os.path.join(REPO, "bench", "results", f"{datetime.date.today()}-{slug}"))
    cache = "<fresh folder>" if args.dry_run else tempfile.mkdtemp(prefix="rtdetr-triton-cache-")
    sys.path.insert(0, REPO)
    phases = plan(sys.executable, arch or "<this GPU's capability>", out, cache, shlex.split(args.pytest_args))
    budgets = {"core": 0 if args.bench_only else args.core_budget, "bench": 0 if args.core_only else args.bench_budget}
    report = [sys.executable, "bench/report.py", out]
    print(f"gpu_suite: {gpu or 'no GPU'} (arch {arch}), python {sys.executable}, out {out}")
    if args.dry_run:
        for phase, steps in phases.items():
            if budgets[phase]:
                print(f"{phase} (budget {budgets[phase]} s):")
                for step, end in zip(steps(), deadlines(steps(), budgets[phase])):
                    env = [f"{k}={v}" for k, v in step.env.items()]
                    env += [f"RTDETR_BENCH_BUDGET_S=<timeout - {step.stop_margin_s:.0f}>"] if step.stop_margin_s else []
                    print(f"  {step.name} (ends by {end:.0f} s): {' '.join(env + [shlex.join(step.argv)])}")
        print(f"report: {shlex.join(report)}")
        return 0
    shim = tempfile.mkdtemp(prefix="rtdetr-shim-")  # `import rtdetr_kernels` = this checkout's kernels/
    os.symlink(os.path.join(REPO, "kernels"), os.path.join(shim, "rtdetr_kernels"))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (shim, REPO, os.environ.get("PYTHONPATH")) if p)
    ok = run(phases, budgets, out, cache)
    ok &= subprocess.run(report, cwd=REPO).returncode == 0
    if args.archive:
        with tarfile.open(args.archive, "w:gz") as tar:
            tar.add(out, arcname=os.path.basename(out))
    print(f"gpu_suite: {'ok' if ok else 'FAILED'} in {time.monotonic() - t0:.0f} s; results in {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
