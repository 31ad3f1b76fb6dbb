"""Per-worker throughput of data preparation vs. nibabel's bare load of the same .nii.gz files.

Prints JSON. For each input kind it times, per volume, (a) `np.asanyarray(nib.load(p).dataobj)`
(read + decompress + scale) and (b) the whole job of one worker: hash, load, orient, resample,
mask, scale, select, encode, write the work file, plus the volume's share of the finalise step
(re-reading its records into shards, QC, manifest). Best of `--repeats` for both.

    python benchmarks/prep_throughput.py                 # 256^3 at 1 mm, and 1.2x1.2x3 mm resampled
    python benchmarks/prep_throughput.py --volumes 3 --repeats 3
"""

from __future__ import annotations

import argparse
import json
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
    start = time.perf_counter()
    np.asanyarray(nib.load(path).dataobj)
    return time.perf_counter() - start


def _measure(folder: Path, config: PrepConfig, repeats: int) -> dict:
    volumes = discover([f"bench={folder}"])
    bare = [min(_bare_load(Path(v.path)) for _ in range(repeats)) for v in volumes]
    best, breakdown = None, None
    for _ in range(repeats):
        out = Path(tempfile.mkdtemp(prefix="prep-bench-"))
        options = RunOptions(out_dir=out, config=config, workers=1, progress=False, qc_per_dataset=4, qc_worst=4)
        work = out / local_runner.WORK_DIR
        work.mkdir(parents=True)
        start = time.perf_counter()
        rows = [local_runner.process_cached(i, v, config, work) for i, v in enumerate(volumes)]
        t_fin = time.perf_counter()
        local_runner.finalise(rows, options, work)
        end = time.perf_counter()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=2, help="phantoms per input kind")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--size", type=int, default=256, help="output in-plane size")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="prep-bench-inputs-"))
    try:
        kinds = {
            "1mm_256cube_no_resampling": ((1.0, 1.0, 1.0), (256, 256, 256), None),
            "1.2x1.2x3mm_resampled_to_1mm": ((1.2, 1.2, 3.0), (213, 213, 85), (1.0, 1.0, 1.0)),
        }
        results = {}
        for name, (spacing, shape, target) in kinds.items():
            folder = root / name
            for i in range(args.volumes):
                write_phantom(folder / f"sub-{i:02d}_T1w.nii.gz", i, shape=shape, spacing=spacing,
                              orientation="LPS", skull_stripped=True)
            config = PrepConfig(target_spacing=target, size=args.size)
            results[name] = _measure(folder, config, args.repeats)
        results["target_ratio_1mm"] = 1.5
        print(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
