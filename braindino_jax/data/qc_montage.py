"""QC montages: PNG grids of written slices, so a person can eyeball a prepared corpus.

Two views: a random sample of slices per dataset, and the slices with the least foreground
(where a bad mask, a wrong orientation or an empty crop shows up first). Selection depends only
on each record's key and pixels, never on the order records arrive in, so a parallel runner
that merges partial samplers picks the same slices as a sequential one.

Each tile shows its slice's foreground box (the brain of a top slice is a few centimetres across
in a 256-pixel frame) enlarged up to MAX_ZOOM times to fill TILE pixels, framed by the patient
directions it is stored in (A top, P bottom, L left, R right: slices are stored neurologically),
with its label in a caption under it, wrapped or shortened to the tile's width so that it never
runs into a neighbour.
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
from PIL import Image, ImageDraw, ImageFont

from braindino_jax.data.atomic_file import write_atomic
from braindino_jax.data.records import SliceRecord

TILE = 256  # tile edge in pixels, the default slice size
MAX_ZOOM = 4
FRAME = 16  # the border holding the orientation letters
CAPTION_LINES = 2
FONT_SIZE = 13


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
    font = ImageFont.load_default(size=FONT_SIZE)
    line_height = FONT_SIZE + 3
    cell_w = TILE + 2 * FRAME
    cell_h = TILE + 2 * FRAME + CAPTION_LINES * line_height + 4
    columns = min(len(tiles), 8)
    rows = math.ceil(len(tiles) / columns)
    canvas = Image.new("L", (columns * cell_w, rows * cell_h), color=0)
    draw = ImageDraw.Draw(canvas)
    for i, (_, label, pixels) in enumerate(tiles):
        x, y = (i % columns) * cell_w, (i // columns) * cell_h
        image = _tile_image(pixels)
        left, top = x + FRAME + (TILE - image.width) // 2, y + FRAME + (TILE - image.height) // 2
        canvas.paste(image, (left, top))
        centre_x, centre_y = left + image.width // 2, top + image.height // 2
        for letter, (lx, ly) in {"A": (centre_x, top - FRAME // 2), "P": (centre_x, top + image.height + FRAME // 2),
                                 "L": (left - FRAME // 2, centre_y), "R": (left + image.width + FRAME // 2, centre_y)}.items():
            draw.text((lx, ly), letter, fill=150, font=font, anchor="mm")
        for k, line in enumerate(_fit_label(draw, label, font, cell_w - 6)):
            draw.text((x + 3, y + TILE + 2 * FRAME + 2 + k * line_height), line, fill=255, font=font)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG", compress_level=1)  # 2.6x faster than level 6, 16% larger
    return buffer.getvalue()


def _tile_image(pixels: np.ndarray) -> Image.Image:
    """The foreground box of a slice (plus a little background), scaled uniformly to fit TILE."""
    rows, cols = np.flatnonzero(pixels.any(axis=1)), np.flatnonzero(pixels.any(axis=0))
    if rows.size:
        pad = 4
        pixels = pixels[max(rows[0] - pad, 0) : rows[-1] + pad + 1, max(cols[0] - pad, 0) : cols[-1] + pad + 1]
    image = Image.fromarray(np.ascontiguousarray(pixels, np.uint8))
    scale = min(MAX_ZOOM, TILE / max(image.size))
    size = (max(1, min(TILE, round(image.width * scale))), max(1, min(TILE, round(image.height * scale))))
    return image if size == image.size else image.resize(size, Image.Resampling.BILINEAR)


def _fit_label(draw: ImageDraw.ImageDraw, label: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """At most CAPTION_LINES lines of ``label``, each narrower than ``width`` pixels: wrapped at
    spaces, then at any character; a remainder that still does not fit is cut with an ellipsis."""
    def fits(text: str) -> bool:
        return draw.textlength(text, font=font) <= width

    lines, rest = [], label
    while rest and len(lines) < CAPTION_LINES:
        if fits(rest):
            lines.append(rest)
            rest = ""
            break
        cut = max(k for k in range(1, len(rest) + 1) if fits(rest[:k]))
        space = rest.rfind(" ", 0, cut + 1)
        cut = space if space > 0 else cut
        lines.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    if rest:
        last = lines[-1]
        while last and not fits(last + "…"):
            last = last[:-1]
        lines[-1] = last + "…"
    return lines
