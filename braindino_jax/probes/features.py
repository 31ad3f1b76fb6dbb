"""Per-slice features of whole volumes from a frozen encoder: batched, jitted, sharded, cached.

The host ships uint8 slices and each volume's foreground statistics (as in pretraining); the
device applies BrainDINO's foreground z-score ``(u - fg_mean) / fg_std`` with background 0,
resamples to the model's input size when the framing size differs (the same normalised
resampling as a full-slice crop in ``data.augment``), repeats grayscale to the model's
channels and runs the encoder. Slices of consecutive volumes fill fixed-size batches (padded
at the end, so one program serves the whole run), split over every device along a ``data``
mesh axis with the parameters replicated.

Preprocessing runs in a pool of worker processes, ahead of the device: while one batch runs,
the next volumes are read, and only the batch before last is waited for.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import multiprocessing
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from braindino_jax.data.augment import crop_resize
from braindino_jax.models.config import ViTConfig
from braindino_jax.preprocessing.config import PrepConfig
from braindino_jax.preprocessing.errors import VolumeError
from braindino_jax.probes.cache import FeatureCache, feature_key, file_sha256
from braindino_jax.probes.encoders import Encoder
from braindino_jax.probes.errors import ProbeConfigError
from braindino_jax.probes.volumes import ProbeVolume, read_timed

_IN_FLIGHT = 2  # forward passes dispatched before the oldest one's results are fetched


@dataclasses.dataclass(frozen=True)
class ExtractionSettings:
    """Everything that changes the features of a file under a given encoder."""

    prep: PrepConfig
    image_size: int
    layers: tuple[int, ...] = ()  # blocks whose final-normed patch maps are kept (segmentation)
    batch_size: int = 128  # slices per forward pass

    def cache_settings(self, config: ViTConfig) -> dict[str, Any]:
        """These settings and the encoder's execution settings, for the cache key."""
        return {"prep": self.prep.to_dict(), "image_size": self.image_size, "layers": list(self.layers),
                "dtype": config.dtype, "attention": config.attention}


@dataclasses.dataclass(frozen=True)
class VolumeJob:
    """One input file (and, for segmentation, its label map) to featurise."""

    path: str
    mask_path: str | None = None


@dataclasses.dataclass
class Extraction:
    """Features per job (arrays: ``cls`` and ``patch_mean`` [N, D] float32, ``slice_indices``
    [N], ``patch_<block>`` [N, h, w, D] float16, ``labels`` [N, S, S]), failures per job with
    the reason, and where the time went."""

    features: dict[VolumeJob, dict[str, np.ndarray]]
    failures: dict[VolumeJob, str]
    stats: dict[str, float]


def check_compatible(encoder: Encoder, settings: ExtractionSettings) -> None:
    """Raise ProbeConfigError naming the config field an encoder cannot serve."""
    c = encoder.config
    if settings.image_size % c.patch_size:
        raise ProbeConfigError(
            f"config.input.image_size: {settings.image_size} is not a multiple of encoder "
            f"{encoder.spec!r}'s patch_size {c.patch_size}"
        )
    for block in settings.layers:
        if not -c.depth <= block < c.depth:
            raise ProbeConfigError(
                f"config.segmentation.layers: block {block} does not exist in encoder {encoder.spec!r} "
                f"(depth {c.depth})"
            )


def probe_images(
    pixels: jax.Array, fg_mean: jax.Array, fg_std: jax.Array, image_size: int, channels: int
) -> jax.Array:
    """uint8 slices [B, S, S] → z-scored float32 images [B, image_size, image_size, channels].

    Matches ``data.augment`` on a crop covering the whole slice: the intensity and the
    foreground mask are resampled together and the intensity divided by the resampled mask,
    foreground where that coverage is >= 0.5, ``z = (255 r - fg_mean) / fg_std`` there and
    0 in the background.
    """
    r = pixels.astype(jnp.float32) / 255.0
    size = pixels.shape[-1]
    if size == image_size:
        fg = pixels > 0
    else:
        stacked = jnp.stack([r, (pixels > 0).astype(jnp.float32)], axis=-1)
        box = jnp.array([0.0, 0.0, size, size], jnp.float32)
        crop = jax.vmap(lambda x: crop_resize(x, box, image_size, "bilinear"))(stacked)
        coverage = crop[..., 1]
        fg = coverage >= 0.5
        r = crop[..., 0] / jnp.maximum(coverage, 0.5)
    mean, std = fg_mean[:, None, None], fg_std[:, None, None]
    z = jnp.where(fg, (255.0 * r - mean) / std, 0.0)
    return jnp.broadcast_to(z[..., None], z.shape + (channels,))


