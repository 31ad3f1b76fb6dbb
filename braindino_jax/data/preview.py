"""A PNG of what the model will see: augmented crops and iBOT masks for a few slices.

Rows are samples; each row holds global crop 1, global crop 2 (masked patches tinted red),
then the local crops at their own size. Intensities are z-scores shown through a fixed
window (default [-2.5, 2.5] -> black..white), so augmentation-driven intensity changes stay
visible instead of being undone by per-crop rescaling; background (0) shows as mid-grey.
`add_legend` titles the columns and explains the tint and the window under the grid, so the
PNG reads on its own.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from braindino_jax.data.augment import AugmentConfig, augment_batch
from braindino_jax.data.pipeline import PipelineConfig, expand_shards, first_record, host_dataset

_MASK_TINT = np.array([255, 0, 0], np.float32)
_MASK_ALPHA = 0.45


def grid_size(n_samples: int, n_local: int, global_size: int, local_size: int,
              pad: int = 4) -> tuple[int, int]:
    """(width, height) in pixels of the grid `render_grid` draws."""
    width = pad + 2 * (global_size + pad) + n_local * (local_size + pad)
    return width, pad + n_samples * (global_size + pad)


def _to_rgb(view: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """[H, W] or [H, W, C] z-scores -> uint8-valued float RGB [H, W, 3]."""
    if view.ndim == 3:
        view = view[..., 0]
    lo, hi = window
    grey = np.clip((view.astype(np.float32) - lo) / (hi - lo), 0, 1) * 255
    return np.repeat(grey[..., None], 3, axis=-1)


def _overlay(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Tint the patches where the flat row-major `mask` is True."""
    size = rgb.shape[0]
    grid = int(round(np.sqrt(mask.size)))
    if grid * grid != mask.size or size % grid:
        raise ValueError(f"masks: {mask.size} patches do not tile a {size}x{size} crop")
    patch = size // grid
    pixel_mask = np.kron(mask.reshape(grid, grid), np.ones((patch, patch), bool))
    rgb = rgb.copy()
    rgb[pixel_mask] = (1 - _MASK_ALPHA) * rgb[pixel_mask] + _MASK_ALPHA * _MASK_TINT
    return rgb


def render_grid(
    global_crops: np.ndarray,
    local_crops: np.ndarray,
    masks: np.ndarray | None = None,
    window: tuple[float, float] = (-2.5, 2.5),
    pad: int = 4,
) -> Image.Image:
    """Grid image of `global_crops` [S, 2, G, G(, C)], `local_crops` [S, N, L, L(, C)] and
    optional iBOT `masks` bool [S, 2, T] (T = patches of a global crop, row-major)."""
    global_crops, local_crops = np.asarray(global_crops), np.asarray(local_crops)
    if global_crops.ndim not in (4, 5) or global_crops.shape[1] != 2:
        raise ValueError(f"global_crops: expected [S, 2, G, G(, C)], got {global_crops.shape}")
    if local_crops.ndim != global_crops.ndim or local_crops.shape[0] != global_crops.shape[0]:
        raise ValueError(f"local_crops: expected [S, N, L, L(, C)] with S = "
                         f"{global_crops.shape[0]}, got {local_crops.shape}")
    n_samples, _, g = global_crops.shape[:3]
    n_local, l = local_crops.shape[1], local_crops.shape[2]
    width, height = grid_size(n_samples, n_local, g, l, pad)
    canvas = np.full((height, width, 3), 255, np.float32)
    for s in range(n_samples):
        y = pad + s * (g + pad)
        for c in range(2):
            rgb = _to_rgb(global_crops[s, c], window)
            if masks is not None:
                rgb = _overlay(rgb, np.asarray(masks)[s, c])
            x = pad + c * (g + pad)
            canvas[y:y + g, x:x + g] = rgb
        for j in range(n_local):
            x = pad + 2 * (g + pad) + j * (l + pad)
            canvas[y:y + l, x:x + l] = _to_rgb(local_crops[s, j], window)
    return Image.fromarray(np.round(canvas).astype(np.uint8), mode="RGB")


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """``text`` broken at spaces into lines narrower than ``width`` pixels (a word wider than
    the line stays whole on its own line)."""
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate, font=font) > width:
            lines.append(line)
            candidate = word
        line = candidate
    return lines + ([line] if line else [])


def add_legend(grid: Image.Image, n_local: int, global_size: int, local_size: int, patch_size: int,
               window: tuple[float, float] = (-2.5, 2.5), pad: int = 4, font_size: int = 12) -> Image.Image:
    """``grid`` (from `render_grid`) with column titles above it and a key below it."""
    font = ImageFont.load_default(size=font_size)
    probe = ImageDraw.Draw(grid)
    columns = [(pad + c * (global_size + pad), global_size, f"global {c + 1}", f"G{c + 1}") for c in range(2)]
    columns += [(pad + 2 * (global_size + pad) + j * (local_size + pad), local_size, f"local {j + 1}", f"L{j + 1}")
                for j in range(n_local)]
    key = (f"G1, G2: global crops ({global_size} px; teacher and student). L1-L{n_local}: local crops "
           f"({local_size} px; student only). Red tint: {patch_size} px patches masked for iBOT (the student "
           f"sees a mask token, the teacher the patch). Grey: foreground z-score, window "
           f"[{window[0]:g}, {window[1]:g}] black to white; background (z = 0) mid-grey. One row per slice.")
    lines = _wrap(probe, key, font, grid.width - 2 * pad)
    line_height = font_size + 4
    header = line_height + pad
    canvas = Image.new("RGB", (grid.width, header + grid.height + pad + len(lines) * line_height), "white")
    canvas.paste(grid, (0, header))
    draw = ImageDraw.Draw(canvas)
    for x, width, long, short in columns:
        title = long if draw.textlength(long, font=font) <= width else short
        draw.text((x + width / 2, header - 2), title, fill=(0, 0, 0), font=font, anchor="md")
    for k, line in enumerate(lines):
        draw.text((pad, header + grid.height + pad + k * line_height), line, fill=(0, 0, 0), font=font)
    return canvas


@functools.lru_cache(maxsize=4)
def _augment_fn(config: AugmentConfig):
    return jax.jit(functools.partial(augment_batch, config=config))


def preview_shards(
    shards: Sequence[str],
    out: str | os.PathLike,
    n_samples: int = 4,
    seed: int = 0,
    augment: AugmentConfig = AugmentConfig(),
    patch_size: int = 16,
) -> Path:
    """Read `n_samples` slices through the training pipeline, augment them, write the PNG
    (the crops grid with its legend)."""
    augment.validate()
    if augment.global_size % patch_size:
        raise ValueError(f"patch_size: {patch_size} does not divide global_size {augment.global_size}")
    paths = [p for pattern in shards for p in expand_shards(pattern)]
    grid = augment.global_size // patch_size
    config = PipelineConfig(shards=tuple(paths), batch_size=n_samples,
                            image_size=first_record(paths).pixels.shape[0], seed=seed,
                            mask_grid=(grid, grid), read_threads=0)
    iterator = iter(host_dataset(config, process_index=0, process_count=1))
    batch = next(iterator)
    iterator.close()
    views = _augment_fn(dataclasses.replace(augment, dtype="float32"))(
        jax.random.key(seed), batch["pixels"], batch["fg_mean"], batch["fg_std"])
    image = add_legend(render_grid(np.asarray(views["global"]), np.asarray(views["local"]), batch["masks"]),
                       augment.n_local, augment.global_size, augment.local_size, patch_size)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    return out
