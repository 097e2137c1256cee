#!/usr/bin/env python3
"""Assemble the GPU suite's outputs into one ``results.json`` and a short ``summary.md``.

Called by ``bench/gpu_suite.sh``; stdlib only (torch is used when importable, for the device
and version probe). Subcommands:

  env --json PATH            probe device, driver, CUDA, torch, triton, git; write PATH, print the folder slug
  junit-summary XML          print "passed N, failed N, errors N, skipped N (total N)"; exit 1 on failures/errors
  sanitizer-summary LOG      print the parsed compute-sanitizer outcome as JSON; exit 1 when it reports errors
  merge-bench OUT IN...      merge pytest-benchmark JSON files into one (benchmarks concatenated)
  collect --dir DIR          read DIR/{env.json, steps.tsv, junit.xml, bench/*.json, e2e.json,
                             sanitizer/*.log, sanitizer/*.json} and write DIR/results.json + DIR/summary.md

The layout of the results folder is described in bench/results/README.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import glob
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from typing import Any, Dict, Iterable, List, Optional, Tuple

SCHEMA_VERSION = 1
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# extra_info keys whose numeric values are copied as ratios
RATIO_KEY = re.compile(r"(ratio|speedup|vs_|_vs|x_faster)", re.I)


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


def _run(cmd: List[str], timeout: float = 30.0, cwd: Optional[str] = None) -> Optional[str]:
    """stdout+stderr of ``cmd``, or None when it is missing, fails or hangs."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    return (proc.stdout or "") + (proc.stderr or "")


def slugify(text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:48].strip("-") or "unknown"