@functools.lru_cache(maxsize=16)
def _compiled_forward(graphdef: nnx.GraphDef, image_size: int, layers: tuple[int, ...], mesh: Mesh):
    """One jitted program per (architecture, input size, blocks, mesh): encoders of the same
    architecture (a checkpoint and its random-init controls) share the compilation."""

    def forward(state, pixels, fg_mean, fg_std):
        model = nnx.merge(graphdef, state)
        images = probe_images(pixels, fg_mean, fg_std, image_size, model.config.in_chans)
        out = model(images, layers=layers)
        patches = out["x_norm_patchtokens"]
        result = {"cls": out["x_norm_clstoken"], "patch_mean": jnp.mean(patches, axis=1)}
        grid = image_size // model.config.patch_size
        for block, tokens in zip(layers, out.get("intermediate_layers", ())):
            p = tokens["x_norm_patchtokens"]
            result[f"patch_{block}"] = p.reshape(p.shape[0], grid, grid, p.shape[-1]).astype(jnp.float16)
        return result

    batch, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    return jax.jit(forward, in_shardings=(replicated, batch, batch, batch), out_shardings=batch)


class FeatureExtractor:
    """Forward passes of one frozen encoder over fixed-size slice batches on all local devices
    (in a multi-process run each process featurises the volumes it is given on its own devices).

    ``forward_passes`` counts the batches run, so a caller (or a test) can see cache hits.
    """

    def __init__(self, encoder: Encoder, settings: ExtractionSettings, devices: Sequence[jax.Device] | None = None):
        check_compatible(encoder, settings)
        devices = list(devices or jax.local_devices())
        self.mesh = Mesh(np.array(devices), ("data",))
        self.batch_size = -(-settings.batch_size // len(devices)) * len(devices)
        self.size = settings.prep.size
        graphdef, state = nnx.split(encoder.model)
        self._state = jax.device_put(state, NamedSharding(self.mesh, P()))
        self._inputs = NamedSharding(self.mesh, P("data"))
        self._forward = _compiled_forward(graphdef, settings.image_size, tuple(settings.layers), self.mesh)
        self.forward_passes = 0

    def dispatch(self, pixels: np.ndarray, fg_mean: np.ndarray, fg_std: np.ndarray) -> dict[str, jax.Array]:
        """Start the forward pass of up to ``batch_size`` slices (zero-padded); returns at once."""
        n = pixels.shape[0]
        if n > self.batch_size or pixels.shape[1:] != (self.size, self.size) or pixels.dtype != np.uint8:
            raise ValueError(f"pixels: expected uint8 [<= {self.batch_size}, {self.size}, {self.size}], "
                             f"got {pixels.dtype} {pixels.shape}")
        pad = self.batch_size - n
        if pad:
            pixels = np.concatenate([pixels, np.zeros((pad,) + pixels.shape[1:], np.uint8)])
            fg_mean = np.concatenate([fg_mean, np.zeros(pad)])
            fg_std = np.concatenate([fg_std, np.ones(pad)])
        args = jax.device_put(
            (pixels, np.asarray(fg_mean, np.float32), np.asarray(fg_std, np.float32)), self._inputs
        )
        self.forward_passes += 1
        return self._forward(self._state, *args)

    def embed(self, volume: ProbeVolume) -> dict[str, np.ndarray]:
        """All slices of one volume, synchronously (for figures and small jobs)."""
        n = len(volume.pixels)
        outputs = []
        for start in range(0, n, self.batch_size):
            chunk = volume.pixels[start:start + self.batch_size]
            m = len(chunk)
            out = jax.device_get(self.dispatch(chunk, np.full(m, volume.fg_mean), np.full(m, volume.fg_std)))
            outputs.append({k: v[:m] for k, v in out.items()})
        return {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}


def _read_all(
    jobs: Sequence[VolumeJob], prep: PrepConfig, workers: int
) -> Iterator[tuple[VolumeJob, ProbeVolume | VolumeError, float]]:
    """Preprocessed volumes in job order, read ``2 * workers`` ahead by worker processes."""
    if workers == 0:
        for job in jobs:
            yield job, *read_timed(job.path, prep, job.mask_path)
        return
    # spawn: forking a process that runs JAX's threads is unsafe.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        pending = collections.deque()
        queue = iter(jobs)
        for job in queue:
            pending.append((job, pool.submit(read_timed, job.path, prep, job.mask_path)))
            if len(pending) >= 2 * workers:
                break
        while pending:
            job, future = pending.popleft()
            result, seconds = future.result()
            following = next(queue, None)
            if following is not None:
                pending.append((following, pool.submit(read_timed, following.path, prep, following.mask_path)))
            yield job, result, seconds


def job_digest(job: VolumeJob) -> str:
    digest = file_sha256(job.path)
    return digest if job.mask_path is None else f"{digest}+{file_sha256(job.mask_path)}"


def extract_features(
    encoder: Encoder,
    jobs: Sequence[VolumeJob],
    settings: ExtractionSettings,
    cache: FeatureCache | None = None,
    workers: int = 0,
    progress: bool = False,
    extractor: FeatureExtractor | None = None,
) -> Extraction:
    """Features of every job: cached ones read, the rest preprocessed by ``workers`` processes
    and embedded on the devices. A volume that fails to preprocess is reported in
    ``failures`` with its reason; the others go on."""
    extractor = extractor or FeatureExtractor(encoder, settings)
    start = time.perf_counter()
    cache_settings = settings.cache_settings(encoder.config)
    keys: dict[VolumeJob, str] = {}
    failures: dict[VolumeJob, str] = {}
    for job in dict.fromkeys(jobs):
        try:
            keys[job] = feature_key(encoder.fingerprint, cache_settings, job_digest(job))
        except OSError as err:  # unreadable: reported like any volume that fails to preprocess
            failures[job] = f"{err.filename or job.path}: {err.strerror or err}"
    features: dict[VolumeJob, dict[str, np.ndarray]] = {}
    todo = []
    for job, key in keys.items():
        cached = cache.get(key) if cache is not None else None
        if cached is not None:
            features[job] = cached
        else:
            todo.append(job)
    total = len(keys) + len(failures)
    bar = tqdm(total=total, unit="vol", desc=encoder.spec, disable=not progress, initial=len(features) + len(failures))
    stats = collections.Counter()
    chunks: dict[VolumeJob, list[dict[str, np.ndarray]]] = {}
    volumes: dict[VolumeJob, ProbeVolume] = {}
    remaining: dict[VolumeJob, int] = {}

    def collect(outputs: dict[str, jax.Array], segments: list[tuple[VolumeJob, int]]) -> None:
        wait = time.perf_counter()
        host = jax.device_get(outputs)
        stats["device_wait_s"] += time.perf_counter() - wait
        row = 0
        for job, count in segments:
            chunks[job].append({k: v[row:row + count] for k, v in host.items()})
            row += count
            remaining[job] -= count
            if remaining[job] == 0:
                features[job] = _finish(job, chunks.pop(job), volumes.pop(job))
                if cache is not None:
                    cache.put(keys[job], features[job], {"path": job.path, "encoder": encoder.spec})
                bar.update(1)

    in_flight: collections.deque = collections.deque()
    batcher = _SliceBatcher(extractor.batch_size, settings.prep.size)

    def run(batches: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, list]]) -> None:
        for pixels, fg_mean, fg_std, segments in batches:
            in_flight.append((extractor.dispatch(pixels, fg_mean, fg_std), segments))
            if len(in_flight) > _IN_FLIGHT:
                collect(*in_flight.popleft())

    wait = time.perf_counter()
    for job, volume, seconds in _read_all(todo, settings.prep, workers):
        stats["input_wait_s"] += time.perf_counter() - wait
        stats["preprocess_s"] += seconds
        if isinstance(volume, VolumeError):
            failures[job] = str(volume)
            bar.update(1)
        else:
            volumes[job], remaining[job], chunks[job] = volume, len(volume.pixels), []
            run(batcher.add(job, volume))
        wait = time.perf_counter()
    run(batcher.flush())
    while in_flight:
        collect(*in_flight.popleft())
    bar.close()
    stats.update(volumes=total, cache_hits=len(keys) - len(todo), embedded=len(features) - (len(keys) - len(todo)),
                 failed=len(failures), forward_passes=extractor.forward_passes,
                 wall_s=time.perf_counter() - start)
    return Extraction(features=features, failures=failures, stats=dict(stats))


