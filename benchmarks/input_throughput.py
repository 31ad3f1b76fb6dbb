"""Input throughput: host slices/s per worker, device augmentation cost, host vs device masks,
and how many crops are background.

    python benchmarks/input_throughput.py                  # defaults, about 3-5 minutes on CPU
    python benchmarks/input_throughput.py --aug-batch 128 --slices 4096
    python benchmarks/input_throughput.py --foreground-shards '/data/shards/*.array_record'

Prints one JSON object:
- host: read + decode + batch slices/s in one process and one thread (= one Grain worker,
  one core), without and with host iBOT masks, plus the share of the time in each stage;
- augment: `augment_batch` seconds per batch on the default JAX backend, its FLOPs from XLA's
  cost analysis, and that as a fraction of a ViT-B/16 DINOv3 train step on the same batch;
  `variants_seconds_per_batch` times bilinear resampling and crops without the background
  re-draw on the same batch;
- masks: host (numpy, `masking.sample_masks`) vs device (a jax.lax while-loop port of the
  same block-masking rule, benchmark-only) seconds per batch of 2 * batch global crops;
- crop_foreground: on the demo shards (`braindino-prep --demo`, made in a temporary folder)
  or `--foreground-shards`, the fraction of default-size crops with < 10% (and < 1%)
  foreground, without (`min_foreground_fraction=0`, the old sampler) and with the re-draw,
  from the same slices and keys.

ViT-B/16 train-step FLOPs, counted analytically per image (multiply-add = 2 FLOPs):
  block(n)   = 12 layers * (24 n D^2 + 4 n^2 D)         qkv + proj + MLP(4D), QK^T and AV
  embed(n_p) = 2 n_p (16*16*3) D
  crop(n_p)  = block(n_p + 1 + 4 registers) + embed(n_p)
  head       = 2 (D*2048 + 2048*2048 + 2048*256 + 256*65536)   one DINO or iBOT head token
  student    = 2 crop(196) + 8 crop(36) + 10 head + 2 m head    (m = mean masked patches/crop)
  teacher    = 2 crop(196) + 2 head + 2 m head
  step       = 3 student (forward + backward) + teacher         D = 768
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import io
import json
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from braindino_jax.cli import prep
from braindino_jax.data import masking, records
from braindino_jax.data.augment import AugmentConfig, augment_batch
from braindino_jax.data.pipeline import PipelineConfig, host_dataset

SIZE = 256
GRID = (14, 14)


def write_shards(directory: Path, n_slices: int, n_shards: int = 4) -> str:
    """Brain-like uint8 slices (smooth texture + noise inside an ellipse), zstd shards."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    templates = []
    for _ in range(16):
        fg = ((yy - 128) / rng.uniform(80, 110)) ** 2 + ((xx - 128) / rng.uniform(65, 95)) ** 2 < 1
        texture = scipy.ndimage.gaussian_filter(rng.normal(size=(SIZE, SIZE)), 3) * 300 + 130
        templates.append((fg, texture))
    per_shard = n_slices // n_shards
    for s in range(n_shards):
        writer = ArrayRecordWriter(str(directory / f"bench-{s:05d}-of-{n_shards:05d}.array_record"),
                                   "group_size:1,zstd:3")
        for i in range(per_shard):
            fg, texture = templates[i % len(templates)]
            pixels = np.where(fg, np.clip(texture + rng.normal(0, 6, fg.shape), 1, 255), 0)
            pixels = pixels.astype(np.uint8)
            writer.write(records.encode(records.SliceRecord(
                pixels=pixels, dataset="bench", subject=f"s{s}", session="", modality="T1w",
                source_path="bench.nii.gz", slice_index=i, n_slices=per_shard,
                spacing=(1.0, 1.0, 1.0), fg_mean=float(pixels[fg].mean()),
                fg_std=float(pixels[fg].std()))))
        writer.close()
    return str(directory / "bench-*.array_record")


