"""`braindino-prep`: NIfTI volumes → axial-slice ArrayRecord shards (argument parsing only).

    braindino-prep --demo --out demo_out
    braindino-prep --root ds1=/data/ds1 --root /data/ds2 --out /data/shards --workers 32
    braindino-prep --csv volumes.csv --exclude-subjects eval_subjects.txt --out /data/shards
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from pathlib import Path

from braindino_jax.data.atomic_file import temp_name
from braindino_jax.data.inputs import (
    DEFAULT_PATTERNS,
    InputError,
    InputVolume,
    discover,
    read_csv,
    read_exclusions,
)
from braindino_jax.preprocessing.config import PrepConfig
from braindino_jax.preprocessing.errors import ConfigError
from data_prep.local_runner import RunOptions, run_local

DEMO_INPUTS = "demo_inputs"
_BYTE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


def _floats(text: str, count: int, flag: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{flag}: expected {count} comma-separated numbers, got {text!r}")
    if len(values) == 1 and count == 3:
        values = values * 3
    if len(values) != count:
        raise argparse.ArgumentTypeError(f"{flag}: expected {count} comma-separated numbers, got {text!r}")
    return values


def _spacing(text: str) -> tuple[float, float, float] | None:
    return None if text.lower() == "none" else _floats(text, 3, "--spacing")


def _shard_size(text: str) -> tuple[str, int]:
    """`50000` → ("records", 50000); `1GB` → ("bytes", 10**9)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]B)?\s*", text.upper())
    if not m or (m.group(2) is None and "." in m.group(1)):
        raise argparse.ArgumentTypeError(f"--shard-size: expected a record count or a size like 1GB, got {text!r}")
    if m.group(2) is None:
        return "records", int(m.group(1))
    return "bytes", int(float(m.group(1)) * _BYTE_UNITS[m.group(2)])


def build_parser() -> argparse.ArgumentParser:
    defaults = PrepConfig()
    p = argparse.ArgumentParser(
        prog="braindino-prep",
        description="Prepare brain-MRI volumes as axial-slice ArrayRecord shards, with a manifest, "
        "a dataset card and QC montages. Re-running the same command resumes an interrupted run.",
    )
    p.add_argument("--out", required=True, help="output folder for shards, manifest, card and qc/")
    src = p.add_argument_group("inputs")
    src.add_argument("--demo", action="store_true",
                     help="write the built-in demo phantoms to OUT/demo_inputs and prepare them")
    src.add_argument("--root", action="append", default=[], metavar="[NAME=]PATH",
                     help="input folder (repeatable); the dataset is NAME or the folder's name")
    src.add_argument("--pattern", action="append", default=None, metavar="GLOB",
                     help=f"glob under each root (repeatable; default {' '.join(DEFAULT_PATTERNS)})")
    src.add_argument("--csv", help="CSV (a path, or a URL for the Beam job) with columns "
                     "path[,dataset,subject,session,modality]")
    src.add_argument("--exclude-subjects", type=Path, metavar="FILE",
                     help="subject IDs to skip, one per line (ID or DATASET/ID)")
    src.add_argument("--modality", default="unknown", help="modality when neither CSV nor file name gives one")

    job = p.add_argument_group("job")
    job.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    job.add_argument("--shard-size", type=_shard_size, default=("bytes", 10**9),
                     help="target per shard: a record count (50000) or encoded bytes (1GB, the default)")
    job.add_argument("--shard-prefix", default="slices", help="shard file-name prefix")
    job.add_argument("--max-failure-fraction", type=float, default=0.2,
                     help="exit non-zero when more than this fraction of volumes failed")
    job.add_argument("--qc-samples", type=int, default=16, help="QC slices sampled per dataset")
    job.add_argument("--qc-worst", type=int, default=16, help="QC slices with the least foreground")
    job.add_argument("--seed", type=int, default=0, help="seed of the QC sample")
    job.add_argument("--no-progress", action="store_true", help="no progress bar")
    job.add_argument("--clean-work", action="store_true",
                     help="delete OUT/_work after success (a later run then redoes every volume)")

    pre = p.add_argument_group("preprocessing")
    pre.add_argument("--spacing", type=_spacing, default=defaults.target_spacing,
                     help="target voxel spacing in mm: 'x,y,z', one value, or 'none' for no resampling")
    pre.add_argument("--interpolation", default=defaults.interpolation, help="linear | cubic")
    pre.add_argument("--four-d-policy", default=defaults.four_d_policy, help="first | all | skip")
    pre.add_argument("--mask-method", default=defaults.mask_method, help="nonzero | otsu | percentile")
    pre.add_argument("--mask-percentile", type=float, default=defaults.mask_percentile)
    pre.add_argument("--clip-percentiles", type=lambda t: _floats(t, 2, "--clip-percentiles"),
                     default=defaults.clip_percentiles, metavar="LO,HI")
    pre.add_argument("--min-foreground-fraction", type=float, default=defaults.min_foreground_fraction)
    pre.add_argument("--n-slices", type=int, default=defaults.n_slices,
                     help="keep N slices spread uniformly over the foreground (default: all that pass)")
    pre.add_argument("--size", type=int, default=defaults.size, help="output in-plane size (pixels)")
    pre.add_argument("--margin", type=int, default=defaults.margin, help="pixels around the foreground box")
    return p


