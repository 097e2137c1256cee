"""``python -m rtdetr_kernels demo``: train a small RT-DETR with the kernels patched in on generated scenes, measure
its COCO mAP on held-out scenes, draw its detections, and show what the kernels change (parity and timings).

Nothing here is imported by the ops or the integrations; this package only uses them.  ``main(argv)`` is the entry
point (``make demo`` runs it with no arguments); everything is written to one folder (``--out``, default
``demo-output/``): ``detections.png``, ``detections_grid.png`` and ``demo.json`` with every figure printed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Dict, List, Optional

__all__ = ["main", "run"]

# training seconds in the default run (at most 1.15x that when the machine slows down mid-run); the rest (start-up,
# eval, parity, timings) takes ~30 s: `make demo` measured 3:32 with 150 s here on a loaded 2-core box
DEFAULT_BUDGET_S = 130.0


def _parser() -> argparse.ArgumentParser:
    from .model import config_names

    p = argparse.ArgumentParser(prog="python -m rtdetr_kernels demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tiny", choices=config_names(),
                   help="model: 'tiny' (default) / 'small' (narrow rtdetr_r18vd, see kernels/demo/model.py) or an "
                        "rtdetr config name (needed with --checkpoint if it cannot be inferred)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1 ...")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps, exactly (default: as many as fit in --budget seconds, at most 3000)")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="training seconds when --steps is not given")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image-size", type=int, default=64, help="generated scene size (multiple of 32)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-images", type=int, default=200, help="held-out scenes for the mAP")
    p.add_argument("--out", default="demo-output", help="output folder (PNG, demo.json)")
    p.add_argument("--deterministic", action="store_true",
                   help="train twice under torch.use_deterministic_algorithms(True); check the weights are bitwise equal")
    p.add_argument("--checkpoint", default=None,
                   help="official (.pth: ema.module / model / bare) or transformers (.safetensors / .bin) RT-DETR "
                        "checkpoint; loaded strictly with weights_only; no training")
    p.add_argument("--image", default=None, help="a picture to run on; saved with boxes and labels in --out")
    p.add_argument("--threshold", type=float, default=0.3, help="score threshold for drawing")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 on a machine with <= 2 cores, where a second thread "
                        "contending with any other process makes steps many times slower; else torch's default)")
    p.add_argument("--no-timings", action="store_true", help="skip the timing tables")
    p.add_argument("--timing-budget", type=float, default=1.0, help="seconds per timed comparison")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    args.argv = argv
    result = run(args)
    return 0 if result.get("ok", False) else 1


def _say(*parts):
    print(*parts, flush=True)


def _fmt_table(rows: List[Dict], cols: List[tuple]) -> str:
    head = [c[0] for c in cols]
    body = [[(c[2].format(r[c[1]]) if len(c) > 2 else str(r[c[1]])) for c in cols] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    lines = ["  " + "  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines += ["  " + "  ".join(v.ljust(w) for v, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def run(args) -> Dict:
    """The whole demo for parsed ``args`` (see ``_parser``); returns what it wrote to ``demo.json``."""
    t_start = time.perf_counter()
    import torch

    import rtdetr
    import rtdetr_kernels
    from . import compare, draw, evaluate, model as models, scenes, train

    threads = args.threads or (1 if (os.cpu_count() or 1) <= 2 else None)
    if threads:
        torch.set_num_threads(threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    os.makedirs(args.out, exist_ok=True)
    report: Dict = {"command": " ".join(["python -m rtdetr_kernels demo"] + list(getattr(args, "argv", []))),
                    "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "versions": {"python": platform.python_version(), "torch": torch.__version__,
                                 "rtdetr_kernels": rtdetr_kernels.__version__},
                    "device": _device_name(torch, device), "torch_threads": torch.get_num_threads(),
                    "backends": compare.chosen_backends(device), "files": {}}
    _say(f"rtdetr_kernels demo: device {report['device']}, torch {torch.__version__}, "
         f"{torch.get_num_threads()} CPU thread(s)")
    _say("  backends (auto): " + ", ".join(f"{op} -> {b}" for op, b in report["backends"].items()))

    if args.checkpoint:
        model, names, input_size = _load_checkpoint(args, torch, rtdetr, models, report)
    else:
        names, input_size = list(scenes.CLASSES), args.image_size
        torch.manual_seed(args.seed)
        model = models.build(args.config, len(names)).to(device)
        report["config"] = {"name": args.config, "classes": names,
                            "parameters": sum(p.numel() for p in model.parameters())}
    model.to(device)
    nparams = sum(p.numel() for p in model.parameters())
    _say(f"model: {report['config']['name']} ({nparams / 1e6:.2f} M parameters), {len(names)} classes, "
         f"input {input_size}x{input_size}")

    criterion = rtdetr.build_criterion(num_classes=len(names))
    gen_batch = scenes.make_scenes(torch.Generator().manual_seed(999), args.batch, args.image_size)
    if not args.checkpoint:
        # ---- train, patched
        patch = rtdetr_kernels.patch(model)
        report["patched"] = patch.counts()
        _say("training with the kernels patched in ("
             + "; ".join(f"{kind}: {sum(c.values())} x {', '.join(c)}" for kind, c in report["patched"].items())
             + f"), batch {args.batch}, "
             f"{'%d steps' % args.steps if args.steps else 'a %.0f s budget' % args.budget}:")
        steps = args.steps or 3000
        budget = None if args.steps else args.budget
        det_ctx = _deterministic(torch) if args.deterministic else _null()
        with det_ctx:
            tr = train.train(model, steps, seed=args.seed, batch=args.batch, image_size=args.image_size, lr=args.lr,
                             budget=budget, hard_cap=not args.deterministic, device=device, progress=not args.quiet)
        report["training"] = tr
        first, last = _mean(tr["loss"][:20]), _mean(tr["loss"][-20:])
        _say(f"  {tr['steps']} steps in {tr['seconds']:.1f} s ({tr['steps'] / tr['seconds']:.2f} steps/s); "
             f"loss (mean of 20 steps) {first:.2f} -> {last:.2f}")
        if args.deterministic:
            report["determinism"] = _determinism_check(args, torch, models, train, model, tr, device, names)
        # ---- evaluate
        t0 = time.perf_counter()
        images, targets = evaluate.held_out(args.eval_images, args.image_size)
        dets = evaluate.detect(model, images, len(names))
        stats = evaluate.coco_map(dets, targets, args.image_size)
        report["evaluation"] = {"held_out_images": args.eval_images, "seed": evaluate.EVAL_SEED,
                                "seconds": time.perf_counter() - t0, "coco": stats}
        _say(f"held-out COCO eval on {args.eval_images} generated scenes ({stats['evaluator']}): "
             f"mAP@0.5 {stats['mAP50']:.3f}, mAP@[.5:.95] {stats['mAP']:.3f}, mAP@0.75 {stats['mAP75']:.3f}"
             + (f", AR@100 {stats['AR100']:.3f}" if "AR100" in stats else ""))
        patch.revert()
        # ---- draw
        scale = max(1, 512 // args.image_size)
        path = os.path.join(args.out, "detections.png")
        boxes = lambda t: {"boxes": _xyxy(t["boxes"]) * args.image_size}  # noqa: E731
        n = draw.draw(draw.to_pil(images[0]), dets[0], names, path, args.threshold, scale, truth=boxes(targets[0]))
        tiles = []
        for i in range(8):
            tile = os.path.join(args.out, f".tile{i}.png")
            draw.draw(draw.to_pil(images[i]), dets[i], names, tile, args.threshold, 3, truth=boxes(targets[i]))
            tiles.append(tile)
        grid = os.path.join(args.out, "detections_grid.png")
        draw.grid(tiles, grid)
        for t in tiles:
            os.remove(t)
        report["files"].update(detections=path, detections_grid=grid)
        _say(f"drew {n} detections (score >= {args.threshold}, same-class overlaps above IoU 0.45 shown once) on "
             f"held-out scene 0 -> {path} "
             f"(ground truth in thin white); 8 scenes -> {grid}")
        par_images = images[:16].to(device)
        par_train = (gen_batch[0].to(device), [{k: v.to(device) for k, v in t.items()} for t in gen_batch[1]])
    else:
        par_images = torch.rand(2, 3, input_size, input_size, generator=torch.Generator().manual_seed(5)).to(device)
        par_train = None

    if args.image:
        report["image"] = _run_image(args, torch, model, names, input_size, device, draw, evaluate, report)

    # ---- parity
    par = compare.parity(model, par_images, len(names), args.threshold, train_batch=par_train, criterion=criterion)
    report["parity"] = par
    _say(f"patched vs unpatched on the same {par['images']} images: max |diff| logits "
         f"{par['max_abs_diff']['pred_logits']:.2e} (of {par['max_abs_value']['pred_logits']:.1f}), boxes "
         f"{par['max_abs_diff']['pred_boxes']:.2e}"
         + (f" ({par['queries_reordered']} equal-score queries in another order)" if par["queries_reordered"] else "")
         + f"; same detections: {par['same_detections']} "
         f"({par['detections_compared']} above {args.threshold}, max box diff {par['max_box_diff_px']:.1e} px)")
    if "training_step" in par:
        ts = par["training_step"]
        _say(f"  training step: loss {ts['loss_reference']:.5f} vs {ts['loss_patched']:.5f}; gradients: max |diff| "
             f"{ts['max_grad_abs_diff']:.1e} (largest gradient {ts['max_abs_grad']:.1e}), worst relative to its own "
             f"largest entry {ts['max_grad_rel_diff']:.1e} ({ts['worst_parameter']})")

    # ---- timings
    if not args.no_timings:
        x = gen_batch[0].to(device) if not args.checkpoint else par_images
        rows = compare.op_timings(model, x[:1], args.timing_budget)
        report["op_timings_batch1"] = rows
        _say(f"per-op time at this model's shapes (batch 1, {report['device']}; median of alternating A/B calls):")
        _say(_fmt_table(rows, [("op", "op"), ("mode", "mode"), ("reference ms", "reference_ms", "{:.3f}"),
                               ("ours ms", "ours_ms", "{:.3f}"), ("speedup", "speedup", "{:.2f}x"),
                               ("shape", "shape")]))
        e2e_targets = par_train[1] if par_train is not None else None
        if e2e_targets is None:
            e2e_targets = [{"labels": torch.tensor([0, 1], device=device),
                            "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.2]], device=device)}] * len(x)
        rows = compare.end_to_end(model, x, e2e_targets, criterion, 2 * args.timing_budget)
        report["end_to_end"] = rows
        _say(f"end to end (unpatched vs patched, {report['device']}):")
        _say(_fmt_table(rows, [("what", "what"), ("shape", "shape"), ("reference ms", "reference_ms", "{:.2f}"),
                               ("ours ms", "ours_ms", "{:.2f}"), ("speedup", "speedup", "{:.2f}x")]))

    report["total_seconds"] = time.perf_counter() - t_start
    ok = par["same_detections"] and max(par["max_abs_diff"].values()) < 1e-3
    if "determinism" in report:
        ok = ok and report["determinism"]["bitwise_equal"]
    report["ok"] = bool(ok)
    path = os.path.join(args.out, "demo.json")
    report["files"]["json"] = path
    with open(path, "w") as f:
        json.dump(report, f, indent=1, default=float)
    _say(f"wrote {path}; total {report['total_seconds']:.0f} s; {'OK' if ok else 'FAILED: patched and unpatched differ'}")
    return report


def _mean(xs):
    return sum(xs) / max(1, len(xs))


def _xyxy(b):
    import torch
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def _device_name(torch, device: str) -> str:
    d = torch.device(device)
    if d.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(d)})"
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _deterministic:
    def __init__(self, torch):
        self.torch = torch

    def __enter__(self):
        self.prev = self.torch.are_deterministic_algorithms_enabled()
        self.torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        return self

    def __exit__(self, *exc):
        self.torch.use_deterministic_algorithms(self.prev)
        return False


def _determinism_check(args, torch, models, train, model, tr, device, names) -> Dict:
    """Repeat the training run (same seed, the same number of steps, no budget) under deterministic algorithms and
    compare every weight and buffer bitwise with the first run's."""
    import rtdetr_kernels

    _say(f"--deterministic: training again for the same {tr['steps']} steps to compare the weights bitwise:")
    assert tr["steps"] == tr["planned_steps"], "the first run was cut short; its schedule cannot be repeated"
    torch.manual_seed(args.seed)
    again = models.build(args.config, len(names)).to(device)
    patch = rtdetr_kernels.patch(again)
    with _deterministic(torch):
        train.train(again, tr["steps"], seed=args.seed, batch=args.batch, image_size=args.image_size, lr=args.lr,
                    device=device, progress=not args.quiet)
    patch.revert()
    a, b = model.state_dict(), again.state_dict()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    result = {"steps": tr["steps"], "tensors": len(a), "bitwise_equal": not differing, "differing": differing[:20]}
    _say(f"  weights and buffers of the two runs: {len(a) - len(differing)}/{len(a)} tensors bitwise equal -> "
         f"{'bitwise equal' if not differing else 'DIFFERENT: ' + ', '.join(differing[:5])}")
    return result