def host_rate(pattern: str, batch: int, n_batches: int, masks: bool) -> float:
    config = PipelineConfig(shards=(pattern,), batch_size=batch, image_size=SIZE, seed=0,
                            read_threads=0, mask_grid=GRID if masks else None)
    iterator = iter(host_dataset(config, process_index=0, process_count=1))
    next(iterator)  # open the readers
    start = time.perf_counter()
    for _ in range(n_batches):
        next(iterator)
    elapsed = time.perf_counter() - start
    iterator.close()
    return batch * n_batches / elapsed


def stage_seconds(pattern: str, n: int) -> dict[str, float]:
    """Per-slice seconds of the raw ArrayRecord read (with zstd) and of `records.decode`."""
    path = sorted(Path(pattern).parent.glob(Path(pattern).name))[0]
    reader = ArrayRecordReader(str(path))
    n = min(n, reader.num_records())
    indices = np.random.default_rng(0).permutation(n).tolist()
    start = time.perf_counter()
    blobs = [reader.read([i])[0] for i in indices]
    read = (time.perf_counter() - start) / n
    reader.close()
    start = time.perf_counter()
    for blob in blobs:
        records.decode(blob)
    return {"read_zstd_s": read, "decode_s": (time.perf_counter() - start) / n}


def vit_b16_step_flops(config: AugmentConfig, mean_masked: float) -> float:
    d, layers, registers = 768, 12, 4

    def crop(n_patches):
        n = n_patches + 1 + registers
        return layers * (24 * n * d * d + 4 * n * n * d) + 2 * n_patches * 16 * 16 * 3 * d

    head = 2 * (d * 2048 + 2048 * 2048 + 2048 * 256 + 256 * 65536)
    g, loc = (config.global_size // 16) ** 2, (config.local_size // 16) ** 2
    student = 2 * crop(g) + config.n_local * crop(loc) + (2 + config.n_local) * head
    student += 2 * mean_masked * head
    teacher = 2 * crop(g) + 2 * head + 2 * mean_masked * head
    return 3 * student + teacher


def time_call(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - start) / repeats


def device_block_masks(key, batch: int, grid=GRID, probability=0.5, ratio_range=(0.1, 0.5)):
    """jax port of masking.sample_masks' rule (DINOv3's exact stratified counts, rectangles
    while one fits, MAX_ATTEMPTS failed draws end them, then a random top-up to the count),
    for timing the on-device option only.

    It takes its constants and counts from `masking`; the loop itself is a traced
    while-loop, a second implementation the library has no use for (masks are made on the
    host), so it lives here rather than in `masking`.
    """
    gh, gw = grid
    n_patches = gh * gw
    max_block = int(masking.MAX_BLOCK_FRACTION * n_patches)
    counts = masking.mask_counts(batch, grid, probability, ratio_range)
    targets = np.zeros(batch, np.float32)
    targets[:len(counts)] = counts
    rows, cols = np.arange(gh)[:, None], np.arange(gw)[None, :]
    log_aspect = np.log(np.array(masking.ASPECT_RATIO_RANGE, np.float32))

    def one(key, target):
        key, k_top_up = jax.random.split(key)

        def cond(state):
            _, count, fails, _ = state
            return (count < target) & (fails < masking.MAX_ATTEMPTS)  # failed draws in a row

        def body(state):
            mask, count, fails, key = state
            key, k = jax.random.split(key)
            u = jax.random.uniform(k, (4,))
            max_new = jnp.minimum(target - count, max_block)
            a_lo = jnp.minimum(masking.MIN_BLOCK_PATCHES, max_new)
            a_hi = jnp.maximum(masking.MIN_BLOCK_PATCHES, max_new)
            area = a_lo + (a_hi - a_lo) * u[0]
            aspect = jnp.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) * u[1])
            h = jnp.round(jnp.sqrt(area * aspect))
            w = jnp.round(jnp.sqrt(area / aspect))
            top = jnp.floor(u[2] * (gh - h + 1))
            left = jnp.floor(u[3] * (gw - w + 1))
            window = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
            new = jnp.sum(window & ~mask)
            ok = (h > 0) & (h < gh) & (w > 0) & (w < gw) & (new > 0) & (new <= max_new)
            return (jnp.where(ok, mask | window, mask), count + jnp.where(ok, new, 0),
                    jnp.where(ok, 0, fails + 1), key)

        state = (jnp.zeros(grid, bool), jnp.float32(0), 0, key)
        mask, count, _, _ = jax.lax.while_loop(cond, body, state)
        mask = mask.reshape(-1)
        # Top-up: the (target - count) unmasked patches of highest random score.
        score = jnp.where(mask, -1.0, jax.random.uniform(k_top_up, (n_patches,)))
        missing = (target - count).astype(jnp.int32)
        kth = jnp.sort(score)[jnp.clip(n_patches - missing, 0, n_patches - 1)]
        return mask | ((score >= kth) & (missing > 0))

    k_masks, k_perm = jax.random.split(key)
    masks = jax.vmap(one)(jax.random.split(k_masks, batch), jnp.asarray(targets))
    return masks[jax.random.permutation(k_perm, batch)]


