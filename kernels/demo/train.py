"""Training on generated scenes with the official set criterion, with a one-line progress bar."""
from __future__ import annotations

import math
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

import rtdetr

from .scenes import CLASSES, make_scenes


class Progress:
    """``\\r``-updated line: step, loss (running mean), steps/s, ETA; a plain line per update when not a tty."""

    def __init__(self, total: int, time_limit: Optional[float], stream=None, every: float = 0.5):
        self.total, self.time_limit = total, time_limit
        self.stream = stream or sys.stdout
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.every = every if self.tty else 10.0
        self.t0 = time.perf_counter()
        self.last = -math.inf

    def update(self, step: int, loss: float, final: bool = False):
        now = time.perf_counter()
        if not final and now - self.last < self.every:
            return
        self.last = now
        elapsed = now - self.t0
        rate = step / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        if self.time_limit is not None:
            eta = min(eta, max(0.0, self.time_limit - elapsed))
        width = 24
        filled = int(width * step / max(1, self.total))
        bar = "#" * filled + "-" * (width - filled)
        line = (f"  train [{bar}] {step:>4}/{self.total}  loss {loss:7.3f}  {rate:5.2f} steps/s  "
                f"{'elapsed' if final else 'ETA'} {elapsed if final else eta:5.0f}s")
        if self.tty:
            self.stream.write("\r" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def train(model: torch.nn.Module, steps: int, *, seed: int = 0, batch: int = 8, image_size: int = 64,
          lr: float = 2e-3, warmup: int = 30, clip: float = 0.1, budget: Optional[float] = None,
          calibrate: int = 12, hard_cap: bool = True, device: str = "cpu", progress: bool = True,
          on_step: Optional[Callable] = None) -> Dict:
    """AdamW (official recipe: weight decay 1e-4, grad-norm clip 0.1), linear warm-up then cosine decay to 5% over
    the planned steps; every batch freshly generated from ``seed``.

    With ``budget`` (seconds), the first ``calibrate`` steps (inside the warm-up, whose schedule does not depend on
    the total) measure the speed and the plan becomes ``min(steps, what fits in budget)``, measured again over the
    rest of the warm-up; the schedule is then fixed and runs to its end, and a second run given that step count repeats it exactly.  A run that falls behind
    (the machine got busier) still stops at 1.15 x budget, cutting the schedule, unless ``hard_cap`` is False.  Returns the per-step losses,
    steps done and seconds."""
    torch.manual_seed(seed)
    model.to(device).train()
    criterion = rtdetr.build_criterion(num_classes=len(CLASSES))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)

    warmup = min(warmup, steps)
    plan = {"steps": steps}

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, plan["steps"] - warmup))
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    gen = torch.Generator().manual_seed(10_000 + seed)
    bar = Progress(steps, None) if progress else None
    history: List[float] = []
    t0 = time.perf_counter()
    ema = None
    t_cal = None
    step = 0
    while step < plan["steps"]:
        step += 1
        if step == 3:
            t_cal = time.perf_counter()  # steps 1-2: first-call overheads
        images, targets = make_scenes(gen, batch, image_size)
        images = images.to(device)
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        losses = criterion(model(images, targets), targets)
        total = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        value = float(total.detach())
        history.append(value)
        ema = value if ema is None else 0.95 * ema + 0.05 * value
        if bar and (budget is None or step >= calibrate):
            bar.update(step, ema)
        if on_step:
            on_step(step, value)
        if budget is not None and step in (calibrate, warmup) and calibrate < warmup:
            # plan at `calibrate`, and again at the end of the warm-up from the steps since (the machine's load
            # changes): the cosine part of the schedule starts there, so it is still a whole schedule
            if step == calibrate:
                per_step = (time.perf_counter() - t_cal) / (calibrate - 2)
                t_cal = time.perf_counter()
            else:
                per_step = (time.perf_counter() - t_cal) / (warmup - calibrate)
            remaining = budget - (time.perf_counter() - t0)
            plan["steps"] = max(min(steps, warmup + 1), min(steps, step + int(0.95 * remaining / per_step)))
            if bar:
                bar.total = plan["steps"]
        if budget is not None and hard_cap and time.perf_counter() - t0 > 1.15 * budget:
            break
    seconds = time.perf_counter() - t0
    if bar:
        bar.update(step, ema if ema is not None else float("nan"), final=True)
    model.eval()
    return {"steps": step, "planned_steps": plan["steps"], "max_steps": steps, "seconds": seconds, "batch": batch, "image_size": image_size,
            "lr": lr, "loss": history, "stopped_by_time_limit": step < plan["steps"], "budget_s": budget}
