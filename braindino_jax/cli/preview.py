"""`braindino-preview`: render augmented crops and iBOT masks of a few slices to PNG.

    braindino-preview '/data/shards/brain-*.array_record' --out grid.png
    braindino-preview shards/a-00000-of-00004.array_record --samples 6 --seed 1 --out grid.png
"""

from __future__ import annotations

import argparse
import sys

import braindino_jax
from braindino_jax.data.augment import AugmentConfig
from braindino_jax.data.preview import preview_shards
from data_prep.options import HelpFormatter


def build_parser() -> argparse.ArgumentParser:
    defaults = AugmentConfig()
    parser = argparse.ArgumentParser(prog="braindino-preview", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {braindino_jax.__version__}")
    parser.add_argument("shards", nargs="+", help="ArrayRecord shard paths or globs")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--samples", type=int, default=4, help="slices (rows) to show")
    parser.add_argument("--seed", type=int, default=0, help="shuffle and augmentation seed")
    parser.add_argument("--global-size", type=int, default=defaults.global_size, help="global crop size (pixels)")
    parser.add_argument("--local-size", type=int, default=defaults.local_size, help="local crop size (pixels)")
    parser.add_argument("--n-local", type=int, default=defaults.n_local, help="local crops per slice")
    parser.add_argument("--patch-size", type=int, default=16, help="ViT patch size (the iBOT mask grid)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    augment = AugmentConfig(global_size=args.global_size, local_size=args.local_size,
                            n_local=args.n_local)
    try:
        if args.samples < 1:
            raise ValueError(f"--samples: must be >= 1, got {args.samples}")
        out = preview_shards(args.shards, args.out, n_samples=args.samples, seed=args.seed,
                             augment=augment, patch_size=args.patch_size)
    except (ValueError, OSError) as exc:  # PipelineError and RecordError are ValueErrors
        print(f"braindino-preview: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