def demo_shards(directory: Path) -> str:
    """The demo corpus through the real data prep (`braindino-prep --demo`), quietly."""
    with contextlib.redirect_stdout(io.StringIO()):
        code = prep.main(["--demo", "--out", str(directory), "--workers", "1"])
    if code != 0:
        raise RuntimeError(f"braindino-prep --demo failed with exit code {code}")
    return str(directory / "slices-*.array_record")


def crop_foreground(pattern: str, batch: int, n_batches: int) -> dict:
    """Foreground fraction of default-size crops of real slices, without and with the re-draw."""
    sentinel = -1e4  # a background value no z-score reaches: the crop's foreground is exact
    base = dataclasses.replace(AugmentConfig(), background=sentinel, channels=1)
    config = PipelineConfig(shards=(pattern,), batch_size=batch, image_size=SIZE, seed=0,
                            read_threads=0, mask_grid=None)
    iterator = iter(host_dataset(config, process_index=0, process_count=1))
    batches = [next(iterator) for _ in range(n_batches)]
    iterator.close()
    result = {"slices": batch * n_batches,
              "slice_foreground_mean": round(float(np.mean([(b["pixels"] > 0).mean()
                                                            for b in batches])), 4)}
    for label, minimum in (("without_redraw", 0.0), ("with_redraw", base.min_foreground_fraction)):
        augment = jax.jit(functools.partial(
            augment_batch, config=dataclasses.replace(base, min_foreground_fraction=minimum)))
        fractions = {"global": [], "local": []}
        for i, b in enumerate(batches):
            views = augment(jax.random.key(i), b["pixels"], b["fg_mean"], b["fg_std"])
            for name, values in fractions.items():
                values.append((np.asarray(views[name][..., 0]) != sentinel).mean(axis=(2, 3)))
        stats = {"min_foreground_fraction": minimum}
        for name, values in fractions.items():
            values = np.concatenate(values).ravel()
            stats[f"{name}_crops"] = int(values.size)
            stats[f"{name}_below_10pct"] = round(float(np.mean(values < 0.1)), 4)
            stats[f"{name}_below_1pct"] = round(float(np.mean(values < 0.01)), 4)
            stats[f"{name}_mean_foreground"] = round(float(values.mean()), 4)
        result[label] = stats
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=2048, help="slices written to the shards")
    parser.add_argument("--host-batch", type=int, default=128)
    parser.add_argument("--host-batches", type=int, default=12)
    parser.add_argument("--aug-batch", type=int, default=128)
    parser.add_argument("--aug-repeats", type=int, default=3)
    parser.add_argument("--foreground-shards", default=None,
                        help="shards for crop_foreground (default: the demo, made here)")
    parser.add_argument("--foreground-batches", type=int, default=4, help="batches of 32 slices")
    args = parser.parse_args()

    result: dict = {"backend": jax.default_backend(), "device": str(jax.devices()[0])}
    with tempfile.TemporaryDirectory() as tmp:
        pattern = write_shards(Path(tmp), args.slices)
        rate = host_rate(pattern, args.host_batch, args.host_batches, masks=False)
        rate_masks = host_rate(pattern, args.host_batch, args.host_batches, masks=True)
        stages = stage_seconds(pattern, 512)
    result["host"] = {
        "slices_per_s_per_worker": round(rate, 1),
        "slices_per_s_per_worker_with_masks": round(rate_masks, 1),
        "target_slices_per_s_per_core": 2000,
        "meets_target": rate_masks >= 2000,
        "read_zstd_us_per_slice": round(1e6 * stages["read_zstd_s"], 1),
        "decode_us_per_slice": round(1e6 * stages["decode_s"], 1),
        "batch": args.host_batch,
        "image_size": SIZE,
    }

    config = AugmentConfig()
    b = args.aug_batch
    rng = np.random.default_rng(0)
    pixels = jnp.asarray(rng.integers(0, 256, (b, SIZE, SIZE), dtype=np.uint8))
    stats = jnp.full((b,), 100.0), jnp.full((b,), 30.0)

    def compiled_augment(config):
        augment = jax.jit(functools.partial(augment_batch, config=config))
        return augment.lower(jax.random.key(0), pixels, *stats).compile()

    compiled = {"default": compiled_augment(config)}
    cost = compiled["default"].cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    aug_flops = float(cost.get("flops", float("nan")))
    for name, change in (("bilinear", {"interpolation": "bilinear"}),
                         ("no_background_redraw", {"min_foreground_fraction": 0.0})):
        compiled[name] = compiled_augment(dataclasses.replace(config, **change))
    # Interleaved repeats, median per variant: a shared machine's load hits all alike.
    times = {name: [] for name in compiled}
    for fn in compiled.values():
        jax.block_until_ready(fn(jax.random.key(0), pixels, *stats))
    for _ in range(args.aug_repeats):
        for name, fn in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(jax.random.key(0), pixels, *stats))
            times[name].append(time.perf_counter() - start)
    seconds = float(np.median(times.pop("default")))
    variants = {name: round(float(np.median(t)), 4) for name, t in times.items()}

    host_masks = masking.sample_masks(np.random.default_rng(0), 2 * b, GRID)
    mean_masked = host_masks.sum() / (2 * b)
    step_flops = b * vit_b16_step_flops(config, mean_masked)
    result["augment"] = {
        "batch": b,
        "global": [2, config.global_size], "local": [config.n_local, config.local_size],
        "seconds_per_batch": round(seconds, 4),
        "images_per_s": round(b / seconds, 1),
        "variants_seconds_per_batch": variants,
        "xla_flops_per_batch": aug_flops,
        "vit_b16_train_step_flops_per_batch": step_flops,
        "fraction_of_train_step_flops": aug_flops / step_flops,
    }

    mask_rng = np.random.default_rng(1)
    start = time.perf_counter()
    for _ in range(5):
        masking.sample_masks(mask_rng, 2 * b, GRID)
    host_s = (time.perf_counter() - start) / 5
    device_fn = jax.jit(functools.partial(device_block_masks, batch=2 * b))
    device_s = time_call(device_fn, jax.random.key(1), repeats=5)
    device_masks = np.asarray(device_fn(jax.random.key(1)))
    result["masks"] = {
        "crops_per_batch": 2 * b,
        "host_numpy_s_per_batch": round(host_s, 5),
        "device_jax_s_per_batch": round(device_s, 5),
        "host_mean_masked_patches": round(float(mean_masked), 2),
        "device_mean_masked_patches": round(float(device_masks.sum() / (2 * b)), 2),
        "faster": "host" if host_s < device_s else "device",
    }

    with tempfile.TemporaryDirectory() as tmp:
        pattern = args.foreground_shards or demo_shards(Path(tmp))
        result["crop_foreground"] = crop_foreground(pattern, 32, args.foreground_batches)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