def _write_demo_inputs(out_dir: Path) -> list[str]:
    """Write the demo phantoms once (atomically, as a folder) and return one root per dataset."""
    from braindino_jax.preprocessing.phantom import write_demo_dataset

    target = out_dir / DEMO_INPUTS
    if not target.is_dir():
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / temp_name(DEMO_INPUTS)
        shutil.rmtree(tmp, ignore_errors=True)
        write_demo_dataset(tmp)
        os.replace(tmp, target)
    return [f"{d.name}={d}" for d in sorted(target.iterdir()) if d.is_dir()]


def options_from_args(args: argparse.Namespace) -> RunOptions:
    """Run options and preprocessing config from parsed flags (validated by the caller)."""
    kind, target = args.shard_size
    return RunOptions(
        out_dir=Path(args.out),
        config=PrepConfig(
            target_spacing=args.spacing,
            interpolation=args.interpolation,
            four_d_policy=args.four_d_policy,
            mask_method=args.mask_method,
            mask_percentile=args.mask_percentile,
            clip_percentiles=args.clip_percentiles,
            min_foreground_fraction=args.min_foreground_fraction,
            n_slices=args.n_slices,
            size=args.size,
            margin=args.margin,
        ),
        workers=args.workers,
        shard_prefix=args.shard_prefix,
        target_shard_records=target if kind == "records" else None,
        target_shard_bytes=target if kind == "bytes" else None,
        max_failure_fraction=args.max_failure_fraction,
        qc_per_dataset=args.qc_samples,
        qc_worst=args.qc_worst,
        seed=args.seed,
        progress=not args.no_progress,
        clean_work=args.clean_work,
    )


def inputs_from_args(args: argparse.Namespace) -> tuple[list[InputVolume], set[str]]:
    """The listed volumes and the excluded subjects; raises InputError on a bad listing."""
    if sum([args.demo, bool(args.root), args.csv is not None]) != 1:
        raise InputError("give exactly one input source: --demo, --root (repeatable) or --csv")
    if args.csv is not None:
        volumes = read_csv(args.csv, args.modality)
    else:
        roots = _write_demo_inputs(Path(args.out)) if args.demo else args.root
        volumes = discover(roots, args.pattern or DEFAULT_PATTERNS, args.modality)
    exclusions = read_exclusions(args.exclude_subjects) if args.exclude_subjects else set()
    return volumes, exclusions


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = options_from_args(args)
    try:
        options.validate()
        volumes, exclusions = inputs_from_args(args)
        summary = run_local(volumes, options, exclusions)
    except (ConfigError, InputError) as exc:
        print(f"braindino-prep: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"braindino-prep: interrupted; finished volumes are kept in {args.out}/_work, "
              "re-run the same command to resume", file=sys.stderr)
        return 130
    print(summary.format())
    return summary.exit_code(options.max_failure_fraction)


if __name__ == "__main__":
    sys.exit(main())
