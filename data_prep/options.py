"""The options both data-preparation jobs take: one argument parser, and what it builds.

`braindino-prep` (the local runner's face) and `python -m data_prep.beam_pipeline` share these
flags, so a corpus prepared on a laptop and one prepared on a cluster follow the same rules.
Errors from validation name the flag the user typed (`FLAGS`), not the field behind it.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import braindino_jax
from braindino_jax.data.atomic_file import temp_name
from braindino_jax.data.inputs import (
    DEFAULT_PATTERNS,
    LABEL_SUFFIXES,
    InputError,
    InputSelection,
    InputVolume,
    discover,
    is_url,
    read_csv,
    read_exclusions,
)
from braindino_jax.preprocessing.config import FOUR_D_POLICIES, INTERPOLATIONS, MASK_METHODS, PrepConfig
from braindino_jax.preprocessing.errors import ConfigError
from data_prep.local_runner import RunOptions

DEMO_INPUTS = "demo_inputs"
DEMO_VOLUMES = 8
_BYTE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}

# Validated field -> the flag that sets it (and, for PrepConfig, whose value it takes).
FLAGS = {
    "PrepConfig.target_spacing": "--spacing",
    "PrepConfig.interpolation": "--interpolation",
    "PrepConfig.four_d_policy": "--four-d-policy",
    "PrepConfig.mask_method": "--mask-method",
    "PrepConfig.mask_percentile": "--mask-percentile",
    "PrepConfig.clip_percentiles": "--clip-percentiles",
    "PrepConfig.min_foreground_fraction": "--min-foreground-fraction",
    "PrepConfig.n_slices": "--n-slices",
    "PrepConfig.size": "--size",
    "PrepConfig.margin": "--margin",
    "PrepConfig.max_slice_upsampling": "--max-slice-upsampling",
    "PrepConfig.min_extent_mm": "--min-extent-mm",
    "workers": "--workers",
    "shard_prefix": "--shard-prefix",
    "target_shard_records": "--shard-size",
    "target_shard_bytes": "--shard-size",
    "max_failure_fraction": "--max-failure-fraction",
    "qc_per_dataset": "--qc-samples",
    "qc_worst": "--qc-worst",
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each option's default in --help (unless it is "none" or "off", which its help then
    explains), and descriptions kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.required or action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


def flag_error(exc: ConfigError) -> str:
    """A config error as the user should read it: the flag they typed, then the problem."""
    return f"{FLAGS.get(exc.field, exc.field)}: {exc.problem}"


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


def _upsampling(text: str) -> float | None:
    try:
        return None if text.lower() == "none" else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--max-slice-upsampling: expected a number or 'none', got {text!r}")


def _shard_size(text: str) -> tuple[str, int]:
    """`50000` → ("records", 50000); `1GB` → ("bytes", 10**9)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]B)?\s*", text.upper())
    if not m or (m.group(2) is None and "." in m.group(1)):
        raise argparse.ArgumentTypeError(f"--shard-size: expected a record count or a size like 1GB, got {text!r}")
    if m.group(2) is None:
        return "records", int(m.group(1))
    return "bytes", int(float(m.group(1)) * _BYTE_UNITS[m.group(2)])


