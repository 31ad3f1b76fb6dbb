"""``braindino-convert``: PyTorch DINOv3 weights <-> Flax backbone checkpoints.

  braindino-convert to-flax  SRC.{pth,safetensors} OUT_DIR   # Meta, timm or training checkpoint
  braindino-convert to-torch FLAX_DIR OUT.safetensors         # Meta DINOv3 key format
"""

from __future__ import annotations

import argparse
import sys

from braindino_jax.models.convert import (
    CheckpointError,
    export_backbone,
    load_backbone,
    load_flax_checkpoint,
    save_flax_checkpoint,
)
from braindino_jax.models.config import ModelConfigError
from braindino_jax.models.vit import count_params


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="braindino-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    to_flax = sub.add_parser("to-flax", help="PyTorch checkpoint -> Flax (Orbax) checkpoint directory")
    to_flax.add_argument("source")
    to_flax.add_argument("output_dir")
    to_flax.add_argument("--format", choices=("auto", "meta", "timm"), default="auto")
    to_flax.add_argument("--num-heads", type=int, help="needed only when the file has no rope_embed.periods")
    to_flax.add_argument("--norm-eps", type=float, help="LayerNorm epsilon (DINOv3 hub models: 1e-5)")
    to_flax.add_argument("--in-chans", type=int, choices=(1, 3),
                         help="1: fold RGB patch-embedding weights for 1-channel MRI input (exact)")
    to_torch = sub.add_parser("to-torch", help="Flax checkpoint directory -> Meta-format safetensors")
    to_torch.add_argument("source_dir")
    to_torch.add_argument("output")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "to-flax":
            overrides = {}
            if args.num_heads is not None:
                overrides["num_heads"] = args.num_heads
            if args.norm_eps is not None:
                overrides["norm_eps"] = args.norm_eps
            if args.in_chans is not None:
                overrides["in_chans"] = args.in_chans
            model, heads = load_backbone(args.source, fmt=args.format, **overrides)
            save_flax_checkpoint(args.output_dir, model, heads)
            print(f"wrote {args.output_dir}: backbone {count_params(model):,} params"
                  + (f", heads {sorted(heads)}" if heads else ""))
        else:
            model, heads = load_flax_checkpoint(args.source_dir)
            written = export_backbone(model, args.output, heads)
            print(f"wrote {args.output}: {len(written)} tensors in Meta DINOv3 format")
    except (CheckpointError, ModelConfigError) as err:
        print(f"braindino-convert: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
