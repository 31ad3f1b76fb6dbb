"""Where a run's numbers go: ``metrics.jsonl``, TensorBoard event files, the console, a PNG.

Only process 0 writes. ``metrics.jsonl`` has one JSON object per logging step (``step`` plus
every metric the step returns, eval results under ``eval/``); a resumed run appends to it, after
dropping rows past the step it resumes from, so the file always describes one history.
TensorBoard events are written with tensorboardX (no TensorFlow needed).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import jax

CURVES = (
    ("losses", ("loss", "dino_loss", "ibot_loss", "koleo_loss", "gram_loss")),
    ("DINO parts", ("dino_global_loss", "dino_local_loss")),
    ("target entropy (nats)", ("diagnostics/target_entropy",)),
    ("effective prototypes", ("diagnostics/effective_prototypes",)),
    ("feature std", ("diagnostics/feature_std",)),
    ("student-teacher KL", ("diagnostics/student_teacher_kl",)),
    ("gradient norms", ("grad_norm/backbone", "grad_norm/dino_head", "grad_norm/ibot_head")),
    ("schedules", ("lr", "weight_decay", "teacher_temp")),
)

CONSOLE = ("loss", "dino_loss", "ibot_loss", "koleo_loss", "gram_loss", "lr", "weight_decay",
           "momentum", "teacher_temp")


class MetricsLog:
    """Appends metric rows for one run (process 0 only; other processes do nothing)."""

    def __init__(self, workdir: str, resume_step: int = 0):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._writer = None
        if not self.active:
            return
        rows = read_metrics(self.path) if os.path.exists(self.path) else []
        with open(self.path, "w") as f:  # keep only the history this run continues
            for row in rows:
                if row.get("step", 0) <= resume_step:
                    f.write(json.dumps(row) + "\n")
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.active:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _plain(value: Any) -> Any:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return value
    return int(number) if float(number).is_integer() and abs(number) < 2**53 else number


def read_metrics(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def console_line(step: int, total: int, metrics: Mapping[str, Any], images_per_s: float,
                 eta_s: float) -> str:
    """``step 120/300 | loss 10.31 dino 6.93 ... | 43.1 img/s | ETA 4m10s``."""
    parts = []
    for key in CONSOLE:
        if key in metrics:
            value = float(metrics[key])
            name = key.removesuffix("_loss") if key != "loss" else key
            parts.append(f"{name} {value:.4g}")
    eta = f"{int(eta_s // 3600)}h{int(eta_s % 3600 // 60):02d}m" if eta_s >= 3600 else \
        f"{int(eta_s // 60)}m{int(eta_s % 60):02d}s"
    return f"step {step}/{total} | " + " ".join(parts) + f" | {images_per_s:.1f} img/s | ETA {eta}"


def plot_curves(metrics_path: str, png_path: str) -> str:
    """Loss curves and collapse diagnostics from ``metrics.jsonl`` as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    panels = [(title, [k for k in keys if any(k in r for r in rows)]) for title, keys in CURVES]
    evals = sorted({k for r in rows for k in r if k.startswith("eval/")})
    if evals:
        panels.append(("evaluation", evals))
    panels = [(t, keys) for t, keys in panels if keys]
    cols = 3
    rows_n = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows_n, cols, figsize=(5 * cols, 3.2 * rows_n), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels):
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), label=key.split("/")[-1])
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