def build_parser(prog: str = "braindino-prep", local: bool = True, epilog: str | None = None) -> argparse.ArgumentParser:
    """The flags of `braindino-prep`; `local=False` leaves out those of the local runner only
    (workers, progress, the work folder), for the Beam job."""
    defaults = PrepConfig()
    description = ("Prepare brain-MRI volumes as axial-slice ArrayRecord shards, with a manifest,\n"
                   "a dataset card and QC montages.")
    if local:
        description += " Re-running the same command resumes an interrupted run."
    p = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog, formatter_class=HelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {braindino_jax.__version__}")
    p.add_argument("--out", required=True, help="output folder for shards, manifest, card and qc/")
    src = p.add_argument_group("inputs (give one of --demo, --root, --csv)")
    src.add_argument("--demo", action="store_true",
                     help="write the built-in demo phantoms to OUT/demo_inputs and prepare them")
    src.add_argument("--root", action="append", default=[], metavar="[NAME=]PATH",
                     help="input folder (repeatable); the dataset is NAME or the folder's name")
    src.add_argument("--pattern", action="append", default=None, metavar="GLOB",
                     help=f"glob under each root (repeatable; none given: {' '.join(DEFAULT_PATTERNS)})")
    src.add_argument("--csv", help="CSV (a path, or a URL for the Beam job) with columns "
                     "path[,dataset,subject,session,modality]")
    src.add_argument("--exclude-subjects", type=Path, metavar="FILE",
                     help="subject IDs to skip, one per line (ID or DATASET/ID)")
    src.add_argument("--default-modality", default="unknown",
                     help="modality of files whose CSV row and name give none")
    sel = p.add_argument_group("selection (what is left out is listed in the manifest as skipped)")
    sel.add_argument("--modality", action="append", default=[], metavar="SUFFIX",
                     help="prepare only this modality, e.g. T1w or FLAIR (repeatable; case-insensitive; "
                     "none given: all)")
    sel.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                     help="skip files whose path under their root, or name, matches (repeatable; * matches /)")
    sel.add_argument("--include-derivatives", action="store_true",
                     help="also prepare files under BIDS derivatives/ folders")
    sel.add_argument("--include-labels", action="store_true",
                     help=f"also prepare label images (file names ending _{', _'.join(LABEL_SUFFIXES)})")

    job = p.add_argument_group("job")
    if local:
        job.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes")
    job.add_argument("--shard-size", type=_shard_size, default="1GB",
                     help="target per shard: a record count (50000) or encoded bytes (1GB)")
    job.add_argument("--shard-prefix", default="slices", help="shard file-name prefix")
    job.add_argument("--max-failure-fraction", type=float, default=0.2,
                     help="exit with code 1 when more than this fraction of the attempted volumes failed "
                     "(skipped ones do not count)")
    job.add_argument("--qc-samples", type=int, default=16, help="QC slices sampled per dataset")
    job.add_argument("--qc-worst", type=int, default=16, help="QC slices with the least foreground")
    job.add_argument("--seed", type=int, default=0, help="seed of the QC sample")
    if local:
        job.add_argument("--no-progress", action="store_true", help="no progress bars")
        job.add_argument("--keep-work", action="store_true",
                         help="keep OUT/_work (per-volume results) after success, so that a later run over a "
                         "grown corpus redoes only the new volumes; without it, it is removed once the "
                         "shards are written")

    pre = p.add_argument_group("preprocessing")
    pre.add_argument("--spacing", type=_spacing, default="1",
                     help="target voxel spacing in mm: 'x,y,z', one value for all three, or 'none' (no resampling)")
    pre.add_argument("--max-slice-upsampling", type=_upsampling, default=str(defaults.max_slice_upsampling),
                     help="most through-plane upsampling (slice distance / target z spacing): thicker axial "
                     "slices are kept as they are and resampled in-plane only; thicker non-axial slices are "
                     "skipped; 'none' for no limit")
    pre.add_argument("--interpolation", default=defaults.interpolation, choices=INTERPOLATIONS,
                     help="image interpolation when resampling (masks: linear, thresholded at 0.5)")
    pre.add_argument("--four-d-policy", default=defaults.four_d_policy, choices=FOUR_D_POLICIES,
                     help="4D series: the first volume, all of them, or skip the file")
    pre.add_argument("--mask-method", default=defaults.mask_method, choices=MASK_METHODS,
                     help="foreground: nonzero voxels (skull-stripped inputs), or an intensity threshold "
                     "(otsu, percentile) that finds the head, scalp and skull included")
    pre.add_argument("--mask-percentile", type=float, default=defaults.mask_percentile,
                     help="threshold percentile of --mask-method percentile")
    pre.add_argument("--clip-percentiles", type=lambda t: _floats(t, 2, "--clip-percentiles"),
                     default=",".join(f"{v:g}" for v in defaults.clip_percentiles), metavar="LO,HI",
                     help="foreground intensity percentiles mapped to 1 and 255")
    pre.add_argument("--min-foreground-fraction", type=float, default=defaults.min_foreground_fraction,
                     help="keep axial slices with at least this fraction of foreground pixels")
    pre.add_argument("--n-slices", type=int, default=defaults.n_slices,
                     help="keep N slices spread uniformly over the foreground (none given: every slice "
                     "that passes --min-foreground-fraction)")
    pre.add_argument("--size", type=int, default=defaults.size, help="output in-plane size (pixels)")
    pre.add_argument("--margin", type=int, default=defaults.margin, help="pixels around the foreground box")
    pre.add_argument("--min-extent-mm", type=float, default=defaults.min_extent_mm,
                     help="skip volumes whose foreground spans less than this in-plane (not a brain)")
    return p


