#!/usr/bin/env python3
"""Render the latest GPU-suite results as a Markdown benchmark table and PNG charts.

  python bench/report.py                              # print the table of the newest bench/results/*/results.json
  python bench/report.py --update-readme README.md    # replace the block between the markers below
  python bench/report.py --png docs/bench             # one bar chart per benchmark group (needs matplotlib)
  python bench/report.py --results bench/results/2026-11-20-nvidia-h100-80gb-hbm3

The README block sits between ``<!-- bench-table:start -->`` and ``<!-- bench-table:end -->``;
the markers stay, everything between them is replaced. Dry-run results (``bench/gpu_suite.sh
--dry-run``) are ignored unless ``--include-dry-run`` is given.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from collect_results import _fmt_time as fmt_time  # noqa: E402  (bench/ is not a package)
from collect_results import _md_escape as _cell  # noqa: E402

START = "<!-- bench-table:start -->"
END = "<!-- bench-table:end -->"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_ROOT = os.path.join(REPO, "bench", "results")


def _load(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def find_latest(root: str = DEFAULT_ROOT, include_dry_run: bool = False) -> Optional[Tuple[str, Dict[str, Any]]]:
    """(path, results) of the newest results.json that has benchmarks (by its date, then folder name)."""
    found = []
    for path in glob.glob(os.path.join(root, "*", "results.json")):
        data = _load(path)
        if not data or (data.get("dry_run") and not include_dry_run):
            continue
        has_bench = bool((data.get("benchmarks") or {}).get("items")) or data.get("e2e") is not None
        found.append((has_bench, str(data.get("date") or ""), os.path.basename(os.path.dirname(path)), path, data))
    if not found:
        return None
    with_bench = [f for f in found if f[0]] or found
    best = max(with_bench, key=lambda f: (f[1], f[2]))
    return best[3], best[4]


def resolve(results: Optional[str], root: str, include_dry_run: bool) -> Tuple[str, Dict[str, Any]]:
    if results:
        path = os.path.join(results, "results.json") if os.path.isdir(results) else results
        data = _load(path)
        if data is None:
            raise SystemExit(f"report.py: cannot read results from {path}")
        return path, data
    latest = find_latest(root, include_dry_run)
    if latest is None:
        raise SystemExit(f"report.py: no results.json under {root} (run bench/gpu_suite.sh on a GPU machine first)")
    return latest


def header_line(r: Dict[str, Any]) -> str:
    dev = r.get("device") or {}
    ver = r.get("versions") or {}
    git = r.get("git") or {}
    date = str(r.get("date") or "")[:10]
    commit = (git.get("commit") or "")[:10] or f"source {git.get('source_hash')}"
    return (f"Measured on **{dev.get('name') or 'unknown device'}** on {date} (driver {ver.get('driver')}, "
            f"CUDA {ver.get('torch_cuda') or ver.get('cuda_toolkit')}, torch {ver.get('torch')}, triton {ver.get('triton')}; "
            f"commit {commit}). Medians; speedup = the group's baseline median / this median, both from the same run.")


def _e2e_rows(e2e: Any) -> List[Dict[str, Any]]:
    if isinstance(e2e, list):
        rows = e2e
    elif isinstance(e2e, dict):
        rows = next((e2e[k] for k in ("rows", "results", "benchmarks") if isinstance(e2e.get(k), list)), [])
    else:
        rows = []
    return [row for row in rows if isinstance(row, dict)]


def render_markdown(r: Dict[str, Any], max_rows: int = 80) -> str:
    lines = [header_line(r), ""]
    items = (r.get("benchmarks") or {}).get("items") or []
    if items:
        lines += ["| group | benchmark | median | speedup |", "|---|---|---:|---:|"]
        for item in items[:max_rows]:
            sp = (item.get("ratios") or {}).get("speedup_vs_baseline")
            lines.append(f"| {_cell(item.get('group') or '')} | {_cell(item.get('name'))} | "
                         f"{fmt_time(item.get('median_s'))} | {'-' if sp is None else f'{sp:.2f}x'} |")
        if len(items) > max_rows:
            lines.append(f"\n{len(items) - max_rows} more rows in the results file.")
    rows = _e2e_rows(r.get("e2e"))
    if rows:
        keys: List[str] = []
        for row in rows:
            for k in row:
                if k not in keys and not isinstance(row[k], (dict, list)):
                    keys.append(k)
        keys = keys[:8]
        lines += ["", "End to end:", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for row in rows[:max_rows]:
            cells = []
            for k in keys:
                v = row.get(k, "")
                cells.append(f"{v:.4g}" if isinstance(v, float) else _cell(v))
            lines.append("| " + " | ".join(cells) + " |")
    if not items and not rows:
        lines.append("No benchmark results in this run.")
    return "\n".join(lines) + "\n"


def update_readme(path: str, table: str) -> bool:
    """Replace the text between the markers; True when the file changed."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    start, end = text.find(START), text.find(END)
    if start < 0 or end < 0 or end < start:
        raise SystemExit(f"report.py: {path} lacks the markers {START} ... {END} (in that order)")
    new = text[: start + len(START)] + "\n" + table.rstrip("\n") + "\n" + text[end:]
    if new == text:
        return False
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(new)
    return True


def write_charts(r: Dict[str, Any], out_dir: str) -> List[str]:
    """One horizontal bar chart of medians per benchmark group; [] with a message without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("report.py: matplotlib is not installed; skipping the charts", file=sys.stderr)
        return []
    items = [i for i in (r.get("benchmarks") or {}).get("items") or [] if i.get("median_s")]
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for item in items:
        groups.setdefault(item.get("group") or "ungrouped", []).append(item)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    device = (r.get("device") or {}).get("name") or "unknown device"
    for group, members in groups.items():
        names = [m["name"] for m in members]
        ms = [m["median_s"] * 1e3 for m in members]
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(members) + 1.4))
        bars = ax.barh(range(len(members)), ms, color="#4c72b0")
        ax.set_yticks(range(len(members)))
        ax.set_yticklabels(names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("median time (ms)")
        ax.set_title(f"{group} - {device}, {str(r.get('date') or '')[:10]}", fontsize=10)
        for bar, m in zip(bars, members):
            sp = (m.get("ratios") or {}).get("speedup_vs_baseline")
            if sp is not None:
                ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {sp:.2f}x", va="center", fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, re.sub(r"[^A-Za-z0-9._-]+", "-", group).strip("-") + ".png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", help="a results.json or its folder (default: the newest under --root)")
    parser.add_argument("--root", default=DEFAULT_ROOT, help="folder of result folders (default bench/results)")
    parser.add_argument("--update-readme", metavar="README", help="replace the table between the bench-table markers")
    parser.add_argument("--png", metavar="DIR", help="write one PNG chart per benchmark group (needs matplotlib)")
    parser.add_argument("--max-rows", type=int, default=80)
    parser.add_argument("--include-dry-run", action="store_true", help="also consider results of --dry-run runs")
    args = parser.parse_args(argv)

    path, results = resolve(args.results, args.root, args.include_dry_run)
    table = render_markdown(results, args.max_rows)
    if args.update_readme:
        changed = update_readme(args.update_readme, table)
        print(f"report.py: {args.update_readme} {'updated' if changed else 'already up to date'} from {path}")
    else:
        sys.stdout.write(table)
    if args.png:
        for p in write_charts(results, args.png):
            print(f"report.py: wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
