"""Ratios from one pytest-benchmark run of bench/test_ms_deform_attn.py.

    python bench/ratios.py results.json [--markdown] [--stat median|min]

For every (case, dtype, mode): each of our providers against each anchor (grid_sample eager and
compiled, torch-ms-deform-attn), and deterministic against fast; a ratio > 1 means ours is faster.
Times are the medians recorded in extra_info (CUDA events on GPU), or with --stat min the minimum
over the rounds (the steadier statistic on a shared CPU host, where interference only adds time).
The paired table (bench test_ms_deform_attn_paired) has ours and each anchor timed alternately, call
by call: the steadiest ratio on a shared host. A last table gives the peak memory of forward+backward (extra_info['peak_mem_mb']: the CUDA
allocator's peak on GPU, the profiler's allocation trace on CPU), ours as a fraction of each anchor's.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

OURS = ("cuda", "triton", "cpu")
ANCHORS = ("reference-grid-sample", "reference-grid-sample-compiled", "torch-ms-deform-attn")


def load(path, stat="median", field=None):
    """{(case, dtype, mode): {provider: value}}: times in ms, or extra_info[field] when given."""
    with open(path) as f:
        data = json.load(f)
    groups = defaultdict(dict)
    device = None
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if info.get("op") != "ms_deform_attn" or info.get("kind") == "paired":
            continue
        shape = info["shape"]
        key = (f"{shape['case']} N={shape['N']} Lq={shape['Lq']}", info["dtype"], info["mode"])
        if field is not None:
            if info.get(field) is not None:
                groups[key][info["provider"]] = info[field]
            device = info.get("device", device)
            continue
        if stat == "min":
            ms = info.get("min_ms", bench["stats"]["min"] * 1e3)
        else:
            ms = info.get("cuda_event_median_ms", info.get("median_ms", bench["stats"]["median"] * 1e3))
        groups[key][info["provider"]] = ms
        device = info.get("device", device)
    return device, groups


def paired(path):
    """Rows of the paired benchmarks (ours and an anchor called alternately): one per (case, anchor)."""
    with open(path) as f:
        data = json.load(f)
    out = []
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if info.get("op") != "ms_deform_attn" or info.get("kind") != "paired":
            continue
        shape = info["shape"]
        out.append((f"{shape['case']} N={shape['N']} Lq={shape['Lq']}", info["dtype"], info["mode"],
                    f"{info['provider']} vs {info['anchor']}", info["ours_min_ms"], info["anchor_min_ms"],
                    info["paired_ratio_median"], info["paired_ratio_p10"], info["rounds"]))
    return sorted(out)


def rows(groups):
    out = []
    for key in sorted(groups):
        times = groups[key]
        for ours in OURS:
            if ours not in times:
                continue
            for anchor in ANCHORS:
                if anchor in times:
                    ratio = times[anchor] / times[ours] if times[ours] else float("inf")
                    out.append((*key, f"{ours} vs {anchor}", times[ours], times[anchor], ratio))
            det = ours + "-deterministic"
            if det in times:
                ratio = times[ours] / times[det] if times[det] else float("inf")
                out.append((*key, f"{det} vs {ours}", times[det], times[ours], ratio))
    return out


def tables(path, stat="median"):
    """The Markdown tables of one run, as lines: per provider, paired (when recorded), peak memory (when recorded)."""
    _, groups = load(path, stat)
    lines = ["| case | dtype | mode | comparison | ours ms | other ms | speedup |", "|---|---|---|---|---|---|---|"]
    for case, dtype, mode, what, ours, other, ratio in rows(groups):
        lines.append(f"| {case} | {dtype} | {mode} | {what} | {ours:.3f} | {other:.3f} | {ratio:.2f}x |")
    pairs = paired(path)
    if pairs:
        lines += ["", "Paired: ours and the anchor called alternately, so both see the same machine; speedup = median"
                  " over the rounds of anchor / ours (p10: the 10th percentile), times = each one's minimum", "",
                  "| case | dtype | mode | comparison | ours ms | other ms | speedup | p10 | rounds |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for case, dtype, mode, what, ours, other, ratio, p10, rounds in pairs:
            lines.append(f"| {case} | {dtype} | {mode} | {what} | {ours:.3f} | {other:.3f} | {ratio:.2f}x | {p10:.2f}x"
                         f" | {rounds} |")
    _, memory = load(path, field="peak_mem_mb")
    if memory:
        lines += ["", "Peak memory of forward+backward (MB above the inputs); fraction < 1: ours uses less", "",
                  "| case | dtype | comparison | ours MB | other MB | fraction |", "|---|---|---|---|---|---|"]
        for case, dtype, mode, what, ours, other, _ in rows(memory):
            if "deterministic" not in what:
                lines.append(f"| {case} | {dtype} | {what} | {ours:.1f} | {other:.1f} | {ours / other:.2f} |")
    return lines


def main(argv):
    if not argv:
        print(__doc__)
        return 2
    stat = argv[argv.index("--stat") + 1] if "--stat" in argv else "median"
    if stat not in ("median", "min"):
        print(f"--stat must be median or min, got {stat!r}")
        return 2
    device, _ = load(argv[0], stat)
    print(f"device: {device}; statistic: {stat} per provider\n")
    print("\n".join(tables(argv[0], stat)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
