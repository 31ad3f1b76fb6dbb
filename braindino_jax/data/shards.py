"""ArrayRecord shard files: naming, balanced slice-to-shard assignment and atomic writes.

Shards use `group_size:1` so that Grain can read any record without decoding its neighbours,
and zstd to keep them small. A volume's slices are dealt round-robin over the shards (record
`j` of a volume whose records start at global offset `o` goes to shard `(o + j) % n`), so each
shard holds a near-equal number of records and no shard is dominated by one subject. Because
the rule is arithmetic, each shard can be written on its own (`shard_members` says which records
it takes), so several processes write a set in parallel. Files appear under their final names
only once complete (temp file + rename), and a set only once all its shards are (`ShardSet`).
"""

from __future__ import annotations

import itertools
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from braindino_jax.data.atomic_file import temp_name

WRITER_OPTIONS = "group_size:1,zstd:1"  # level 1: as small as 3 on uint8 slices, faster
# Per-volume work files are read once, into the shards: snappy writes twice as fast as zstd:1 and
# keeps them a quarter of their raw size; the shards are compressed with zstd once, at the end.
WORK_OPTIONS = "group_size:1,snappy"
RANDOM_ACCESS = "readahead_buffer_size:0,max_parallelism:0"
SHARD_SUFFIX = ".array_record"


class ShardError(RuntimeError):
    """A shard set that is incomplete, inconsistent or unreadable."""


def shard_path(out_dir: str | os.PathLike, prefix: str, index: int, n_shards: int) -> Path:
    """`<out_dir>/<prefix>-NNNNN-of-MMMMM.array_record`."""
    return Path(out_dir) / f"{prefix}-{index:05d}-of-{n_shards:05d}{SHARD_SUFFIX}"


def count_shards(
    total_records: int,
    total_bytes: int,
    target_records: int | None = None,
    target_bytes: int | None = None,
) -> int:
    """Number of shards so that none exceeds the target (records, or encoded record bytes)."""
    if (target_records is None) == (target_bytes is None):
        raise ValueError("give exactly one of target_records and target_bytes")
    if target_records is not None:
        if target_records < 1:
            raise ValueError(f"target_records must be >= 1, got {target_records}")
        n = math.ceil(total_records / target_records)
    else:
        if target_bytes < 1:
            raise ValueError(f"target_bytes must be >= 1, got {target_bytes}")
        n = math.ceil(total_bytes / target_bytes)
    return max(1, min(n, max(total_records, 1)))


def record_offsets(counts: Sequence[int]) -> list[int]:
    """Global offset of each volume's first record, volumes taken in the given order."""
    return list(itertools.accumulate(counts, initial=0))[:-1]


def shard_of(offset: int, index_in_volume: int, n_shards: int) -> int:
    """Shard that receives record `index_in_volume` of a volume starting at global `offset`."""
    return (offset + index_in_volume) % n_shards


def shard_members(shard: int, n_shards: int, counts: Sequence[int]) -> list[tuple[int, np.ndarray]]:
    """The records shard `shard` receives, in the order it stores them.

    `counts` are the volumes' record counts in input order. Returns (volume number, indices of
    its records) pairs, volumes ascending and indices ascending: exactly the records that
    `shard_of` assigns to `shard`, in global order.
    """
    ends = np.cumsum(np.asarray(counts, dtype=np.int64))
    total = int(ends[-1]) if ends.size else 0
    starts = ends - np.asarray(counts, dtype=np.int64)
    positions = np.arange(shard, total, n_shards, dtype=np.int64)
    volumes = np.searchsorted(starts, positions, side="right") - 1
    indices = positions - starts[volumes]
    cuts = np.flatnonzero(np.diff(volumes)) + 1
    return [(int(v[0]), j) for v, j in zip(np.split(volumes, cuts), np.split(indices, cuts)) if v.size]


