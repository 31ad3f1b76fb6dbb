"""Result files of a probe run: results.csv, results.md, summary.json and the sweep plot.

results.csv has one row per (encoder, task, head, label fraction, seed, metric): the long
format, so any table can be rebuilt from it. results.md and summary.json aggregate over seeds
(mean, and the sample std when there are several seeds).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from braindino_jax.data.atomic_file import write_atomic
from braindino_jax.probes.metrics import LOWER_IS_BETTER

RESULT_COLUMNS = ("encoder", "task", "head", "label_fraction", "seed", "metric", "value")


def aggregate(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std over seeds per (encoder, task, head, label fraction, metric), NaNs ignored."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in records:
        groups[(r["encoder"], r["task"], r["head"], r["label_fraction"], r["metric"])].append(r["value"])
    out = []
    for (encoder, task, head, fraction, metric), values in groups.items():
        finite = np.asarray([v for v in values if v is not None and math.isfinite(v)], np.float64)
        mean = float(finite.mean()) if finite.size else float("nan")
        std = float(finite.std(ddof=1)) if finite.size > 1 else float("nan")
        out.append({"encoder": encoder, "task": task, "head": head, "label_fraction": fraction,
                    "metric": metric, "mean": mean, "std": std, "n_seeds": len(values),
                    "n_finite": int(finite.size)})
    return out


def _cell(mean: float, std: float, n: int) -> str:
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.3f}" if n < 2 or not math.isfinite(std) else f"{mean:.3f} ± {std:.3f}"


def markdown_tables(summary_rows: list[dict[str, Any]], metrics: list[str]) -> str:
    """One table per metric: a row per (encoder, head), a column per label fraction. The bounds
    of a bootstrap CI (``<metric>_ci95_low/high``) share one table, as ``[low, high]``."""
    fractions = sorted({r["label_fraction"] for r in summary_rows})
    cells: dict[str, dict[tuple, dict[float, Any]]] = defaultdict(lambda: defaultdict(dict))
    for r in summary_rows:
        cells[r["metric"]][(r["encoder"], r["head"])][r["label_fraction"]] = r
    lines = []
    for metric in metrics:
        if metric not in cells or metric.endswith(("_ci95_low", "_ci95_high")):
            continue
        if metric == "k":
            note = "the k chosen on val"
        else:
            note = f"{'lower' if metric in LOWER_IS_BETTER else 'higher'} is better; mean ± std over seeds"
        tables = [(f"### {metric} ({note})", {key: {f: _cell(r["mean"], r["std"], r["n_finite"])
                                                      for f, r in row.items()}
                                                for key, row in cells[metric].items()})]
        if f"{metric}_ci95_low" in cells:
            low, high = cells[f"{metric}_ci95_low"], cells[f"{metric}_ci95_high"]
            tables.append((f"### {metric}: bootstrap 95% CI on test (bounds averaged over seeds)", {
                key: {f: f"[{r['mean']:.3f}, {high[key][f]['mean']:.3f}]" for f, r in row.items()}
                for key, row in low.items()}))
        for title, table in tables:
            lines += [title, "", "| encoder | head | " + " | ".join(f"{f:g} of labels" for f in fractions) + " |",
                      "|---|---|" + "---|" * len(fractions)]
            for (encoder, head), by_fraction in table.items():
                lines.append(f"| `{encoder}` | {head} | " + " | ".join(by_fraction.get(f, "") for f in fractions) + " |")
            lines.append("")
    return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    return value


def write_results(out_dir: str | os.PathLike, records: list[dict[str, Any]], headline: str,
                  summary: dict[str, Any]) -> dict[str, Path]:
    """Write the four result files into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=RESULT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in records:
        writer.writerow({**{k: r[k] for k in RESULT_COLUMNS}, "value": _format_value(r["value"])})
    paths = {"csv": out / "results.csv", "md": out / "results.md", "json": out / "summary.json",
             "plot": out / "metric_vs_fraction.png"}
    write_atomic(paths["csv"], buffer.getvalue().encode())

    aggregated = aggregate(records)
    metrics = [headline] + sorted({r["metric"] for r in records} - {headline})
    task = records[0]["task"] if records else summary.get("task", {}).get("name", "")
    text = f"# Probe results: {task}\n\nHeadline metric: **{headline}**.\n\n" + markdown_tables(aggregated, metrics)
    write_atomic(paths["md"], text.encode())
    summary = {**summary, "headline_metric": headline, "aggregated": aggregated}
    write_atomic(paths["json"], json.dumps(_json_safe(summary), indent=1, sort_keys=True).encode())
    plot_sweep([r for r in aggregated if r["metric"] == headline], headline, paths["plot"])
    return paths


def _format_value(value: float) -> str:
    return "nan" if value is None or not math.isfinite(value) else repr(float(value))


def plot_sweep(rows: list[dict[str, Any]], metric: str, path: str | os.PathLike) -> None:
    """Headline metric vs label fraction: a panel per head, a line per encoder, std as error
    bars (the per-k kNN rows are left out; ``knn`` is the k chosen on val)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if not re.fullmatch(r"knn_k\d+", r["head"])]
    heads = sorted({r["head"] for r in rows})
    encoders = sorted({r["encoder"] for r in rows})
    fig, axes = plt.subplots(1, max(len(heads), 1), figsize=(4.2 * max(len(heads), 1), 3.8), dpi=120,
                             sharey=True, squeeze=False)
    fractions = sorted({r["label_fraction"] for r in rows})
    for ax, head in zip(axes[0], heads):
        for encoder in encoders:
            points = sorted((r for r in rows if r["head"] == head and r["encoder"] == encoder),
                            key=lambda r: r["label_fraction"])
            if not points:
                continue
            x = [p["label_fraction"] for p in points]
            y = [p["mean"] for p in points]
            err = [p["std"] if math.isfinite(p["std"]) else 0.0 for p in points]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=encoder)
        if fractions and fractions[-1] / fractions[0] >= 10:
            ax.set_xscale("log")
        ax.set_title(head, fontsize=9)
        ax.set_xlabel("fraction of training subjects labelled")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel(metric)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=1, fontsize=7)
    fig.tight_layout(rect=(0, 0.06 * max(len(encoders), 1), 1, 1))
    fig.savefig(path)
    plt.close(fig)
