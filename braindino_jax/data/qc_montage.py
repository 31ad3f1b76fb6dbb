"""QC montages: PNG grids of written slices, so a person can eyeball a prepared corpus.

Two views: a random sample of slices per dataset, and the slices with the least foreground
(where a bad mask, a wrong orientation or an empty crop shows up first). Selection depends only
on each record's key and pixels, never on the order records arrive in, so a parallel runner
that merges partial samplers picks the same slices as a sequential one.
"""

from __future__ import annotations

import hashlib
import heapq
import io
import json
import math
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from braindino_jax.data.atomic_file import write_atomic
from braindino_jax.data.records import SliceRecord

TILE = 128


def sample_rank(seed: int, key: str) -> int:
    """Pseudo-random, order-independent rank of a record: the sample keeps the smallest."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "big")


def foreground_fraction(pixels: np.ndarray) -> float:
    return float(np.count_nonzero(pixels)) / pixels.size


class QcSampler:
    """Keeps `per_dataset` random slices per dataset and the `worst` lowest-foreground slices."""

    def __init__(self, per_dataset: int = 16, worst: int = 16, seed: int = 0):
        self.per_dataset = per_dataset
        self.worst = worst
        self.seed = seed
        # Max-heaps (negated keys) of the entries to keep: (-rank, key, label, pixels).
        self._samples: dict[str, list] = {}
        self._worst: list = []

    def observe(self, key: str, record: SliceRecord) -> None:
        rank = sample_rank(self.seed, key)
        label = f"{record.subject} {record.modality} z{record.slice_index}"
        fraction = foreground_fraction(record.pixels)
        heap = self._samples.setdefault(record.dataset, [])
        self._push(heap, self.per_dataset, (-rank, key, label, record.pixels))
        self._push(self._worst, self.worst, (-fraction, -rank, key, f"{record.dataset}/{label}", record.pixels))

    @staticmethod
    def _push(heap: list, capacity: int, entry: tuple) -> None:
        if capacity <= 0:
            return
        if len(heap) < capacity:
            heapq.heappush(heap, entry)
        elif entry[:-2] > heap[0][:-2]:
            heapq.heapreplace(heap, entry)

    def merge(self, other: "QcSampler") -> "QcSampler":
        for dataset, heap in other._samples.items():
            mine = self._samples.setdefault(dataset, [])
            for entry in heap:
                self._push(mine, self.per_dataset, entry)
        for entry in other._worst:
            self._push(self._worst, self.worst, entry)
        return self

    def selections(self) -> dict[str, list[tuple[str, str, np.ndarray]]]:
        """Montage name → [(record key, tile label, pixels)], in a fixed order."""
        out = {}
        for dataset, heap in sorted(self._samples.items()):
            if not heap:  # per_dataset == 0: no sample montages
                continue
            entries = sorted(heap, key=lambda e: -e[0])
            out[f"sample_{_safe_name(dataset)}"] = [(e[1], e[2], e[3]) for e in entries]
        if self._worst:
            entries = sorted(self._worst, key=lambda e: (-e[0], -e[1]))
            out["worst_foreground"] = [
                (e[2], f"{e[3]} fg{-e[0]:.0%}", e[4]) for e in entries
            ]
        return out

    def write(self, qc_dir: str | os.PathLike) -> list[Path]:
        """Write one PNG per montage plus `index.json` naming every tile; returns the PNGs."""
        qc_dir = Path(qc_dir)
        written, index = [], {}
        for name, tiles in self.selections().items():
            path = qc_dir / f"{name}.png"
            write_atomic(path, _montage_png(tiles))
            written.append(path)
            index[path.name] = [{"key": key, "label": label} for key, label, _ in tiles]
        write_atomic(qc_dir / "index.json", json.dumps(index, indent=1).encode())
        return written


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "_"


def _montage_png(tiles: list[tuple[str, str, np.ndarray]]) -> bytes:
    columns = min(len(tiles), 8)
    rows = math.ceil(len(tiles) / columns)
    canvas = Image.new("L", (columns * TILE, rows * TILE), color=0)
    draw = ImageDraw.Draw(canvas)
    for i, (_, label, pixels) in enumerate(tiles):
        tile = Image.fromarray(np.ascontiguousarray(pixels, np.uint8)).resize((TILE, TILE), Image.Resampling.BILINEAR)
        x, y = (i % columns) * TILE, (i // columns) * TILE
        canvas.paste(tile, (x, y))
        draw.text((x + 2, y + 1), label, fill=255)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()
