"""One axial slice with its metadata, and its byte encoding for ArrayRecord shards.

Records are msgpack maps (typed, no pickle): the pixels travel as raw uint8 bytes with
their shape, the metadata as plain scalars. `decode(encode(r)) == r` holds exactly, and
`decode` refuses bytes it does not understand instead of guessing.

Schema 2: `source_path` is `<dataset>/<path relative to the dataset's root>` (schema 1 stored
the absolute path, so shards depended on where the files were). The absolute path is in the
manifest only.
"""

from __future__ import annotations

import dataclasses
import math

import msgpack
import numpy as np

SCHEMA_VERSION: int = 2

_STR_FIELDS = ("dataset", "subject", "session", "modality", "source_path")
_INT_FIELDS = ("slice_index", "n_slices", "volume_index")
_FLOAT_FIELDS = ("fg_mean", "fg_std")
_SCALAR_FIELDS = _STR_FIELDS + _INT_FIELDS + _FLOAT_FIELDS
_PAYLOAD_KEYS = frozenset({"schema_version", "pixels", "height", "width", "spacing", *_SCALAR_FIELDS})


class RecordError(ValueError):
    """A record that cannot be built or decoded (wrong types, bad bytes, unknown schema)."""


@dataclasses.dataclass(frozen=True, eq=False)
class SliceRecord:
    """One stored axial slice: uint8 pixels (0 = background) plus where it came from.

    `fg_mean`/`fg_std` are in the uint8 storage units, so the foreground z-score at load
    time is `(pixels - fg_mean) / fg_std`.
    """

    pixels: np.ndarray
    dataset: str
    subject: str
    session: str
    modality: str
    source_path: str  # <dataset>/<path relative to its root>
    slice_index: int
    n_slices: int
    spacing: tuple[float, float, float]
    fg_mean: float
    fg_std: float
    volume_index: int = 0
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        pixels = self.pixels
        if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 2:
            raise RecordError(
                "SliceRecord.pixels: expected a 2-D uint8 array, got "
                f"{getattr(pixels, 'dtype', type(pixels).__name__)} "
                f"with shape {getattr(pixels, 'shape', None)}"
            )
        for name in _STR_FIELDS:
            if not isinstance(getattr(self, name), str):
                raise RecordError(f"SliceRecord.{name}: expected str, got {getattr(self, name)!r}")
        for name in _INT_FIELDS + ("schema_version",):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise RecordError(f"SliceRecord.{name}: expected int, got {value!r}")
            object.__setattr__(self, name, int(value))
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
                raise RecordError(f"SliceRecord.{name}: expected float, got {value!r}")
            if not math.isfinite(float(value)):
                raise RecordError(f"SliceRecord.{name}: must be finite, got {value!r}")
            object.__setattr__(self, name, float(value))
        spacing = tuple(float(s) for s in self.spacing)
        if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
            raise RecordError(f"SliceRecord.spacing: expected 3 positive finite floats, got {self.spacing!r}")
        object.__setattr__(self, "spacing", spacing)
        if not 0 <= self.slice_index < self.n_slices:
            raise RecordError(
                f"SliceRecord.slice_index: {self.slice_index} outside [0, n_slices={self.n_slices})"
            )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SliceRecord):
            return NotImplemented
        # Both pixel arrays are 2-D uint8 (__post_init__), so array_equal (shapes included) suffices.
        return np.array_equal(self.pixels, other.pixels) and all(
            getattr(self, f.name) == getattr(other, f.name) for f in dataclasses.fields(self) if f.name != "pixels"
        )


def encode(record: SliceRecord) -> bytes:
    """Serialise a record to msgpack bytes."""
    payload = {
        "schema_version": record.schema_version,
        "pixels": np.ascontiguousarray(record.pixels).tobytes(),
        "height": int(record.pixels.shape[0]),
        "width": int(record.pixels.shape[1]),
        "spacing": list(record.spacing),
    }
    for name in _SCALAR_FIELDS:
        payload[name] = getattr(record, name)
    return msgpack.packb(payload, use_bin_type=True)


def decode(data: bytes) -> SliceRecord:
    """Parse bytes written by `encode`; raise RecordError on anything else."""
    try:
        payload = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise RecordError(f"record bytes are not valid msgpack: {exc}") from exc
    if not isinstance(payload, dict):
        raise RecordError(f"record is a msgpack {type(payload).__name__}, expected a map")
    version = payload.get("schema_version")
    if version != SCHEMA_VERSION:
        raise RecordError(
            f"record schema_version {version!r} is not supported (this code reads {SCHEMA_VERSION}); "
            "prepare the shards again with this version of braindino-prep"
        )
    missing = _PAYLOAD_KEYS - payload.keys()
    if missing:
        raise RecordError(f"record is missing fields: {sorted(missing)}")
    height, width, raw = payload["height"], payload["width"], payload["pixels"]
    if not isinstance(raw, bytes) or not isinstance(height, int) or not isinstance(width, int):
        raise RecordError("record pixels/height/width have the wrong types")
    if height < 0 or width < 0 or len(raw) != height * width:
        raise RecordError(f"record holds {len(raw)} pixel bytes, but its shape is {height}x{width}")
    pixels = np.frombuffer(raw, dtype=np.uint8).reshape(height, width).copy()
    if not isinstance(payload["spacing"], list):
        raise RecordError("record spacing is not a list")
    fields = {name: payload[name] for name in _SCALAR_FIELDS}
    return SliceRecord(pixels=pixels, spacing=tuple(payload["spacing"]), schema_version=version, **fields)