def _read_json(path: str) -> Optional[Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def _write_json(path: str, data: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1, sort_keys=False, default=str)
        fh.write("\n")
    os.replace(tmp, path)


def _fmt_time(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    if seconds >= 1:
        return f"{seconds:.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} us"


def _md_escape(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


# --------------------------------------------------------------------------------------------
# env probe
# --------------------------------------------------------------------------------------------


def source_hash(root: str = REPO) -> str:
    """sha256 over the sources that decide the results (ties a result to code even without git)."""
    digest = hashlib.sha256()
    for top in ("kernels", "csrc", "bench", "tests", "rtdetr", "setup.py", "pyproject.toml"):
        path = os.path.join(root, top)
        files = [path] if os.path.isfile(path) else sorted(
            os.path.join(d, f) for d, dirs, fs in os.walk(path) for f in fs
            if "__pycache__" not in d and "results" not in os.path.relpath(d, root).split(os.sep)
            and not f.endswith((".so", ".pyc", ".o")))
        for f in files:
            try:
                with open(f, "rb") as fh:
                    data = fh.read()
            except OSError:
                continue
            digest.update(os.path.relpath(f, root).encode() + b"\0" + data + b"\0")
    return digest.hexdigest()[:16]


def git_info(root: str = REPO) -> Dict[str, Any]:
    commit = _run(["git", "-C", root, "rev-parse", "HEAD"])
    info: Dict[str, Any] = {"commit": commit.strip() if commit else os.environ.get("RTDETR_GIT_COMMIT")}
    branch = _run(["git", "-C", root, "rev-parse", "--abbrev-ref", "HEAD"])
    info["branch"] = branch.strip() if branch else None
    status = _run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"])
    info["dirty"] = bool(status.strip()) if status is not None else None
    info["source_hash"] = source_hash(root)
    return info


def cuda_toolkit() -> Dict[str, Any]:
    info: Dict[str, Any] = {"cuda_home": os.environ.get("CUDA_HOME")}
    nvcc = shutil.which("nvcc") or (os.path.join(info["cuda_home"], "bin", "nvcc") if info["cuda_home"] else None)
    out = _run([nvcc, "--version"]) if nvcc else None
    match = re.search(r"release ([0-9.]+)", out or "")
    info["nvcc"] = match.group(1) if match else None
    sanitizer = os.environ.get("COMPUTE_SANITIZER") or shutil.which("compute-sanitizer")
    out = _run([sanitizer, "--version"]) if sanitizer else None
    match = re.search(r"Version ([0-9.]+)", out or "")
    info["compute_sanitizer"] = match.group(1) if match else None
    return info


def nvidia_smi() -> Dict[str, Any]:
    out = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                "--format=csv,noheader,nounits"])
    if not out:
        return {}
    first = out.strip().splitlines()[0]
    parts = [p.strip() for p in first.split(",")]
    keys = ("name", "driver", "memory_mib", "max_sm_clock_mhz", "power_limit_w")
    return {k: v for k, v in zip(keys, parts)}


def probe_env() -> Dict[str, Any]:
    env: Dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    device: Dict[str, Any] = {"name": None, "capability": None}
    versions: Dict[str, Any] = {"python": env["python"]}
    try:
        import torch

        versions["torch"] = torch.__version__
        versions["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            device.update(name=props.name, capability="%d.%d" % (props.major, props.minor),
                          multiprocessors=props.multi_processor_count,
                          memory_gib=round(props.total_memory / 2**30, 1), count=torch.cuda.device_count())
    except Exception as exc:  # torch missing or broken: the probe still writes what it can
        versions["torch"] = None
        versions["torch_error"] = f"{type(exc).__name__}: {exc}"
    versions["triton"] = _dist_version("triton")  # from the metadata: importing triton is slow
    smi = nvidia_smi()
    if smi:
        device["name"] = device["name"] or smi.get("name")
        versions["driver"] = smi.get("driver")
        device["nvidia_smi"] = smi
    else:
        versions["driver"] = None
    toolkit = cuda_toolkit()
    versions["cuda_toolkit"] = toolkit["nvcc"]
    versions["compute_sanitizer"] = toolkit["compute_sanitizer"]
    env["cuda_home"] = toolkit["cuda_home"]
    versions["rtdetr_kernels"] = _package_version()
    env["device"] = device
    env["versions"] = versions
    env["git"] = git_info()
    env["slug"] = slugify(device["name"] or "cpu")
    return env


def _dist_version(name: str) -> Optional[str]:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version(name)
    except PackageNotFoundError:
        return None
    except Exception:
        return None


def _package_version() -> Optional[str]:
    # not imported: a stale _C would load before the build step replaces it
    return _dist_version("rtdetr-kernels")


# --------------------------------------------------------------------------------------------
# junit xml
# --------------------------------------------------------------------------------------------


def parse_junit(path: str) -> Dict[str, Any]:
    """Every test case with its outcome, and the counts."""
    root = ET.parse(path).getroot()
    cases = []
    for case in root.iter("testcase"):
        outcome, message = "passed", None
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                message = child.get("message") or (child.text or "").strip()[:500] or None
                if child.tag == "skipped" and child.get("type") == "pytest.xfail":
                    outcome = "xfailed"
                break
        classname = case.get("classname", "")
        name = case.get("name", "")
        cases.append({
            "id": f"{classname.replace('.', '/')}.py::{name}" if classname else name,
            "classname": classname,
            "name": name,
            "outcome": outcome,
            "time_s": float(case.get("time") or 0.0),
            "message": (message or "")[:500] or None,
        })
    counts = {k: 0 for k in ("passed", "failed", "error", "skipped", "xfailed")}
    for c in cases:
        counts[c["outcome"]] += 1
    suite_time = sum(float(s.get("time") or 0.0) for s in root.iter("testsuite"))
    summary = {"passed": counts["passed"], "failed": counts["failed"], "errors": counts["error"],
               "skipped": counts["skipped"], "xfailed": counts["xfailed"], "total": len(cases),
               "time_s": round(suite_time, 3)}
    return {"summary": summary, "cases": cases}


def junit_line(summary: Dict[str, Any]) -> str:
    return (f"passed {summary['passed']}, failed {summary['failed']}, errors {summary['errors']}, "
            f"skipped {summary['skipped']} (total {summary['total']}, {summary['time_s']:.1f} s)")


# --------------------------------------------------------------------------------------------
# compute-sanitizer logs
# --------------------------------------------------------------------------------------------

_ERROR_SUMMARY = re.compile(r"ERROR SUMMARY:\s*(\d+)\s+error", re.I)
_RACE_SUMMARY = re.compile(r"RACECHECK SUMMARY:\s*(\d+)\s+hazards? displayed\s*\((\d+)\s+errors?,\s*(\d+)\s+warnings?\)", re.I)


def parse_sanitizer_log(path: str, rc: Optional[int] = None) -> Dict[str, Any]:
    """errors / warnings / first error lines of one compute-sanitizer log."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    except OSError:
        return {"status": "missing", "errors": None, "warnings": None, "first_errors": [], "rc": rc}
    errors = [int(m) for m in _ERROR_SUMMARY.findall(text)]
    races = _RACE_SUMMARY.findall(text)
    n_errors = sum(errors) if errors else None
    n_warnings = None
    if races:
        n_errors = max(n_errors or 0, sum(int(r[1]) for r in races))
        n_warnings = sum(int(r[2]) for r in races)
    first = [line.strip() for line in text.splitlines()
             if line.startswith("=========") and re.search(r"(Invalid|out of bounds|hazard|Race|Error:|Program hit)", line)
             and "SUMMARY" not in line][:10]
    if n_errors is None:
        status = "no-summary"  # crashed before the sanitizer could summarise, or not a sanitizer log
    elif n_errors > 0:
        status = "failed"
    elif rc not in (None, 0):
        status = "failed"
    else:
        status = "ok"
    return {"status": status, "errors": n_errors, "warnings": n_warnings, "first_errors": first, "rc": rc}


# --------------------------------------------------------------------------------------------
# pytest-benchmark json
# --------------------------------------------------------------------------------------------


def merge_bench(out: str, inputs: Iterable[str]) -> Dict[str, Any]:
    merged: Optional[Dict[str, Any]] = None
    for path in inputs:
        data = _read_json(path)
        if not isinstance(data, dict) or "benchmarks" not in data:
            continue
        if merged is None:
            merged = {k: v for k, v in data.items() if k != "benchmarks"}
            merged["benchmarks"] = []
            merged["sources"] = []
        merged["benchmarks"].extend(data["benchmarks"])
        merged["sources"].append(os.path.basename(path))
    merged = merged or {"benchmarks": [], "sources": []}
    _write_json(out, merged)
    return merged


def _is_baseline(bench: Dict[str, Any]) -> bool:
    extra = bench.get("extra_info") or {}
    if extra.get("baseline") is True:
        return True
    values = [str(v).lower() for v in (bench.get("params") or {}).values()]
    values += [str(extra.get(k, "")).lower() for k in ("backend", "impl", "implementation")]
    return "reference" in values or "reference-eager" in values


def bench_items(data: Dict[str, Any], source: Optional[str] = None) -> List[Dict[str, Any]]:
    """One record per benchmark: timings (seconds), params, ratios (copied and computed)."""
    items = []
    for b in data.get("benchmarks", []):
        stats = b.get("stats") or {}
        extra = b.get("extra_info") or {}
        ratios = {k: v for k, v in extra.items() if RATIO_KEY.search(k) and isinstance(v, (int, float))}
        items.append({
            "name": b.get("name"),
            "fullname": b.get("fullname"),
            "group": b.get("group"),
            "params": b.get("params") or {},
            "source": source,
            "median_s": stats.get("median"),
            "mean_s": stats.get("mean"),
            "min_s": stats.get("min"),
            "max_s": stats.get("max"),
            "stddev_s": stats.get("stddev"),
            "iqr_s": stats.get("iqr"),
            "rounds": stats.get("rounds"),
            "ops": stats.get("ops"),
            "extra_info": {k: v for k, v in extra.items() if k != "data"},
            "ratios": ratios,
            "baseline": _is_baseline(b),
        })
    # ratios measured in one run: within each group, baseline median / this median
    groups: Dict[Any, List[Dict[str, Any]]] = {}
    for item in items:
        groups.setdefault(item["group"], []).append(item)
    for group, members in groups.items():
        if group is None:
            continue
        base = next((m for m in members if m["baseline"] and m["median_s"]), None)
        if base is None:
            continue
        for m in members:
            if m["median_s"]:
                m["ratios"]["speedup_vs_baseline"] = base["median_s"] / m["median_s"]
                m["ratios"].setdefault("baseline", base["name"])
    return items


# --------------------------------------------------------------------------------------------
# collect
# --------------------------------------------------------------------------------------------


def read_steps(path: str) -> List[Dict[str, Any]]:
    """steps.tsv: name, status, rc, seconds, log, detail (written by gpu_suite.sh)."""
    steps: List[Dict[str, Any]] = []
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return steps
    for line in lines:
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t") + [""] * 6
        name, status, rc, seconds, log, detail = parts[:6]
        steps.append({
            "name": name,
            "status": status,
            "rc": int(rc) if rc.lstrip("-").isdigit() else None,
            "seconds": float(seconds) if re.fullmatch(r"[0-9.]+", seconds or "") else None,
            "log": log or None,
            "detail": detail or None,
        })
    # a later run of the same step (bench-only after core, a retry) replaces the earlier one
    latest: Dict[str, Dict[str, Any]] = {}
    for step in steps:
        latest.pop(step["name"], None)
        latest[step["name"]] = step
    return list(latest.values())


def collect(out_dir: str) -> Dict[str, Any]:
    env = _read_json(os.path.join(out_dir, "env.json")) or {}
    steps = read_steps(os.path.join(out_dir, "steps.tsv"))
    step_by_name = {s["name"]: s for s in steps}
    results: Dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "date": env.get("date") or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "collected": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "dry_run": bool(env.get("dry_run")),
        "device": env.get("device") or {},
        "versions": env.get("versions") or {},
        "git": env.get("git") or {},
        "host": {k: env.get(k) for k in ("host", "platform", "cpu_count", "cuda_home")},
        "build": env.get("build") or {},
        "steps": steps,
    }
    build_info = _read_json(os.path.join(out_dir, "build.json"))
    if build_info:
        results["build"].update(build_info)

    junit = os.path.join(out_dir, "junit.xml")
    if os.path.exists(junit):
        try:
            results["tests"] = parse_junit(junit)
        except ET.ParseError as exc:
            results["tests"] = {"summary": None, "cases": [], "error": f"junit.xml unreadable: {exc}"}
    else:
        results["tests"] = None

    sanitizer = []
    for log in sorted(glob.glob(os.path.join(out_dir, "sanitizer", "*.log"))):
        tool = os.path.splitext(os.path.basename(log))[0]
        step = step_by_name.get(f"sanitizer-{tool}") or {}
        entry = {"tool": tool, "log": os.path.relpath(log, out_dir)}
        entry.update(parse_sanitizer_log(log, step.get("rc")))
        if step.get("status") == "timeout":
            entry["status"] = "timeout"
        cases = _read_json(os.path.join(out_dir, "sanitizer", f"{tool}.cases.json"))
        if isinstance(cases, dict):
            entry["cases"] = cases.get("summary")
            entry["case_failures"] = [c for c in cases.get("cases", []) if c.get("status") == "error"][:50]
            entry["uncovered_ops"] = cases.get("uncovered_ops", [])
            if entry["case_failures"] and entry["status"] == "ok":
                entry["status"] = "failed"
        sanitizer.append(entry)
    results["sanitizer"] = sanitizer

    bench_files = sorted(glob.glob(os.path.join(out_dir, "bench", "*.json")))
    items: List[Dict[str, Any]] = []
    for path in bench_files:
        data = _read_json(path)
        if isinstance(data, dict):
            items.extend(bench_items(data, os.path.splitext(os.path.basename(path))[0]))
    if bench_files:
        merge_bench(os.path.join(out_dir, "bench.json"), bench_files)
    elif os.path.exists(os.path.join(out_dir, "bench.json")):
        items = bench_items(_read_json(os.path.join(out_dir, "bench.json")) or {}, "bench")
    results["benchmarks"] = {"count": len(items), "items": items} if (items or bench_files) else None
    results["e2e"] = _read_json(os.path.join(out_dir, "e2e.json"))

    failed_steps = [s["name"] for s in steps if s["status"] not in ("ok", "skipped", "reused", "empty")]
    tests_bad = bool(results["tests"] and results["tests"].get("summary")
                     and (results["tests"]["summary"]["failed"] or results["tests"]["summary"]["errors"]))
    sanitizer_bad = [s["tool"] for s in sanitizer if s["status"] != "ok"]
    results["ok"] = not (failed_steps or tests_bad or sanitizer_bad)
    results["problems"] = ([f"step {n}" for n in failed_steps] + (["tests failed"] if tests_bad else [])
                           + [f"sanitizer {t}" for t in sanitizer_bad])
    _write_json(os.path.join(out_dir, "results.json"), results)
    with open(os.path.join(out_dir, "summary.md"), "w", encoding="utf-8") as fh:
        fh.write(summary_markdown(results))
    return results


def summary_markdown(r: Dict[str, Any], max_bench_rows: int = 60) -> str:
    dev = r.get("device") or {}
    ver = r.get("versions") or {}
    git = r.get("git") or {}
    lines = [f"# GPU suite: {dev.get('name') or 'no GPU'}{' (dry run)' if r.get('dry_run') else ''}", ""]
    lines.append(f"- date: {r.get('date')}")
    lines.append(f"- device: {dev.get('name')} (sm {dev.get('capability')}), driver {ver.get('driver')}, "
                 f"CUDA toolkit {ver.get('cuda_toolkit')}, torch {ver.get('torch')} (CUDA {ver.get('torch_cuda')}), "
                 f"triton {ver.get('triton')}, python {ver.get('python')}")
    lines.append(f"- commit: {git.get('commit') or 'unknown'}{' (dirty)' if git.get('dirty') else ''}, "
                 f"source hash {git.get('source_hash')}")
    lines.append(f"- overall: {'OK' if r.get('ok') else 'PROBLEMS: ' + ', '.join(r.get('problems') or [])}")
    lines += ["", "| step | status | time | detail |", "|---|---|---|---|"]
    for s in r.get("steps") or []:
        secs = f"{s['seconds']:.0f} s" if s.get("seconds") is not None else "-"
        lines.append(f"| {s['name']} | {s['status']} | {secs} | {_md_escape(s.get('detail') or '')} |")
    tests = r.get("tests")
    if tests and tests.get("summary"):
        lines += ["", f"**Tests:** {junit_line(tests['summary'])}"]
        bad = [c for c in tests["cases"] if c["outcome"] in ("failed", "error")]
        for c in bad[:30]:
            lines.append(f"- {c['outcome']}: `{c['id']}` {_md_escape((c.get('message') or '')[:160])}")
        if len(bad) > 30:
            lines.append(f"- ... and {len(bad) - 30} more")
    if r.get("sanitizer"):
        lines += ["", "| sanitizer | status | errors | warnings | cases |", "|---|---|---|---|---|"]
        for s in r["sanitizer"]:
            cases = s.get("cases") or {}
            case_txt = ", ".join(f"{k} {v}" for k, v in cases.items()) if cases else "-"
            lines.append(f"| {s['tool']} | {s['status']} | {s.get('errors')} | {s.get('warnings')} | {case_txt} |")
        for s in r["sanitizer"]:
            for e in s.get("first_errors") or []:
                lines.append(f"- {s['tool']}: `{_md_escape(e[:200])}`")
            for c in s.get("case_failures") or []:
                lines.append(f"- {s['tool']} case `{c.get('id')}`: {_md_escape(str(c.get('error'))[:200])}")
    bench = r.get("benchmarks")
    if bench and bench.get("items"):
        lines += ["", "| benchmark | group | median | speedup vs baseline |", "|---|---|---|---|"]
        for item in bench["items"][:max_bench_rows]:
            sp = item["ratios"].get("speedup_vs_baseline")
            lines.append(f"| {_md_escape(item['name'])} | {_md_escape(item['group'] or '')} | "
                         f"{_fmt_time(item['median_s'])} | {'-' if sp is None else f'{sp:.2f}x'} |")
        if len(bench["items"]) > max_bench_rows:
            lines.append(f"\n({len(bench['items']) - max_bench_rows} more in results.json)")
    if r.get("e2e") is not None:
        lines += ["", "End-to-end results: see `e2e.json` (also under `e2e` in results.json)."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("env")
    p.add_argument("--json", required=True)
    p.add_argument("--dry-run", action="store_true", help="mark the run as a dry run")
    p = sub.add_parser("junit-summary")
    p.add_argument("xml")
    p = sub.add_parser("sanitizer-summary")
    p.add_argument("log")
    p.add_argument("--rc", type=int, default=None)
    p = sub.add_parser("merge-bench")
    p.add_argument("out")
    p.add_argument("inputs", nargs="*")
    p = sub.add_parser("collect")
    p.add_argument("--dir", required=True)
    args = parser.parse_args(argv)

    if args.cmd == "env":
        env = probe_env()
        env["dry_run"] = args.dry_run
        _write_json(args.json, env)
        print(env["slug"])
        return 0
    if args.cmd == "junit-summary":
        summary = parse_junit(args.xml)["summary"]
        print(junit_line(summary))
        return 1 if (summary["failed"] or summary["errors"]) else 0
    if args.cmd == "sanitizer-summary":
        result = parse_sanitizer_log(args.log, args.rc)
        print(json.dumps(result))
        return 0 if result["status"] == "ok" else 1
    if args.cmd == "merge-bench":
        merged = merge_bench(args.out, args.inputs)
        print(f"{len(merged['benchmarks'])} benchmarks from {len(merged['sources'])} files -> {args.out}")
        return 0
    if args.cmd == "collect":
        results = collect(args.dir)
        print(f"wrote {os.path.join(args.dir, 'results.json')} and summary.md: "
              f"{'OK' if results['ok'] else 'problems: ' + ', '.join(results['problems'])}")
        return 0
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
