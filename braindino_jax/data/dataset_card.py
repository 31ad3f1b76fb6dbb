"""`dataset_card.json`: what a prepared corpus holds and exactly how it was made.

Built only from manifest rows (whose pixel moments are exact integers), so both runners
produce the same card, and a probe can re-apply the recorded preprocessing config verbatim.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from typing import Any

import braindino_jax
from braindino_jax.data import manifest
from braindino_jax.data.records import SCHEMA_VERSION
from braindino_jax.preprocessing.config import PrepConfig


def _moments(stats: list[dict[str, int]]) -> dict[str, Any]:
    n = sum(s["pixels"] for s in stats)
    n_fg = sum(s["foreground"] for s in stats)
    total = sum(s["sum"] for s in stats)
    total_sq = sum(s["sum_sq"] for s in stats)

    def mean_std(count: int) -> tuple[float | None, float | None]:
        if count == 0:
            return None, None
        mean = total / count
        return mean, math.sqrt(max(total_sq / count - mean * mean, 0.0))

    mean, std = mean_std(n)
    fg_mean, fg_std = mean_std(n_fg)  # background pixels are 0, so they add nothing to the sums
    return {
        "pixels": n,
        "mean": mean,
        "std": std,
        "foreground_fraction": n_fg / n if n else None,
        "foreground_mean": fg_mean,
        "foreground_std": fg_std,
    }


def _totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    counts = {status: 0 for status in manifest.STATUSES}
    for row in rows:
        counts[row["status"]] += 1
    ok = [r for r in rows if r["status"] == manifest.OK]
    return {
        "volumes": counts,
        "subjects": len({(r["dataset"], r["subject"]) for r in ok}),
        "slices": sum(r["slices_kept"] for r in ok),
        "record_bytes": sum(r["record_bytes"] for r in ok),
        "pixels": _moments([r["pixel_stats"] for r in ok]),
    }


def build_card(
    rows: list[dict[str, Any]],
    config: PrepConfig,
    shard_files: list[str],
    shard_records: list[int],
) -> dict[str, Any]:
    """Totals overall, per dataset and per modality, pixel statistics, config and version."""
    by_dataset: dict[str, list] = defaultdict(list)
    by_modality: dict[str, list] = defaultdict(list)
    for row in rows:
        by_dataset[row["dataset"]].append(row)
        by_modality[row["modality"]].append(row)
    return {
        "package": "braindino_jax",
        "version": braindino_jax.__version__,
        "record_schema_version": SCHEMA_VERSION,
        "preprocessing": config.to_dict(),
        "pixel_units": "uint8 storage units; 0 = background, foreground mapped to [1, 255]",
        "shards": {"files": shard_files, "records": shard_records},
        "totals": _totals(rows),
        "per_dataset": {name: _totals(group) for name, group in sorted(by_dataset.items())},
        "per_modality": {name: _totals(group) for name, group in sorted(by_modality.items())},
    }


def encode_card(card: dict[str, Any]) -> bytes:
    return json.dumps(card, indent=2, ensure_ascii=False).encode("utf-8")
