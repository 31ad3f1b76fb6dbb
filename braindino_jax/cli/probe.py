"""`braindino-probe`: frozen-encoder probes from a config (argument parsing only).

    braindino-probe --config configs/probes/demo.py
    braindino-probe --config configs/probes/classification.py:adni.csv \
        --config.encoders='("workdir:runs/braindino", "random:like=workdir:runs/braindino")' \
        --config.protocol.seeds='(0, 1, 2)'
    braindino-probe visualize --encoder export:braindino_vitb16 --volume sub-01_T1w.nii.gz --out figures/
    braindino-probe visualize --config configs/probes/demo.py --out figures/ --reference 1,6,7

Overrides are --config.SECTION.FIELD=VALUE (or a separate VALUE), parsed for the field's type;
tuples as Python literals or comma-separated items.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from braindino_jax.preprocessing.errors import VolumeError
from braindino_jax.probes.config import apply_overrides, default_config, load_config, validate
from braindino_jax.probes.errors import ProbeConfigError, ProbeInputError


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate --config.a.b=v (or --config.a.b v) from the other arguments."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            body = arg[len("--config."):]
            if "=" not in body:
                if i + 1 >= len(argv):
                    raise ProbeConfigError(f"{arg}: expected a value")
                body, i = f"{body}={argv[i + 1]}", i + 1
            overrides.append(body)
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def _run_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="braindino-probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="path/to/config.py[:arg]")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    return parser


def _visualize_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="braindino-probe visualize",
                                     description="PCA, patch-similarity and t-SNE figures of frozen features")
    parser.add_argument("--config", help="path/to/config.py[:arg] (preprocessing; its task for t-SNE)")
    parser.add_argument("--encoder", action="append", default=[], help="encoder spec (repeatable; "
                        "default: the config's encoders)")
    parser.add_argument("--volume", action="append", default=[], help="NIfTI volume to show (repeatable; "
                        "default: the config's first test volumes)")
    parser.add_argument("--out", required=True, help="folder for the PNGs")
    parser.add_argument("--slices", type=int, help="slices shown per volume")
    parser.add_argument("--reference", help="SLICE,ROW,COL: the similarity maps' reference patch (SLICE counted "
                        "over all shown slices; default: the central brain patch of the middle slice)")
    return parser


def _visualize(argv: list[str]) -> int:
    from braindino_jax.probes.protocol import figures

    rest, overrides = _split_overrides(argv)
    args = _visualize_parser().parse_args(rest)
    if args.slices is not None:
        overrides.append(f"visualize.n_slices={args.slices}")
    if args.reference is not None:
        overrides.append(f"visualize.reference=({args.reference},)")
    if args.config:
        config = load_config(args.config, overrides)
    else:  # the defaults, with the same overrides (e.g. --config.input.size=160)
        config = default_config()
        apply_overrides(config, overrides)
        validate(config, need_task=False)
    encoders = args.encoder or list(config.encoders)
    if not args.volume and not args.config:
        raise ProbeConfigError("visualize: give --volume paths or a --config with a task")
    written = figures(config, encoders, args.volume, Path(args.out))
    for path in written:
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "visualize":
            logging.basicConfig(level=logging.INFO, format="%(message)s")
            return _visualize(argv[1:])
        rest, overrides = _split_overrides(argv)
        args = _run_parser().parse_args(rest)
        config = load_config(args.config, overrides)
        if args.quiet:
            config.extract.progress = False
        else:
            logging.basicConfig(level=logging.INFO, format="%(message)s")
        from braindino_jax.probes.protocol import run_probe

        summary = run_probe(config)
    except (ProbeConfigError, ProbeInputError, VolumeError) as err:
        print(f"braindino-probe: error: {err}", file=sys.stderr)
        return 2
    print(Path(summary["files"]["md"]).read_text())
    for name, path in summary["files"].items():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
