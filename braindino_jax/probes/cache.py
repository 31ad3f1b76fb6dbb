"""On-disk cache of per-volume features, so a re-run with another head costs no forward passes.

One safetensors file per (encoder, preprocessing, features asked for, input file), named by the
sha256 of: the encoder fingerprint (architecture and parameter bytes), the extraction dtype, the
preprocessing config, the feature set (e.g. which blocks' patch maps) and the input file's own
sha256. Editing a file, retraining the encoder or changing any setting therefore misses the
cache instead of returning stale features. Files are written atomically; no pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load, save

from braindino_jax.data.atomic_file import write_atomic

_FORMAT = 1  # bumped when the stored tensors change meaning
_DIGESTS: dict[tuple[str, int, int], str] = {}  # (real path, size, mtime) -> sha256, per process


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, remembered per (path, size, mtime) for the rest of the process."""
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        with open(path, "rb") as f:
            _DIGESTS[key] = hashlib.file_digest(f, "sha256").hexdigest()
    return _DIGESTS[key]


def feature_key(encoder_fingerprint: str, settings: dict[str, Any], file_digest: str) -> str:
    """The cache key of one file's features under an encoder and JSON-able extraction settings."""
    text = json.dumps({"format": _FORMAT, "encoder": encoder_fingerprint, "settings": settings,
                       "file": file_digest}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


class FeatureCache:
    """Feature files under ``directory`` with hit and miss counters a caller (or test) can read."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> dict[str, np.ndarray] | None:
        """The stored arrays, or None (a miss) when absent or unreadable (then rewritten)."""
        path = self._path(key)
        try:
            arrays = load(path.read_bytes())
        except (FileNotFoundError, SafetensorError):
            self.misses += 1
            return None
        self.hits += 1
        return arrays

    def put(self, key: str, arrays: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
        data = save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata=metadata)
        write_atomic(self._path(key), data)