def check_out_dir(out: str) -> None:
    """Fail before any work when `--out` cannot be an output folder (URLs are the Beam job's)."""
    if is_url(out):
        return
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--out {out}: cannot create the folder: {exc.strerror or exc}") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise InputError(f"--out {out}: the folder is not writable")


def write_demo_inputs(out_dir: Path, progress: Callable[[Path], None] | None = None) -> list[str]:
    """Write the demo phantoms once (atomically, as a folder) and return one root per dataset.

    A folder half-written by an interrupted run (any process's) is removed first; this run's is
    removed if it is interrupted.
    """
    from braindino_jax.preprocessing.phantom import write_demo_dataset

    target = out_dir / DEMO_INPUTS
    if not target.is_dir():
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.glob(f".{DEMO_INPUTS}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = out_dir / temp_name(DEMO_INPUTS)
        try:
            write_demo_dataset(tmp, n_volumes=DEMO_VOLUMES, progress=progress)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return [f"{d.name}={d}" for d in sorted(target.iterdir()) if d.is_dir()]


def selection_from_args(args: argparse.Namespace) -> InputSelection:
    return InputSelection(exclude=tuple(args.exclude), modalities=tuple(args.modality),
                          include_derivatives=args.include_derivatives, include_labels=args.include_labels)


def options_from_args(args: argparse.Namespace) -> RunOptions:
    """Run options and preprocessing config from parsed flags (validated by the caller)."""
    kind, target = args.shard_size
    config = {field.removeprefix("PrepConfig."): getattr(args, flag[2:].replace("-", "_"))
              for field, flag in FLAGS.items() if field.startswith("PrepConfig.")}
    return RunOptions(
        out_dir=Path(args.out),
        config=PrepConfig(**config),
        selection=selection_from_args(args),
        workers=getattr(args, "workers", 1),
        shard_prefix=args.shard_prefix,
        target_shard_records=target if kind == "records" else None,
        target_shard_bytes=target if kind == "bytes" else None,
        max_failure_fraction=args.max_failure_fraction,
        qc_per_dataset=args.qc_samples,
        qc_worst=args.qc_worst,
        seed=args.seed,
        progress=not getattr(args, "no_progress", True),
        keep_work=getattr(args, "keep_work", False),
    )


def inputs_from_args(
    args: argparse.Namespace, demo_progress: Callable[[Path], None] | None = None
) -> tuple[list[InputVolume], set[str]]:
    """The listed volumes and the excluded subjects; raises InputError on a bad listing."""
    if sum([args.demo, bool(args.root), args.csv is not None]) != 1:
        raise InputError("give exactly one input source: --demo, --root (repeatable) or --csv")
    if args.csv is not None:
        volumes = read_csv(args.csv, args.default_modality)
    else:
        roots = write_demo_inputs(Path(args.out), demo_progress) if args.demo else args.root
        volumes = discover(roots, args.pattern or DEFAULT_PATTERNS, args.default_modality)
    exclusions = read_exclusions(args.exclude_subjects) if args.exclude_subjects else set()
    return volumes, exclusions