class _SliceBatcher:
    """Packs the slices of consecutive volumes into fixed-size batches; each batch lists its
    (job, slice count) segments in order, so results can be handed back to their volumes."""

    def __init__(self, batch_size: int, size: int):
        self.batch_size, self.size = batch_size, size
        self._new()

    def _new(self) -> None:
        b = self.batch_size
        self.pixels = np.zeros((b, self.size, self.size), np.uint8)
        self.fg_mean, self.fg_std = np.zeros(b), np.ones(b)
        self.segments: list[tuple[VolumeJob, int]] = []
        self.fill = 0

    def add(self, job: VolumeJob, volume: ProbeVolume) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, list]]:
        n, pos = len(volume.pixels), 0
        while pos < n:
            take = min(self.batch_size - self.fill, n - pos)
            rows = slice(self.fill, self.fill + take)
            self.pixels[rows] = volume.pixels[pos:pos + take]
            self.fg_mean[rows], self.fg_std[rows] = volume.fg_mean, volume.fg_std
            self.segments.append((job, take))
            self.fill += take
            pos += take
            if self.fill == self.batch_size:
                yield self.pixels, self.fg_mean, self.fg_std, self.segments
                self._new()  # fresh arrays: a CPU device_put may alias the numpy buffers

    def flush(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, list]]:
        if self.fill:
            n = self.fill
            yield self.pixels[:n], self.fg_mean[:n], self.fg_std[:n], self.segments
            self._new()


def _finish(job: VolumeJob, parts: list[dict[str, np.ndarray]], volume: ProbeVolume) -> dict[str, np.ndarray]:
    arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    arrays["slice_indices"] = volume.slice_indices.astype(np.int32)
    if volume.labels is not None:
        arrays["labels"] = volume.labels.astype(np.int32)
    return arrays