def write_array_record(
    path: str | os.PathLike, records: Iterable[bytes], options: str = WRITER_OPTIONS, atomic: bool = True
) -> int:
    """Write one ArrayRecord file atomically (or in place when ``path`` already is a temp name,
    e.g. a ShardSet's, so that no second temp is left if the process dies); returns the number
    of records written."""
    path = Path(path)
    tmp = path.with_name(temp_name(path.name)) if atomic else path
    writer = ArrayRecordWriter(str(tmp), options)
    count = 0
    try:
        for record in records:
            writer.write(record)
            count += 1
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    writer.close()
    if atomic:
        os.replace(tmp, path)
    return count


def read_array_record(
    path: str | os.PathLike, indices: Sequence[int] | None = None, expect: int | None = None
) -> list[bytes]:
    """All records of one ArrayRecord file in order, or those at `indices` (random access).

    `expect`: the number of records the file must hold; ShardError otherwise.
    """
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"{path}: no such ArrayRecord file")
    reader = ArrayRecordReader(str(path), "" if indices is None else RANDOM_ACCESS)
    try:
        count = reader.num_records()
        if expect is not None and count != expect:
            raise ShardError(f"{path}: holds {count} records, expected {expect}")
        if indices is None:
            return list(reader.read_all())
        indices = np.asarray(indices, dtype=np.int64)
        outside = indices[(indices < 0) | (indices >= count)]
        if outside.size:
            raise ShardError(f"{path}: holds {count} records, asked for index {outside[0]}")
        return reader.read(indices.tolist())
    finally:
        reader.close()


class ShardSet:
    """`n_shards` shards written side by side, by any processes, then published all at once.

    Writers write shard `i` to `temps[i]` (e.g. with `write_array_record`). `commit()` renames
    them to their final names and deletes shards with the same prefix left by an earlier run
    with a different shard count. Leaving the context without `commit()` (an exception, Ctrl-C)
    removes the temp files.
    """

    def __init__(self, out_dir: str | os.PathLike, prefix: str, n_shards: int):
        if n_shards < 1:
            raise ValueError(f"n_shards must be >= 1, got {n_shards}")
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.paths = [shard_path(out_dir, prefix, i, n_shards) for i in range(n_shards)]
        self.temps = [p.with_name(temp_name(p.name)) for p in self.paths]
        self._committed = False

    def __enter__(self) -> "ShardSet":
        self.out_dir.mkdir(parents=True, exist_ok=True)
        return self

    def commit(self) -> list[Path]:
        for tmp, path in zip(self.temps, self.paths):
            os.replace(tmp, path)
        self._committed = True
        keep = set(self.paths)
        for stale in find_shard_files(self.out_dir, self.prefix):
            if stale not in keep:
                stale.unlink()
        return self.paths

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._committed:
            for tmp in self.temps:
                tmp.unlink(missing_ok=True)


def find_shard_files(out_dir: str | os.PathLike, prefix: str) -> list[Path]:
    """Every file named like a shard of `prefix` in `out_dir`, sorted, complete set or not."""
    pattern = re.compile(rf"{re.escape(prefix)}-\d{{5}}-of-\d{{5}}{re.escape(SHARD_SUFFIX)}")
    return sorted(p for p in Path(out_dir).iterdir() if pattern.fullmatch(p.name))


def list_shards(out_dir: str | os.PathLike, prefix: str) -> list[Path]:
    """The complete shard set of `prefix`; raises ShardError if it is missing or partial."""
    found = find_shard_files(out_dir, prefix)
    if not found:
        raise ShardError(f"{out_dir}: no shards named {prefix}-NNNNN-of-MMMMM{SHARD_SUFFIX}")
    n_shards = int(found[0].name[-len(SHARD_SUFFIX) - 5 : -len(SHARD_SUFFIX)])
    expected = [shard_path(out_dir, prefix, i, n_shards) for i in range(n_shards)]
    if found != expected:
        raise ShardError(
            f"{out_dir}: shard set {prefix} is inconsistent: expected {n_shards} shards "
            f"{expected[0].name}..{expected[-1].name}, found {[p.name for p in found]}"
        )
    return expected
