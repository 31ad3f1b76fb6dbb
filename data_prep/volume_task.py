"""The per-volume step both runners share: one input file → encoded slice records + manifest row.

It never raises for a bad volume: the failure becomes a manifest row with a reason ("failed"),
and an input the config leaves out becomes a "skipped" row with its reason, so a batch job goes
on and loses nothing that was good.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from typing import Any

import numpy as np

from braindino_jax.data import manifest, records
from braindino_jax.data.inputs import InputVolume, is_url
from braindino_jax.preprocessing.config import PrepConfig
from braindino_jax.preprocessing.errors import VolumeError, VolumeSkipped
from braindino_jax.preprocessing.volume import preprocess_series


@dataclasses.dataclass
class VolumeResult:
    row: dict[str, Any]
    records: list[bytes]


def volume_key(path: str) -> str:
    """Stable name for a volume's intermediate files: a hash of its real path."""
    real = path if is_url(path) else os.path.realpath(path)
    return hashlib.sha256(real.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def base_row(index: int, volume: InputVolume, status: str, reason: str | None = None) -> dict[str, Any]:
    """Manifest row with the input's identity and every measured field empty."""
    return {
        "index": index,
        "path": volume.path,
        "source_path": volume.source,  # what the records store
        "dataset": volume.dataset,
        "subject": volume.subject,
        "session": volume.session,
        "modality": volume.modality,
        "key": volume_key(volume.path),
        "status": status,
        "reason": reason,
        "sha256": None,
        "shape": None,
        "spacing": None,
        "orientation": None,
        "resampling": None,
        "volumes": 0,
        "slices_kept": 0,
        "slices_dropped": 0,
        "nan_count": 0,
        "record_bytes": 0,
        "pixel_stats": None,
        "reused": False,
        "timings": {},
    }


def _pixel_stats(volumes: list) -> dict[str, int]:
    """Exact integer moments of the written pixels, summable across volumes for the card."""
    n = n_fg = total = total_sq = 0
    for vol in volumes:
        pixels = np.asarray(vol.slices, np.uint8)
        wide = pixels.astype(np.uint16)  # 255 ** 2 still fits
        n += pixels.size
        n_fg += int(np.count_nonzero(pixels))
        total += int(pixels.sum(dtype=np.uint64))
        total_sq += int((wide * wide).sum(dtype=np.uint64))
    return {"pixels": n, "foreground": n_fg, "sum": total, "sum_sq": total_sq}


def prepare_volume(
    index: int,
    volume: InputVolume,
    config: PrepConfig,
    sha256: str | None = None,
    local_path: str | None = None,
) -> VolumeResult:
    """Preprocess one input file into encoded records; failures come back as a failed row.

    `local_path` is where the file is read when `volume.path` is remote (a copy made by the
    Beam runner); records and the manifest keep `volume.path`.
    """
    start = time.perf_counter()
    read_path = local_path or volume.path
    row = base_row(index, volume, manifest.OK)
    timings = row["timings"]
    try:
        row["sha256"] = sha256 or file_sha256(read_path)
    except OSError as exc:
        if os.path.islink(volume.path) and not os.path.exists(volume.path):
            return _failed(row, f"dangling symbolic link to {os.readlink(volume.path)}", start)
        return _failed(row, f"cannot read file: {exc.strerror or exc}", start)
    timings["hash_s"] = time.perf_counter() - start

    t = time.perf_counter()
    try:
        prepared, series_failures = preprocess_series(read_path, config)
    except VolumeSkipped as exc:
        return _failed(row, exc.reason, start, manifest.SKIPPED)
    except VolumeError as exc:
        return _failed(row, exc.reason, start)  # the row already names the file
    except Exception as exc:  # a bug or an unforeseen file must not stop the whole job
        return _failed(row, f"unexpected {type(exc).__name__}: {exc}", start)
    timings["preprocess_s"] = time.perf_counter() - t

    t = time.perf_counter()
    try:
        encoded = _encode(volume, prepared)
    except records.RecordError as exc:  # values a record refuses: this volume fails, not the job
        return _failed(row, f"cannot build its slice records: {exc}", start)
    timings["encode_s"] = time.perf_counter() - t

    first = prepared[0]
    row.update(
        shape=list(first.source_shape),
        spacing=[float(s) for s in first.source_spacing],
        orientation=first.orientation,
        resampling=first.resampling,
        volumes=len(prepared),
        slices_kept=len(encoded),
        slices_dropped=sum(v.slices_dropped for v in prepared),
        nan_count=sum(v.nan_count for v in prepared),
        record_bytes=sum(len(r) for r in encoded),
        pixel_stats=_pixel_stats(prepared),
    )
    if series_failures:  # 4D "all": the good volumes are kept, the failed ones named
        row["volumes_failed"] = [{"volume_index": t, "reason": exc.reason} for t, exc in series_failures]
    if not encoded:
        return _failed(
            row,
            f"no axial slice has a foreground fraction >= {config.min_foreground_fraction}",
            start,
        )
    timings["total_s"] = time.perf_counter() - start
    return VolumeResult(row, encoded)


def _encode(volume: InputVolume, prepared: list) -> list[bytes]:
    encoded = []
    for vol in prepared:
        for pixels, slice_index in zip(vol.slices, vol.slice_indices):
            record = records.SliceRecord(
                pixels=pixels,
                dataset=volume.dataset,
                subject=volume.subject,
                session=volume.session,
                modality=volume.modality,
                source_path=volume.source,
                slice_index=int(slice_index),
                n_slices=vol.n_slices,
                spacing=vol.spacing,
                fg_mean=vol.fg_mean,
                fg_std=vol.fg_std,
                volume_index=vol.volume_index,
            )
            encoded.append(records.encode(record))
    return encoded


def _failed(row: dict[str, Any], reason: str, start: float, status: str = manifest.FAILED) -> VolumeResult:
    row["status"] = status
    row["reason"] = reason
    row["timings"]["total_s"] = time.perf_counter() - start
    return VolumeResult(row, [])
