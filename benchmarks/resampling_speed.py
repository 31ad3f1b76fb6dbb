"""preprocess_volume time, this tree vs. a git revision, on phantoms that do and do not resample.

Prints JSON: best of ``--repeats`` CPU seconds per volume (load included; time.process_time,
so that other jobs on a shared machine do not count) for each variant, the axial slices of the
output grid and the slices kept, and whether the baseline and this tree keep the same slices.
The baseline's ``braindino_jax`` is exported with ``git archive`` and run in a subprocess with
it first on PYTHONPATH; this tree runs in a subprocess too, and the two alternate round by round
in the same invocation. Config fields the baseline does not know (e.g. max_slice_upsampling)
are dropped for it.

    python benchmarks/resampling_speed.py --baseline 763cad0
    python benchmarks/resampling_speed.py                     # this tree only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# name: (source spacing mm, shape, phantom kwargs, PrepConfig kwargs). "max_slice_upsampling":
# None resamples thick slices in 3D as the baseline did; the *_native_slices cases use the default.
_TO_1MM = {"target_spacing": (1.0, 1.0, 1.0), "max_slice_upsampling": None}
CASES = {
    "1mm_256cube_no_resampling": ((1.0, 1.0, 1.0), (256, 256, 256), {}, {"target_spacing": (1.0, 1.0, 1.0)}),
    "1mm_256cube_oblique_5deg": ((1.0, 1.0, 1.0), (256, 256, 256), {"oblique_deg": 5.0}, _TO_1MM),
    "1mm_256cube_oblique_15deg": ((1.0, 1.0, 1.0), (256, 256, 256), {"oblique_deg": 15.0}, _TO_1MM),
    "1.2x1.2x3mm_to_1mm_linear": ((1.2, 1.2, 3.0), (213, 213, 85), {}, _TO_1MM),
    "1.2x1.2x3mm_to_1mm_cubic": ((1.2, 1.2, 3.0), (213, 213, 85), {}, {**_TO_1MM, "interpolation": "cubic"}),
    "1.2x1.2x3mm_oblique_8deg_to_1mm": ((1.2, 1.2, 3.0), (213, 213, 85), {"oblique_deg": 8.0}, _TO_1MM),
    "1.2x1.2x3mm_oblique_8deg_native_slices": ((1.2, 1.2, 3.0), (213, 213, 85), {"oblique_deg": 8.0}, {}),
    "1.5mm_oblique10_to_1mm": ((1.5, 1.5, 1.5), None, {"oblique_deg": 10.0}, _TO_1MM),
    # A clinical thick FLAIR: 10 slices 5.3 mm apart (53 mm), 0.9 mm in-plane, tilted 20 degrees.
    "10_slices_5.3mm_oblique_20deg_native_slices": ((0.9, 0.9, 5.3), (256, 256, 10), {"oblique_deg": 20.0}, {}),
}


def _worker(inputs: Path, out: Path) -> None:
    """Time every case once, after an untimed warm-up, in this interpreter (whichever
    braindino_jax it imports)."""
    from braindino_jax.preprocessing.config import PrepConfig
    from braindino_jax.preprocessing.volume import preprocess_volume

    known = {f.name for f in dataclasses.fields(PrepConfig)}

    def config(kwargs: dict) -> PrepConfig:
        return PrepConfig(**{k: v for k, v in kwargs.items() if k in known})

    warm_up = "1.2x1.2x3mm_to_1mm_linear"
    preprocess_volume(inputs / f"{warm_up}.nii.gz", config(CASES[warm_up][3]))
    timings = {"module": preprocess_volume.__code__.co_filename}
    for name, (_, _, _, config_kwargs) in CASES.items():
        start = time.process_time()
        (result,) = preprocess_volume(inputs / f"{name}.nii.gz", config(config_kwargs))
        timings[name] = time.process_time() - start
        np.savez(out / f"{name}.npz", slices=result.slices, indices=result.slice_indices,
                 moments=[result.fg_mean, result.fg_std, result.n_slices])
    (out / "timings.json").write_text(json.dumps(timings))


def _run_variant(pythonpath: str | None, inputs: Path, out: Path) -> dict:
    out.mkdir(exist_ok=True)
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    subprocess.run([sys.executable, __file__, "--worker", str(inputs), str(out)], env=env, check=True, cwd=out)
    return json.loads((out / "timings.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="git revision to compare against")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the best of them is reported")
    parser.add_argument("--worker", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(*args.worker)
        return

    from braindino_jax.preprocessing.phantom import write_phantom

    root = Path(tempfile.mkdtemp(prefix="resampling-bench-"))
    try:
        inputs = root / "inputs"
        for name, (spacing, shape, phantom_kwargs, _) in CASES.items():
            write_phantom(inputs / f"{name}.nii.gz", 0, shape=shape, spacing=spacing, orientation="LPS",
                          skull_stripped=True, **phantom_kwargs)
        variants = {"current": None}
        if args.baseline:
            tree = root / "baseline_tree"
            tree.mkdir()
            archive = subprocess.run(["git", "-C", str(REPO), "archive", args.baseline, "braindino_jax"],
                                     check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
            variants["baseline"] = str(tree)
        # Rounds alternate the variants, so a change in machine load hits both alike.
        best, modules = {v: {} for v in variants}, {}
        for _ in range(args.repeats):
            for variant, pythonpath in variants.items():
                timings = _run_variant(pythonpath, inputs, root / variant)
                modules[variant] = timings.pop("module")
                for name, t in timings.items():
                    best[variant][name] = min(t, best[variant].get(name, np.inf))
        def slices(variant: str, name: str) -> dict:
            arrays = np.load(root / variant / f"{name}.npz")
            return {"grid_axial_slices": int(arrays["moments"][2]), "kept_slices": int(len(arrays["indices"]))}

        results = {name: {"current_s": round(t, 4), "current": slices("current", name)}
                   for name, t in best["current"].items()}
        if args.baseline:
            baseline = best["baseline"]
            for name, row in results.items():
                a, b = np.load(root / "baseline" / f"{name}.npz"), np.load(root / "current" / f"{name}.npz")
                same_shape = a["slices"].shape == b["slices"].shape
                diff = np.abs(a["slices"].astype(int) - b["slices"].astype(int)) if same_shape else None
                row.update({
                    "baseline_s": round(baseline[name], 4),
                    "baseline": slices("baseline", name),
                    "speedup": round(baseline[name] / row["current_s"], 2),
                    "same_slice_indices_and_n_slices": bool(
                        np.array_equal(a["indices"], b["indices"]) and a["moments"][2] == b["moments"][2]
                    ),
                    "max_abs_uint8_diff": None if diff is None else int(diff.max()),
                    "fraction_of_pixels_differing": None if diff is None else float(np.mean(diff > 0)),
                    "fg_mean_std_max_rel_diff": float(np.max(np.abs(a["moments"][:2] / b["moments"][:2] - 1))),
                })
        report = {"baseline": args.baseline, "modules": modules, "repeats": args.repeats, "cases": results}
        print(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
