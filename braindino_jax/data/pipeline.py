"""Pretraining input: Grain over ArrayRecord shards, to sharded device batches.

Host side (Grain `MapDataset`, so every element is a pure function of its index and the
seed, which is what makes the iterator state small and a resume exact):

    ArrayRecordDataSource(shards) -> decode -> global shuffle(seed) -> repeat
      [-> weighted mix of datasets] -> this process's slice [p::P] -> batch
      -> iBOT masks (numpy, seeded by (seed, process, batch index)) -> threads / workers

Each batch is a dict of numpy arrays for this process's share of the global batch:
`pixels` uint8 [b, H, W] (0 = background), `fg_mean`/`fg_std` float32 [b] in uint8 units,
and, when `mask_grid` is set, `masks` bool [b, 2, grid_h * grid_w] for the two global crops.
Masks are made here, in the Grain workers, rather than in the step: the numpy generator is
slower per call than a jax port (see benchmarks/input_throughput.py) but costs no
accelerator time, and the host still meets its slices/s target with them. Grain seeds each
batch's generator from the seed and the batch's index, and every process counts its batches
from 0, so the process index is mixed into the mask seed: otherwise a P-process run would
repeat each step's masks P times. Each process masks exactly `masking.max_masked_tokens(2b)`
patches of its b samples' 2b global crops, so a global batch masks `mask_token_bound`.

Device side: `DeviceBatchIterator` turns each host batch into global `jax.Array`s sharded
over `P(('data', 'fsdp'))` and keeps `device_prefetch` batches in flight, so the transfer
overlaps the train step. It is a Grain `DatasetIterator`, so `get_state()`/`set_state()`
(JSON-safe dicts) and `grain.checkpoint.CheckpointSave/CheckpointRestore` (Orbax, one file
per process) both work; the state is that of the last batch *returned*, not the last one
prefetched, so a restored run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
from typing import Any, Sequence

import grain
import jax
import numpy as np
from absl import flags as absl_flags
from array_record.python.array_record_module import ArrayRecordReader
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from braindino_jax.data import masking, records


class PipelineError(ValueError):
    """Bad pipeline configuration or unreadable input, with the file or field named."""


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """What to read and how to batch it.

    `shards` are paths or globs. Without `weights` all matching files form one dataset
    (each slice equally likely); with `weights` each entry is its own dataset, shuffled and
    repeated on its own and mixed in these proportions.
    """

    shards: tuple[str, ...]
    weights: tuple[float, ...] | None = None
    batch_size: int = 64             # global, over all processes
    image_size: int = 256            # every stored slice must be image_size x image_size
    seed: int = 0
    num_workers: int = 0             # Grain worker processes (0 = in this process)
    worker_buffer_size: int = 2      # batches buffered per worker
    read_threads: int = 2            # Grain reader threads per process
    device_prefetch: int = 2         # batches kept in flight on the devices
    mask_grid: tuple[int, int] | None = (14, 14)  # patch grid of a global crop; None = no masks
    mask_sample_probability: float = 0.5
    mask_ratio_range: tuple[float, float] = (0.1, 0.5)
    # Consecutive groups of this process's batch whose masks are stratified on their own: one
    # per local device, as DINOv3 collates per GPU. It bounds the masked patches per device,
    # which lets the train step gather them without crossing devices.
    mask_groups: int = 1

    def validate(self, process_count: int = 1) -> None:
        """Raise PipelineError naming the first bad field."""

        def fail(field: str, reason: str) -> None:
            raise PipelineError(f"PipelineConfig.{field}: {reason}")

        if isinstance(self.shards, str) or not self.shards:
            fail("shards", f"need a non-empty tuple of paths or globs, got {self.shards!r}")
        if self.weights is not None:
            if len(self.weights) != len(self.shards):
                fail("weights", f"need one weight per shards entry ({len(self.shards)}), "
                     f"got {len(self.weights)}")
            if any(not w > 0 for w in self.weights):
                fail("weights", f"must all be > 0, got {self.weights}")
        if self.batch_size < 1 or self.batch_size % process_count:
            fail("batch_size", f"{self.batch_size} must be a positive multiple of the "
                 f"process count {process_count}")
        for field in ("image_size", "worker_buffer_size", "device_prefetch"):
            if getattr(self, field) < 1:
                fail(field, f"must be >= 1, got {getattr(self, field)}")
        for field in ("num_workers", "read_threads"):
            if getattr(self, field) < 0:
                fail(field, f"must be >= 0, got {getattr(self, field)}")
        if self.mask_groups < 1 or (self.batch_size // process_count) % self.mask_groups:
            fail("mask_groups", f"{self.mask_groups} must divide the per-process batch of "
                 f"{self.batch_size // process_count}")
        if not 0 <= self.seed < 2**32:
            fail("seed", f"must be in [0, 2**32), got {self.seed}")
        if self.mask_grid is not None:
            try:
                masking.max_masked_tokens(2, self.mask_grid, self.mask_sample_probability,
                                          self.mask_ratio_range)
            except ValueError as exc:
                fail("mask_grid/mask_sample_probability/mask_ratio_range", str(exc))


def expand_shards(pattern: str) -> list[str]:
    """Sorted files matching a path or glob; PipelineError if there are none."""
    paths = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    paths = [p for p in paths if os.path.isfile(p)]
    if not paths:
        raise PipelineError(f"no shard files match {pattern!r}")
    return paths


def _locate(paths: Sequence[str], index: int) -> str:
    """'file (record i)' for an index into the concatenation of `paths` (error path only)."""
    offset = 0
    for path in paths:
        reader = ArrayRecordReader(path)
        count = reader.num_records()
        reader.close()
        if index < offset + count:
            return f"{path} (record {index - offset})"
        offset += count
    return f"record {index} of {list(paths)}"


class _NamedSource:
    """`ArrayRecordDataSource` whose read errors name the shard file and record.

    array_record reports corrupt or truncated chunks as bare RuntimeErrors that name
    neither; a training job dying on one must say which shard to regenerate.
    """

    def __init__(self, paths: Sequence[str]):
        self._paths = list(paths)
        try:
            self._source = grain.sources.ArrayRecordDataSource(self._paths)
        except Exception as exc:  # array_record raises bare RuntimeErrors for unreadable files
            raise PipelineError(f"cannot open shard {self._unreadable()}: {exc}") from exc

    def _unreadable(self) -> str:
        for path in self._paths:
            try:
                grain.sources.ArrayRecordDataSource([path])
            except Exception:
                return path
        return str(self._paths)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> bytes:
        try:
            return self._source[index]
        except RuntimeError as exc:
            raise PipelineError(f"{_locate(self._paths, index)}: unreadable: {exc}") from exc

    def __getitems__(self, indices: Sequence[int]) -> Sequence[bytes]:
        try:
            return self._source.__getitems__(indices)
        except RuntimeError:
            return [self[i] for i in indices]  # re-read one by one to name the bad record


class _Decoder:
    """Record bytes -> training fields, with the shard file named when a record is bad.

    Called with the index into its data source; the file is looked up only on error, so
    the happy path costs nothing extra.
    """

    def __init__(self, paths: Sequence[str], image_size: int):
        self._paths = list(paths)
        self._image_size = image_size

    def __call__(self, index: int, data: bytes) -> dict[str, Any]:
        try:
            record = records.decode(data)
        except records.RecordError as exc:
            raise PipelineError(f"{_locate(self._paths, index)}: {exc}") from exc
        size = self._image_size
        if record.pixels.shape != (size, size):
            raise PipelineError(
                f"{_locate(self._paths, index)}: slice is {record.pixels.shape[0]}x"
                f"{record.pixels.shape[1]}, the pipeline expects {size}x{size} (image_size)"
            )
        if not record.fg_std > 0:
            raise PipelineError(
                f"{_locate(self._paths, index)}: fg_std must be > 0, got {record.fg_std}")
        return {
            "pixels": record.pixels,
            "fg_mean": np.float32(record.fg_mean),
            "fg_std": np.float32(record.fg_std),
        }


def _nonempty_source(paths: Sequence[str]) -> _NamedSource:
    source = _NamedSource(paths)
    if len(source) == 0:
        raise PipelineError(f"shards {list(paths)} hold no records")
    return source


def first_record(paths: Sequence[str]) -> records.SliceRecord:
    """The first record of the concatenated shards (empty ones skipped), errors naming the file.

    Lets a tool size its `PipelineConfig` (e.g. `image_size`) from the data it will read.
    """
    try:
        return records.decode(_nonempty_source(paths)[0])
    except records.RecordError as exc:
        raise PipelineError(f"{_locate(paths, 0)}: {exc}") from exc


def _dataset(paths: Sequence[str], image_size: int, seed: int) -> grain.MapDataset:
    source = _nonempty_source(paths)
    ds = grain.MapDataset.source(source).map_with_index(_Decoder(paths, image_size))
    return ds.shuffle(seed=seed).repeat()


class _AddMasks(grain.transforms.RandomMap):
    """iBOT block masks for the two global crops of every sample, stratified per group."""

    def __init__(self, grid: tuple[int, int], probability: float, ratio_range: tuple[float, float],
                 groups: int = 1):
        self._grid = tuple(grid)
        self._probability = probability
        self._ratio_range = tuple(ratio_range)
        self._groups = groups

    def random_map(self, batch: dict[str, np.ndarray], rng: np.random.Generator):
        b = batch["pixels"].shape[0]
        per_group = 2 * b // self._groups
        masks = [masking.sample_masks(rng, per_group, self._grid, self._probability,
                                      self._ratio_range) for _ in range(self._groups)]
        return {**batch, "masks": np.concatenate(masks).reshape(b, 2, -1)}


def _mask_seed(seed: int, process_index: int) -> int:
    """This process's seed for the mask generators: independent streams per process."""
    return int(np.random.SeedSequence([seed, process_index]).generate_state(1, np.uint64)[0])


