"""End-to-end RT-DETR timings, reference (grid_sample MSDA) vs patched (``apply_to_rtdetr``, backend auto).

    python bench/e2e.py                       # the reduced CPU set: rtdetr_r18vd, fp32, 640x640, batch 1 and 4
    python bench/e2e.py --configs rtdetr_r18vd rtdetr_r50vd --batches 1 32 --train-batches 1 32 --device cuda

Weights are ``rtdetr.testing.randomize_`` (seeded, non-trivial; never zeros), inputs seeded uniform noise.  Each
measurement alternates reference and patched calls (A, B, A, B, ...) after a warm-up, so both see the same machine
load; the ratio of medians is the figure that counts, absolute times only with the device named.  Writes
``bench/results/e2e-<device>.json`` (device, versions, date, every median and ratio).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

import rtdetr
import rtdetr_kernels
from rtdetr_kernels.demo.compare import timeit
from rtdetr_kernels.integrations.rtdetr import apply_to_rtdetr

HERE = os.path.dirname(os.path.abspath(__file__))


def alternate(fns, device, rounds):
    """Medians and every time of each fn, called in turn (A, B, A, B, ...) for ``rounds`` rounds after a warm-up."""
    times = timeit(fns, device, budget=0.0, min_rounds=rounds, max_rounds=rounds)
    return {k: v["median_s"] for k, v in times.items()}, {k: v["all_s"] for k, v in times.items()}


def bench_config(name, batches, size, device, rounds, train_batches):
    torch.manual_seed(0)
    model = rtdetr.testing.randomize_(rtdetr.build_model(name), seed=0, score_scale=4.0).to(device).eval()
    patch = apply_to_rtdetr(model)
    ours = [(m, m.ms_deformable_attn_core) for m in (model.get_submodule(r.where) for r in patch.replaced)]
    patch.revert()
    originals = [(m, m.ms_deformable_attn_core) for m, _ in ours]

    def use(patched):
        for (m, orig), (_, fast) in zip(originals, ours):
            m.ms_deformable_attn_core = fast if patched else orig

    rows = []
    gen = torch.Generator().manual_seed(1)
    for batch in batches:
        x = torch.rand(batch, 3, size, size, generator=gen).to(device)

        def infer(patched):
            def run():
                use(patched)
                with torch.no_grad():
                    model(x)
            return run

        med, raw = alternate({"reference": infer(False), "patched": infer(True)}, device, rounds)
        rows.append(_row(name, "inference", batch, size, med, raw))
        print(_fmt(rows[-1]), flush=True)
        if batch in train_batches:
            crit = rtdetr.build_criterion()
            targets = [{"labels": torch.tensor([1, 7], device=device),
                        "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.25, 0.2]], device=device)}
                       for _ in range(batch)]
            state = {k: v.clone() for k, v in model.state_dict().items()}

            def step(patched):
                def run():
                    use(patched)
                    model.train()
                    torch.manual_seed(0)
                    sum(crit(model(x, targets), targets).values()).backward()
                    model.zero_grad(set_to_none=True)
                return run

            med, raw = alternate({"reference": step(False), "patched": step(True)}, device, max(2, rounds // 3))
            model.load_state_dict(state)
            model.eval()
            rows.append(_row(name, "training step (forward + loss + backward)", batch, size, med, raw))
            print(_fmt(rows[-1]), flush=True)
    use(False)
    return rows


def _row(config, what, batch, size, med, raw):
    return {"config": config, "what": what, "batch": batch, "size": size, "dtype": "float32",
            "reference_ms": med["reference"] * 1e3, "patched_ms": med["patched"] * 1e3,
            "speedup": med["reference"] / med["patched"], "rounds": len(raw["patched"]),
            "reference_all_ms": [t * 1e3 for t in raw["reference"]], "patched_all_ms": [t * 1e3 for t in raw["patched"]]}


def _fmt(r):
    return (f"{r['config']:<14} {r['what']:<42} batch {r['batch']:<3} {r['size']}px  reference {r['reference_ms']:9.1f} ms"
            f"  patched {r['patched_ms']:9.1f} ms  {r['speedup']:.3f}x  ({r['rounds']} rounds)")


def write_chart(result: dict, path: str) -> str:
    """A bar chart of the measured speedups (reference time / patched time), the device and date in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [f"{r['config']}\n{r['what'].split(' (')[0]}\nbatch {r['batch']}" for r in rows]
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(rows), 3.6))
    bars = ax.bar(range(len(rows)), [r["speedup"] for r in rows], color="#3b7dd8")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.bar_label(bars, fmt="%.2fx", fontsize=8)
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("speedup (reference / patched)")
    ax.set_title(f"RT-DETR end to end, MSDA patched ({result['ms_deform_attn_backend']})\n"
                 f"{result['device']}, {result['date_utc'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=["rtdetr_r18vd"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    p.add_argument("--size", type=int, default=640)
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--train-batches", nargs="*", type=int, default=[1],
                   help="batches (of --batches) at which a training step is timed too (default: 1)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="JSON path (default bench/results/e2e-<device type>.json)")
    p.add_argument("--chart-only", metavar="JSON", help="only draw the chart (<JSON without .json>.png) of a results file")
    args = p.parse_args(argv)
    if args.chart_only:
        with open(args.chart_only) as f:
            print("wrote", write_chart(json.load(f), os.path.splitext(args.chart_only)[0] + ".png"))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for name in args.configs:
        rows += bench_config(name, args.batches, args.size, device, args.rounds, args.train_batches)
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    backend = rtdetr_kernels.backends.select(rtdetr_kernels.backends.Call("ms_deform_attn", device.type, (torch.float32,)), "auto")
    result = {"device": dev, "ms_deform_attn_backend": backend, "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "rtdetr_kernels": rtdetr_kernels.__version__},
              "command": " ".join(["python bench/e2e.py"] + list(sys.argv[1:] if argv is None else argv)), "rows": rows}
    out = args.out or os.path.join(HERE, "results", f"e2e-{device.type}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out} and {write_chart(result, os.path.splitext(out)[0] + '.png')}")


if __name__ == "__main__":
    main()
