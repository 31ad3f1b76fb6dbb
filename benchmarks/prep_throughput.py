"""Per-worker throughput of data preparation vs. nibabel's bare load of the same .nii.gz files.

Prints JSON. For each input kind it times, per volume, (a) `np.asanyarray(nib.load(p).dataobj)`
(read + decompress + scale) and (b) the whole job of one worker: hash, load, orient, resample,
mask, scale, select, encode, write the work file, plus the volume's share of the finalise step
(re-reading its records into shards, QC, manifest). Best of `--repeats` for both, measured in
the same run, with the default PrepConfig (output size from `--size`) unless the kind says
otherwise. Times are this process's CPU seconds (time.process_time: the work is single-threaded,
and CPU time does not count the waits that other jobs on a shared machine cause). Oblique kinds store the same head rotated; `ratio_vs_axis_aligned` compares each
with the axis-aligned kind of the same geometry (the README's target: at most 1.5).

`finalise_scaling` times the finalise step alone (shards, QC, manifest, card) over the work files
of `--scaling-volumes` volumes dealt into 8 shards, in-process and on a warm pool of 2 and
`--workers` processes: the shard tasks run in parallel, so finalising should scale with workers
up to the shard count (on a 2-core machine, 2 is the most that can show).

    python benchmarks/prep_throughput.py                 # every kind below
    python benchmarks/prep_throughput.py --volumes 3 --repeats 3 --kinds 1mm_256cube_no_resampling
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from braindino_jax.data.inputs import discover
from braindino_jax.preprocessing.config import PrepConfig
from braindino_jax.preprocessing.phantom import write_phantom
from data_prep import local_runner
from data_prep.local_runner import RunOptions


def _bare_load(path: Path) -> float:
    start = time.process_time()
    np.asanyarray(nib.load(path).dataobj)
    return time.process_time() - start


def _measure(folder: Path, config: PrepConfig, repeats: int) -> dict:
    volumes = discover([f"bench={folder}"])
    bare = [min(_bare_load(Path(v.path)) for _ in range(repeats)) for v in volumes]
    best, breakdown = None, None
    for _ in range(repeats):
        out = Path(tempfile.mkdtemp(prefix="prep-bench-"))
        options = RunOptions(out_dir=out, config=config, workers=1, progress=False, qc_per_dataset=4, qc_worst=4)
        work = out / local_runner.WORK_DIR
        work.mkdir(parents=True)
        start = time.process_time()
        rows = [local_runner.process_cached(i, v, config, work) for i, v in enumerate(volumes)]
        t_fin = time.process_time()
        local_runner.finalise(rows, options, work)
        end = time.process_time()
        shutil.rmtree(out)
        if best is None or end - start < best:
            best = end - start
            breakdown = {
                stage: float(np.mean([r["timings"].get(stage, 0.0) for r in rows]))
                for stage in ("hash_s", "preprocess_s", "encode_s", "write_s")
            }
            breakdown["finalise_s"] = (end - t_fin) / len(volumes)
            slices = int(np.mean([r["slices_kept"] for r in rows]))
            assert all(r["status"] == "ok" for r in rows), [r["reason"] for r in rows]
    per_volume = best / len(volumes)
    bare_mean = float(np.mean(bare))
    return {
        "volumes": len(volumes),
        "source_shape": rows[0]["shape"],
        "slices_per_volume": slices,
        "nibabel_load_s": round(bare_mean, 4),
        "job_s": round(per_volume, 4),
        "ratio_job_over_load": round(per_volume / bare_mean, 3),
        "volumes_per_s_per_worker": round(1.0 / per_volume, 3),
        "job_breakdown_s": {k: round(v, 4) for k, v in breakdown.items()},
    }


def _finalise_scaling(folder: Path, n_volumes: int, repeats: int, pool_sizes: list[int]) -> dict:
    """Best-of-`repeats` finalise time over the same work files, serial and on warm pools."""
    for i in range(n_volumes):
        write_phantom(folder / f"sub-{i:02d}_T1w.nii.gz", 100 + i, shape=(192, 192, 160), spacing=(1.0, 1.0, 1.0),
                      orientation="LPS", skull_stripped=True)
    config = PrepConfig(target_spacing=None)
    volumes = discover([f"bench={folder}"])
    out = Path(tempfile.mkdtemp(prefix="prep-bench-finalise-"))
    try:
        work = out / local_runner.WORK_DIR
        work.mkdir(parents=True)
        rows = [local_runner.process_cached(i, v, config, work) for i, v in enumerate(volumes)]
        total = sum(r["slices_kept"] for r in rows)
        options = RunOptions(out_dir=out, config=config, workers=1, progress=False,
                             target_shard_records=-(-total // 8), target_shard_bytes=None)
        result = {"volumes": n_volumes, "records": total, "shards": 8}
        for workers in [1, *pool_sizes]:
            pool = local_runner.WorkerPool(workers) if workers > 1 else None
            try:
                local_runner.finalise(rows, options, work, pool)  # warm-up: starts the pool's processes
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    local_runner.finalise(rows, options, work, pool)
                    times.append(time.perf_counter() - start)
            finally:
                if pool is not None:
                    pool.discard()
            result[f"finalise_s_workers_{workers}"] = round(min(times), 4)
        for workers in pool_sizes:
            result[f"speedup_workers_{workers}"] = round(result["finalise_s_workers_1"]
                                                         / result[f"finalise_s_workers_{workers}"], 2)
        return result
    finally:
        shutil.rmtree(out)


# name: (spacing mm, shape, oblique degrees, PrepConfig overrides, axis-aligned kind it is compared with)
KINDS = {
    "1mm_256cube_no_resampling": ((1.0, 1.0, 1.0), (256, 256, 256), 0.0, {"target_spacing": None}, None),
    "1mm_256cube_oblique_5deg": ((1.0, 1.0, 1.0), (256, 256, 256), 5.0, {}, "1mm_256cube_no_resampling"),
    "1mm_256cube_oblique_15deg": ((1.0, 1.0, 1.0), (256, 256, 256), 15.0, {}, "1mm_256cube_no_resampling"),
    # 3 mm slices are 3x upsampling to 1 mm: by default (max_slice_upsampling 2) the native
    # slices are kept and only the in-plane axes resampled; the *_to_1mm kinds lift the limit.
    "1.2x1.2x3mm_native_slices": ((1.2, 1.2, 3.0), (213, 213, 85), 0.0, {}, None),
    "1.2x1.2x3mm_oblique_8deg_native_slices": ((1.2, 1.2, 3.0), (213, 213, 85), 8.0, {}, "1.2x1.2x3mm_native_slices"),
    "1.2x1.2x3mm_resampled_to_1mm": ((1.2, 1.2, 3.0), (213, 213, 85), 0.0, {"max_slice_upsampling": None}, None),
    "1.2x1.2x3mm_oblique_8deg_to_1mm": (
        (1.2, 1.2, 3.0), (213, 213, 85), 8.0, {"max_slice_upsampling": None}, "1.2x1.2x3mm_resampled_to_1mm"
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=2, help="phantoms per input kind")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--size", type=int, default=256, help="output in-plane size")
    parser.add_argument("--scaling-volumes", type=int, default=8, help="volumes for finalise_scaling (0: skip)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="largest pool for finalise_scaling")
    parser.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(KINDS), help="input kinds to time")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="prep-bench-inputs-"))
    try:
        results = {}
        for name in args.kinds:
            spacing, shape, degrees, overrides, _ = KINDS[name]
            folder = root / name
            for i in range(args.volumes):
                write_phantom(folder / f"sub-{i:02d}_T1w.nii.gz", i, shape=shape, spacing=spacing,
                              orientation="LPS", oblique_deg=degrees, skull_stripped=True)
            config = PrepConfig(size=args.size, **overrides)
            results[name] = _measure(folder, config, args.repeats)
        for name in args.kinds:
            aligned = KINDS[name][4]
            if aligned in results:
                results[name]["ratio_vs_axis_aligned"] = round(results[name]["job_s"] / results[aligned]["job_s"], 3)
        results["target_ratio_1mm"] = 1.5  # job over nibabel's load, and oblique over axis-aligned
        if args.scaling_volumes:
            pool_sizes = sorted({2, args.workers} - {1})
            results["finalise_scaling"] = _finalise_scaling(root / "scaling", args.scaling_volumes,
                                                            args.repeats, pool_sizes)
        print(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":  # the guard matters: pool workers are spawned, and re-import this file
    main()