# COCO's 80 class names in the order of the official 80-way heads (for --checkpoint)
COCO_NAMES = ("person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant stop_sign "
              "parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag "
              "tie suitcase frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard surfboard "
              "tennis_racket bottle wine_glass cup fork knife spoon bowl banana apple sandwich orange broccoli carrot "
              "hot_dog pizza donut cake chair couch potted_plant bed dining_table toilet tv laptop mouse remote "
              "keyboard cell_phone microwave oven toaster sink refrigerator book clock vase scissors teddy_bear "
              "hair_drier toothbrush").split(" ")
COCO_NAMES = tuple(n.replace("_", " ") for n in COCO_NAMES)


def _read_state_dict(path: str, torch):
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return dict(load_file(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def _load_checkpoint(args, torch, rtdetr, models, report):
    """Build the config the checkpoint fits (``--config`` if it is an rtdetr name, else every rtdetr config tried on
    the meta device) and load it strictly; transformers checkpoints (keys ``model.*``) are converted first."""
    raw = rtdetr.extract_state_dict(_read_state_dict(args.checkpoint, torch))
    source = "transformers" if any(k.startswith("model.") for k in raw) else "official"
    converted = {}

    def state_dict_for(version):  # transformers names map to official ones per decoder version
        if source == "official":
            return raw
        if version not in converted:
            converted[version] = rtdetr.convert.from_transformers(raw, version=version)
        return converted[version]

    candidates = [args.config] if args.config in rtdetr.CONFIGS else sorted(rtdetr.CONFIGS)
    chosen, sd = None, None
    for name in candidates:
        sd = state_dict_for(rtdetr.CONFIGS[name]["version"])
        score = next((k for k in sd if k.startswith("decoder.dec_score_head.") and k.endswith(".weight")), None)
        num_classes = int(sd[score].shape[0]) if score else 80
        want = {k: tuple(v.shape) for k, v in sd.items() if not k.endswith("num_batches_tracked")}
        with torch.device("meta"):
            m = rtdetr.build_model(name, num_classes=num_classes)
        # v2 buffers (num_points_scale) are derived, not in transformers files: load_checkpoint judges those
        have = {k: tuple(v.shape) for k, v in m.state_dict().items() if not k.endswith("num_batches_tracked")
                and (source == "official" or not k.endswith("num_points_scale"))}
        if have == want:
            chosen = name
            break
    if chosen is None:
        chosen = candidates[0]  # load_checkpoint's strict error then says what does not match
        sd = state_dict_for(rtdetr.CONFIGS[chosen]["version"])
        score = next((k for k in sd if k.startswith("decoder.dec_score_head.") and k.endswith(".weight")), None)
        num_classes = int(sd[score].shape[0]) if score else 80
    model = rtdetr.build_model(chosen, num_classes=num_classes)
    if source == "transformers":  # v2's num_points_scale is derived from the config, not stored by transformers
        sd = {**{k: v for k, v in model.state_dict().items() if k.endswith("num_points_scale")}, **sd}
    rtdetr.load_checkpoint(model, sd, strict=True)
    model.eval()
    names = list(COCO_NAMES) if num_classes == 80 else [str(i) for i in range(num_classes)]
    report["config"] = {"name": chosen, "checkpoint": args.checkpoint, "checkpoint_format": source,
                        "classes": num_classes, "parameters": sum(p.numel() for p in model.parameters())}
    _say(f"loaded {source} checkpoint {args.checkpoint} strictly into {chosen} ({num_classes} classes)")
    return model, names, 640


def _run_image(args, torch, model, names, input_size, device, draw, evaluate, report) -> Dict:
    """Resize the picture to the model's input size, detect, scale boxes back, draw on the original."""
    from PIL import Image
    import torch.nn.functional as F

    pil = Image.open(args.image).convert("RGB")
    x = torch.frombuffer(bytearray(pil.tobytes()), dtype=torch.uint8).view(pil.height, pil.width, 3)
    x = x.permute(2, 0, 1).float().div(255).unsqueeze(0)
    x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False).to(device)
    import rtdetr_kernels
    patch = rtdetr_kernels.patch(model)
    try:
        model.eval()
        with torch.no_grad():
            det = evaluate.postprocessor(model, len(names))(model(x), torch.tensor([[pil.width, pil.height]],
                                                                                  device=device))[0]
    finally:
        patch.revert()
    det = {k: v.cpu() for k, v in det.items()}
    stem = os.path.splitext(os.path.basename(args.image))[0]
    path = os.path.join(args.out, f"{stem}_detections.png")
    n = draw.draw(pil, det, names, path, args.threshold)
    report["files"]["image_detections"] = path
    keep = det["scores"] >= args.threshold
    out = {"image": args.image, "size_wh": [pil.width, pil.height], "drawn": n,
           "detections": [{"label": names[l], "score": s, "box_xyxy": b} for l, s, b in
                          zip(det["labels"][keep].tolist(), det["scores"][keep].tolist(), det["boxes"][keep].tolist())]}
    _say(f"{args.image}: {n} detections with score >= {args.threshold} -> {path}")
    return out
