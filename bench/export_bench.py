"""Export benchmark: ONNX Runtime CPU latency of the exported patched model vs the exported reference model, and an
AOTInductor package of the patched model vs eager (CPU; CUDA too when a GPU is there).

    python bench/export_bench.py                                   # rtdetr_r18vd, 640x640, batch 1, CPU
    python bench/export_bench.py --config tiny --size 128 --skip-aoti   # the demo's narrow model, a quick run
    python bench/export_bench.py --device cuda                     # AOTInductor on CUDA as well

The reference is the unpatched model exported by torch.onnx's own translations (grid_sample MSDA, the model's
attention and top-K as written); the patched model is ``rtdetr_kernels.patch(model)`` exported with
``rtdetr_kernels.onnx.export`` in each MSDA form asked for (``--forms``, default grid_sample and gather).
Both use dynamic batch. Per form: ONNX node count and op histogram, file size, ORT median latency, and
the ratio patched / reference measured alternately (A, B, A, B, ...) in one run (the figure that counts;
absolute times only with the device named). The AOTInductor package (``rtdetr_kernels.export.aoti_package``)
is timed against eager patched and eager reference in the same way, with its compile time.

Weights are ``rtdetr.testing.randomize_`` (seeded, never zeros), inputs seeded uniform noise. Writes
``bench/results/export-<device>.json``.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import sys
import tempfile
import time

import torch

import rtdetr
import rtdetr_kernels
from rtdetr_kernels.demo.compare import timeit

HERE = os.path.dirname(os.path.abspath(__file__))


class Outputs(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x)
        return out["pred_logits"], out["pred_boxes"]


def build(config: str, patched: bool):
    from rtdetr_kernels.demo.model import SMALL_CONFIGS, build as build_small

    torch.manual_seed(0)
    model = build_small(config, 80) if config in SMALL_CONFIGS else rtdetr.build_model(config)
    model = rtdetr.testing.randomize_(model, seed=0, score_scale=4.0).eval()
    if patched:
        rtdetr_kernels.patch(model)
    return Outputs(model).eval()


def alternate(fns, device, rounds):
    times = timeit(fns, device, budget=0.0, min_rounds=rounds, max_rounds=rounds)
    return {k: v["median_s"] for k, v in times.items()}


def ort_session(proto, threads):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def describe(proto, path):
    ops = collections.Counter(n.op_type if not n.domain else f"{n.domain}::{n.op_type}" for n in proto.graph.node)
    return {"nodes": sum(ops.values()), "file_mb": round(os.path.getsize(path) / 2 ** 20, 2),
            "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1]))}


def bench_onnx(args, x, tmp):
    reference, patched = build(args.config, False), build(args.config, True)
    batch = torch.export.Dim("batch")
    rows = {}
    t0 = time.perf_counter()
    ref_program = torch.onnx.export(reference, (x,), dynamo=True, dynamic_shapes=({0: batch},))
    ref_path = os.path.join(tmp, "reference.onnx")
    ref_program.save(ref_path, external_data=False)
    rows["reference"] = {"export_s": round(time.perf_counter() - t0, 1), **describe(ref_program.model_proto, ref_path)}
    ref_sess = ort_session(ref_program.model_proto, args.threads)
    timed = x[:args.batch]
    feed = {ref_sess.get_inputs()[0].name: timed.numpy()}
    with torch.no_grad():
        want = patched(timed)
    for form in args.forms:
        t0 = time.perf_counter()
        path = os.path.join(tmp, f"patched-{form}.onnx")
        program = rtdetr_kernels.onnx.export(patched, (x,), path, msda=form)
        row = {"export_s": round(time.perf_counter() - t0, 1), **describe(program.model_proto, path)}
        sess = ort_session(program.model_proto, args.threads)
        pfeed = {sess.get_inputs()[0].name: timed.numpy()}
        got = sess.run(None, pfeed)
        row["max_abs_diff_vs_pytorch"] = max(float((torch.from_numpy(g) - w).abs().max()) for g, w in zip(got, want))
        med = alternate({"reference": lambda: ref_sess.run(None, feed), "patched": lambda: sess.run(None, pfeed)},
                        "cpu", args.rounds)
        row.update(ort_reference_ms=round(med["reference"] * 1e3, 3), ort_patched_ms=round(med["patched"] * 1e3, 3),
                   ratio_patched_over_reference=round(med["patched"] / med["reference"], 3),
                   node_ratio=round(row["nodes"] / rows["reference"]["nodes"], 3))
        rows[f"patched-{form}"] = row
        print(form, {k: v for k, v in row.items() if k != "ops"}, flush=True)
    return rows


def bench_aoti(args, x, device, tmp):
    reference, patched = build(args.config, False).to(device), build(args.config, True).to(device)
    x = x.to(device)
    configs = {}
    key = "aot_inductor.compile_wrapper_opt_level"
    if args.fast_wrapper and key in torch._inductor.config.get_config_copy():
        configs[key] = "O0"
    t0 = time.perf_counter()
    path = rtdetr_kernels.export.aoti_package(patched, (x,), os.path.join(tmp, f"patched-{device.type}.pt2"),
                                              inductor_configs=configs)
    compile_s = time.perf_counter() - t0
    runner = torch._inductor.aoti_load_package(path)
    x = x[:args.batch]
    with torch.no_grad():
        want = patched(x)
        got = runner(x)
        diff = max(float((g - w).abs().max()) for g, w in zip(got, want))

        def call(fn):
            return lambda: fn(x)

        med = alternate({"eager_reference": call(reference), "eager_patched": call(patched), "aoti_patched": call(runner)},
                        device, args.rounds)
    return {"device": device.type, "compile_s": round(compile_s, 1), "inductor_configs": configs,
            "max_abs_diff_vs_eager": diff, **{f"{k}_ms": round(v * 1e3, 3) for k, v in med.items()},
            "ratio_aoti_over_eager_patched": round(med["aoti_patched"] / med["eager_patched"], 3),
            "ratio_aoti_over_eager_reference": round(med["aoti_patched"] / med["eager_reference"], 3)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="rtdetr_r18vd", help="an rtdetr config or a demo config ('tiny', 'small')")
    p.add_argument("--size", type=int, default=640)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--forms", nargs="+", default=["grid_sample", "gather"], help="MSDA ONNX forms of the patched model")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=None, help="torch and ORT intra-op threads (default: their own)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda: AOTInductor on CPU and on CUDA")
    p.add_argument("--skip-onnx", action="store_true")
    p.add_argument("--skip-aoti", action="store_true")
    p.add_argument("--fast-wrapper", action="store_true", help="compile the AOTInductor wrapper at -O0 (as the tests do)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/export-<device>.json)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # exported with a batch of 2 (torch.export specialises size-1 dimensions), timed at --batch
    x = torch.rand(max(2, args.batch), 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    result = {"config": args.config, "size": args.size, "batch": args.batch,
              "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                        f"{torch.get_num_threads()} threads)",
              "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "rtdetr_kernels": rtdetr_kernels.__version__},
              "command": " ".join(["python bench/export_bench.py"] + list(sys.argv[1:] if argv is None else argv))}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_onnx:
            import onnx
            import onnxruntime

            result["versions"].update(onnx=onnx.__version__, onnxruntime=onnxruntime.__version__)
            result["onnx"] = bench_onnx(args, x, tmp)
        if not args.skip_aoti:
            devices = [torch.device("cpu")] + ([torch.device("cuda")] if args.device == "cuda" else [])
            result["aoti"] = []
            for device in devices:
                row = bench_aoti(args, x, device, tmp)
                if device.type == "cuda":
                    row["gpu"] = torch.cuda.get_device_name(device)
                result["aoti"].append(row)
                print("aoti", row, flush=True)
    out = args.out or os.path.join(HERE, "results", f"export-{args.device}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", out)


if __name__ == "__main__":
    main()
