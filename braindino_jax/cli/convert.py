"""``braindino-convert``: PyTorch DINOv3 weights <-> Flax backbone checkpoints.

  braindino-convert to-flax  SRC.{pth,safetensors} OUT_DIR   # Meta, timm or training checkpoint
  braindino-convert to-torch FLAX_DIR OUT.safetensors         # Meta DINOv3 key format

to-flax prints the LayerNorm epsilon it used and why: a state dict does not carry it, and a
wrong one shifts every feature. Check it against how the weights were trained (--norm-eps).
"""

from __future__ import annotations

import argparse
import sys

import braindino_jax
from braindino_jax.models.config import ModelConfigError
from braindino_jax.models.convert import (
    NORM_EPS_RELEASED,
    NORM_EPS_TRAINING,
    CheckpointError,
    export_backbone,
    load_backbone_explained,
    load_flax_checkpoint,
    save_flax_checkpoint,
)
from braindino_jax.models.vit import count_params
from data_prep.options import HelpFormatter

PROG = "braindino-convert"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {braindino_jax.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{to-flax,to-torch}")
    to_flax = sub.add_parser("to-flax", help="PyTorch checkpoint -> Flax (Orbax) checkpoint folder",
                             formatter_class=HelpFormatter)
    to_flax.add_argument("source", help="a .pth/.pt/.bin (torch.load, weights only) or .safetensors file")
    to_flax.add_argument("output_dir", help="folder to write config.json and the Orbax state into")
    to_flax.add_argument("--format", choices=("auto", "meta", "timm"), default="auto",
                         help="key layout of the file (auto: detected)")
    to_flax.add_argument("--num-heads", type=int,
                         help="attention heads (needed only when the file has no rope_embed.periods)")
    to_flax.add_argument("--norm-eps", type=float,
                         help=f"LayerNorm epsilon (none given: the file's stored config, else {NORM_EPS_TRAINING:g} "
                         f"for DINOv3 training checkpoints, else {NORM_EPS_RELEASED:g} as in DINOv3's hub models)")
    to_flax.add_argument("--in-chans", type=int, choices=(1, 3),
                         help="1: fold RGB patch-embedding weights for 1-channel MRI input (exact); "
                         "none given: the file's")
    to_flax.add_argument("--overwrite", action="store_true",
                         help="replace a checkpoint already in OUTPUT_DIR (a non-empty folder is refused without it)")
    to_torch = sub.add_parser("to-torch", help="Flax checkpoint folder -> Meta-format safetensors",
                              formatter_class=HelpFormatter)
    to_torch.add_argument("source_dir", help="a folder written by to-flax (or save_flax_checkpoint)")
    to_torch.add_argument("output", help="the .safetensors file to write")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "to-flax":
            overrides = {name: value for name, value in (("num_heads", args.num_heads), ("norm_eps", args.norm_eps),
                                                         ("in_chans", args.in_chans)) if value is not None}
            model, heads, why = load_backbone_explained(args.source, fmt=args.format, **overrides)
            save_flax_checkpoint(args.output_dir, model, heads, overwrite=args.overwrite)
            print(f"LayerNorm epsilon {model.config.norm_eps:g}: {why}")
            print(f"wrote {args.output_dir}: backbone {count_params(model):,} params"
                  + (f", heads {sorted(heads)}" if heads else ""))
        else:
            model, heads = load_flax_checkpoint(args.source_dir)
            written = export_backbone(model, args.output, heads)
            print(f"wrote {args.output}: {len(written)} tensors in Meta DINOv3 format")
    except (CheckpointError, ModelConfigError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