def mask_token_bound(config: PipelineConfig, process_count: int | None = None) -> int:
    """Masked patches in every global batch: the static iBOT gather size.

    Each process cuts its 2b global crops into ``mask_groups`` groups (one per local device),
    stratifies the mask counts over each group and masks exactly
    `masking.max_masked_tokens(2b/G)` patches per group (DINOv3's per-GPU collate), so every
    global batch masks exactly P x G times that; :func:`mask_group_bound` is one group's share.
    """
    process_count = jax.process_count() if process_count is None else process_count
    return process_count * config.mask_groups * mask_group_bound(config, process_count)


def mask_group_bound(config: PipelineConfig, process_count: int | None = None) -> int:
    """Static bound on the masked patches of one mask group (one device's global crops)."""
    if config.mask_grid is None:
        raise PipelineError("PipelineConfig.mask_grid: None, so the pipeline makes no masks")
    process_count = jax.process_count() if process_count is None else process_count
    config.validate(process_count)
    local = 2 * config.batch_size // process_count // config.mask_groups
    return masking.max_masked_tokens(
        local, config.mask_grid, config.mask_sample_probability, config.mask_ratio_range)


def host_dataset(
    config: PipelineConfig,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """This process's stream of host batches (see the module docstring for the layout).

    `process_index`/`process_count` default to JAX's; every process must use the same
    config and seed, and each then reads a disjoint 1/P of every epoch.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise PipelineError(f"process_index {process_index} not in [0, {process_count})")
    config.validate(process_count)

    if config.weights is None:
        paths = [p for pattern in config.shards for p in expand_shards(pattern)]
        ds = _dataset(paths, config.image_size, config.seed)
    else:
        parts = [
            _dataset(expand_shards(pattern), config.image_size, (config.seed + i) % 2**32)
            for i, pattern in enumerate(config.shards)
        ]
        ds = grain.MapDataset.mix(parts, list(config.weights))
    ds = ds[process_index::process_count]
    ds = ds.batch(config.batch_size // process_count, drop_remainder=True)
    if config.mask_grid is not None:
        ds = ds.random_map(
            _AddMasks(config.mask_grid, config.mask_sample_probability, config.mask_ratio_range,
                      config.mask_groups),
            seed=_mask_seed(config.seed, process_index),
        )
    it_ds = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=config.read_threads, prefetch_buffer_size=max(1, 2 * config.read_threads)))
    if config.num_workers > 0:
        # Grain reads absl flags when it starts workers; outside an absl app nobody parsed
        # them, so accept their defaults (an absl app has parsed them already).
        if not absl_flags.FLAGS.is_parsed():
            absl_flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=config.num_workers, per_worker_buffer_size=config.worker_buffer_size))
    return it_ds


def batch_sharding(mesh: Mesh, axes: Sequence[str] = ("data", "fsdp")) -> NamedSharding:
    """Leading (batch) axis split over those of `axes` that the mesh has."""
    present = tuple(a for a in axes if a in mesh.axis_names)
    if not present:
        raise PipelineError(f"mesh axes {mesh.axis_names} contain none of the batch axes {axes}")
    return NamedSharding(mesh, PartitionSpec(present))


class DeviceBatchIterator(grain.DatasetIterator):
    """Host batches -> global sharded `jax.Array`s, `depth` batches ahead; checkpointable."""

    def __init__(self, host_iter: grain.DatasetIterator, sharding: NamedSharding, depth: int = 2):
        super().__init__(host_iter)
        if depth < 1:
            raise PipelineError(f"device prefetch depth must be >= 1, got {depth}")
        self._host = host_iter
        self._sharding = sharding
        self._depth = depth
        self._queue: collections.deque = collections.deque()
        self._state = host_iter.get_state()

    def _put(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return {
            key: jax.make_array_from_process_local_data(self._sharding, np.asarray(value))
            for key, value in batch.items()
        }

    def __next__(self) -> dict[str, jax.Array]:
        while len(self._queue) < self._depth:
            try:
                batch = next(self._host)
            except StopIteration:
                break
            self._queue.append((self._put(batch), self._host.get_state()))
        if not self._queue:
            raise StopIteration
        arrays, self._state = self._queue.popleft()
        return arrays

    def get_state(self) -> dict[str, Any]:
        """State after the last batch returned (prefetched batches are not counted)."""
        return self._state

    def set_state(self, state: dict[str, Any]) -> None:
        self._queue.clear()
        self._host.set_state(state)
        self._state = self._host.get_state()

    def close(self) -> None:
        self._queue.clear()
        super().close()  # closes the host iterator and its worker processes


def device_iterator(
    config: PipelineConfig,
    mesh: Mesh,
    process_index: int | None = None,
    process_count: int | None = None,
) -> DeviceBatchIterator:
    """The training input: sharded device batches with a checkpointable position."""
    host_iter = iter(host_dataset(config, process_index, process_count))
    return DeviceBatchIterator(host_iter, batch_sharding(mesh), config.device_prefetch)
