#!/usr/bin/env python3
"""The report of one benchmark run: results folder, README table and charts, from the real pytest-benchmark JSON.

    python bench/report.py bench/results/cpu-msda.json --readme README.md   # writes bench/results/cpu-msda/
    python bench/report.py OUT_DIR     # a bench/gpu_suite.py folder: OUT_DIR/bench.json, results written there

SOURCE is a pytest-benchmark JSON of bench/test_ms_deform_attn.py, or a folder holding one as bench.json.
The results folder (--out; default: the folder given, or beside the JSON file under its stem) gets
results.json (device, versions, date, commit, every ratio, and what the GPU driver left there: steps.json,
junit.xml, logs/sanitizer-<tool>.log and .json), summary.md and speedup-<dtype>.png. --readme replaces the text
between the bench-table markers with the speedup table. The ratios are bench/ratios.py's; the statistic is
the minimum over rounds on CPU (a shared host only ever adds time) and the median (CUDA events) on GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import xml.etree.ElementTree as ET

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ratios  # noqa: E402  (bench/ is not a package)

START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"
MODES = ("forward", "backward", "forward+backward")
ANCHOR_LABELS = {"reference-grid-sample": "vs grid_sample", "reference-grid-sample-compiled": "vs grid_sample compiled",
                 "torch-ms-deform-attn": "vs torch-ms-deform-attn"}
DTYPE_ORDER = ("float32", "bfloat16", "float16")


def _natural(text):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def run_info(path):
    """Device, date, commit and versions of one pytest-benchmark JSON (versions: what bench/conftest.py recorded)."""
    with open(path) as f:
        data = json.load(f)
    device, _ = ratios.load(path)
    machine = data.get("machine_info", {})
    versions = {"python": machine.get("python_version"), **machine.get("rtdetr", {}).get("versions", {})}
    commit = data.get("commit_info", {})
    return {"device": device, "gpu": bool(device) and not device.startswith("cpu"),
            "host_cpu": machine.get("cpu", {}).get("brand_raw"), "date": data.get("datetime"),
            "commit": {k: commit.get(k) for k in ("id", "branch", "dirty")}, "versions": versions}


def default_stat(info):
    return "median" if info["gpu"] else "min"


def speedup_rows(path, stat):
    """ratios.rows as dicts: one per (case, dtype, mode, ours, other)."""
    _, groups = ratios.load(path, stat)
    out = []
    for case, dtype, mode, what, ours_ms, other_ms, ratio in ratios.rows(groups):
        ours, other = what.split(" vs ")
        out.append(dict(case=case, dtype=dtype, mode=mode, ours=ours, other=other, ours_ms=ours_ms, other_ms=other_ms,
                        speedup=ratio))
    return groups, out


def table(groups, rows):
    """Markdown lines: one row per (case, dtype, ours); each cell holds forward / backward / forward+backward."""
    by_key = {}
    for r in rows:
        fast = r["ours"] if r["other"] in ANCHOR_LABELS else r["other"]
        column = ANCHOR_LABELS.get(r["other"], "deterministic vs fast")
        by_key[(r["case"], r["dtype"], fast, column, r["mode"])] = r["speedup"]
    ours_keys = sorted({(case, dtype, o) for (case, dtype, _), times in groups.items() for o in ratios.OURS if o in times},
                       key=lambda k: (DTYPE_ORDER.index(k[1]) if k[1] in DTYPE_ORDER else 9, _natural(k[0]),
                                      ratios.OURS.index(k[2])))
    columns = [c for c in (*ANCHOR_LABELS.values(), "deterministic vs fast") if any(k[3] == c for k in by_key)]

    def cell(values, fmt):
        return " / ".join("–" if v is None else fmt(v) for v in values)

    lines = ["| case | dtype | ours | ours ms | " + " | ".join(columns) + " |", "|---|---|---|---|" + "---|" * len(columns)]
    for case, dtype, ours in ours_keys:
        ms = [groups.get((case, dtype, m), {}).get(ours) for m in MODES]
        speedups = [cell([by_key.get((case, dtype, ours, c, m)) for m in MODES], lambda v: f"{v:.2f}x") for c in columns]
        lines.append(f"| {case} | {dtype} | {ours} | {cell(ms, lambda v: f'{v:#.3g}')} | " + " | ".join(speedups) + " |")
    return lines


def header(info, stat, source, out_dir):
    commit = info["commit"]
    sha = (commit.get("id") or "unknown")[:7] + (" (uncommitted changes)" if commit.get("dirty") else "")
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v)
    if "torch" not in info["versions"]:
        versions += "; torch and triton versions not recorded in this file"
    what = "GPU" if info["gpu"] else "CPU"
    host = f" ({info['host_cpu']})" if info["host_cpu"] and not info["gpu"] else ""
    how = ("minimum over the rounds" if stat == "min" else
           "median of CUDA-event times" if info["gpu"] else "median over the rounds")
    lines = [f"{what} run on **{info['device']}**{host}, {str(info['date'])[:10]}, commit {sha}, {versions}.",
             f"Speedup = the anchor's time / ours (> 1: ours faster), {how}, each provider timed on its own; "
             "each cell: forward / backward / forward+backward."]
    if not info["gpu"]:
        lines.append("A CPU run on a shared host: compare the ratios, not the absolute times.")
    lines.append(f"Source: `{source}`; all tables: `{out_dir}/summary.md`.")
    return lines


def update_readme(path, block):
    with open(path) as f:
        text = f.read()
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"report.py: {path} lacks {START} ... {END}")
    with open(path, "w") as f:
        f.write(text[:start + len(START)] + "\n" + block.rstrip("\n") + "\n" + text[end:])


def write_charts(rows, info, out_dir):
    """speedup-<dtype>.png: ours against each anchor, per case and mode (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    written = []
    for dtype in sorted({r["dtype"] for r in rows}, key=lambda d: DTYPE_ORDER.index(d) if d in DTYPE_ORDER else 9):
        anchors = [a for a in ANCHOR_LABELS if any(r["dtype"] == dtype and r["other"] == a for r in rows)]
        cases = sorted({r["case"] for r in rows if r["dtype"] == dtype}, key=_natural)
        series = sorted({(r["ours"], r["mode"]) for r in rows if r["dtype"] == dtype and r["other"] in anchors},
                        key=lambda s: (s[0], MODES.index(s[1])))
        fig, axes = plt.subplots(1, len(anchors), figsize=(5 * len(anchors), 0.6 * len(cases) * len(series) ** 0.5 + 2),
                                 squeeze=False, sharey=True)
        height = 0.8 / len(series)
        for ax, anchor in zip(axes[0], anchors):
            values = {(r["case"], r["ours"], r["mode"]): r["speedup"] for r in rows
                      if r["dtype"] == dtype and r["other"] == anchor}
            for i, (ours, mode) in enumerate(series):
                ys = [c + i * height for c in range(len(cases))]
                ax.barh(ys, [values.get((case, ours, mode), 0) for case in cases], height, label=f"{ours} {mode}")
            ax.axvline(1, color="black", linewidth=0.8)
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
            ax.set_title(ANCHOR_LABELS[anchor], fontsize=10)
            ax.set_xlabel("speedup (x, > 1: ours faster)")
        axes[0][0].set_yticks([c + 0.4 - height / 2 for c in range(len(cases))], cases, fontsize=8)
        axes[0][0].invert_yaxis()
        axes[0][-1].legend(fontsize=7, loc="lower right")
        fig.suptitle(f"ms_deform_attn {dtype}, {info['device']}, {str(info['date'])[:10]}", fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, f"speedup-{dtype}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def junit_summary(path):
    """Counts of a pytest JUnit XML, and the names of the tests that failed or errored."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["seconds"] = round(sum(float(s.get("time", 0)) for s in suites), 1)
    counts["failed"] = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
                        if case.find("failure") is not None or case.find("error") is not None]
    return counts


def sanitizer_summary(log_path):
    """compute-sanitizer's own count of errors (memcheck) or hazards (racecheck), and sanitize_cases' --json summary."""
    with open(log_path, errors="replace") as f:
        text = f.read()
    found = (re.findall(r"ERROR SUMMARY: (\d+) error", text)
             + re.findall(r"RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) error", text))
    cases_path = log_path[:-len(".log")] + ".json"
    cases = json.load(open(cases_path)).get("summary") if os.path.exists(cases_path) else None
    return {"errors": int(found[-1]) if found else None, "cases": cases}


def run_files(out_dir):
    """What bench/gpu_suite.py left in the folder: steps, test counts, sanitizer summaries."""
    run = {}
    if os.path.exists(os.path.join(out_dir, "steps.json")):
        run["steps"] = json.load(open(os.path.join(out_dir, "steps.json")))
    if os.path.exists(os.path.join(out_dir, "junit.xml")):
        run["tests"] = junit_summary(os.path.join(out_dir, "junit.xml"))
    logs = os.path.join(out_dir, "logs")
    names = sorted(os.listdir(logs)) if os.path.isdir(logs) else []
    run["sanitizer"] = {n[len("sanitizer-"):-4]: sanitizer_summary(os.path.join(logs, n))
                        for n in names if n.startswith("sanitizer-") and n.endswith(".log")}
    return run


def run_lines(run):
    """summary.md's lines about the GPU driver's steps, tests and sanitizer runs."""
    lines = []
    if run.get("steps"):
        lines += ["## Steps", "", "| step | status | seconds | timeout s | detail | command |", "|---|---|---|---|---|---|"]
        for s in run["steps"]:
            lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {s['timeout_s']:.0f} | "
                         f"{s.get('detail', '')} | `{s['command']}` |")
        lines.append("")
    if run.get("tests"):
        t = run["tests"]
        lines += [f"Tests: {t['tests']} run, {t['failures']} failed, {t['errors']} errors, {t['skipped']} skipped "
                  f"({t['seconds']} s)."] + [f"- failed: {name}" for name in t["failed"]] + [""]
    for tool, s in run.get("sanitizer", {}).items():
        errors = f"{s['errors']} errors" if s["errors"] is not None else "no summary line (did it finish?)"
        lines.append(f"compute-sanitizer {tool}: {errors}; cases {s['cases']}.")
    return lines


def report(source, out_dir=None, readme=None, stat=None):
    bench_json = os.path.join(source, "bench.json") if os.path.isdir(source) else source
    if not out_dir:  # a run folder is its own results folder; another JSON gets one beside it, named by its stem
        in_run = os.path.isdir(source) or os.path.basename(source) == "bench.json"
        out_dir = os.path.dirname(bench_json) if in_run else os.path.splitext(source)[0]
    os.makedirs(out_dir, exist_ok=True)
    run = run_files(out_dir)
    results = {"schema": 2, "reported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "run": run}
    lines = [f"# Results in {out_dir}", ""]
    block = "No benchmark results in this run."
    if os.path.exists(bench_json):
        info = run_info(bench_json)
        stat = stat or default_stat(info)
        groups, rows = speedup_rows(bench_json, stat)
        base = os.path.dirname(os.path.abspath(readme)) if readme else os.getcwd()
        rel = lambda p: os.path.relpath(os.path.abspath(p), base)  # noqa: E731
        charts = write_charts(rows, info, out_dir) if rows else []
        block_lines = header(info, stat, rel(bench_json), rel(out_dir)) + [""] + table(groups, rows)
        if charts:
            block_lines += ["", "Charts: " + ", ".join(f"[{os.path.basename(p)[8:-4]}]({rel(p)})" for p in charts) + "."]
        block = "\n".join(block_lines)
        results.update(info, statistic=stat, source=bench_json, speedups=rows, paired=ratios.paired(bench_json))
        lines += [block, "", f"## All ratios ({stat})", ""] + ratios.tables(bench_json, stat) + [""]
    lines += run_lines(run)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if readme:
        update_readme(readme, block)
    return results, block


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a pytest-benchmark JSON, or a results folder with bench.json")
    parser.add_argument("--out", help="results folder (default: SOURCE if a folder, else beside it under its stem)")
    parser.add_argument("--readme", help="replace the table between the bench-table markers of this file")
    parser.add_argument("--stat", choices=("median", "min"), help="default: min on CPU, median on GPU")
    args = parser.parse_args(argv)
    _, block = report(args.source, args.out, args.readme, args.stat)
    print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
