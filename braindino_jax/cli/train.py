"""``braindino-train``: BrainDINO pretraining with Orbax checkpoints, resumable and preemptible.

  braindino-train --config configs/debug_cpu.py --workdir runs/debug
  braindino-train --config configs/braindino_vitb16.py --workdir runs/vitb16 \\
      --config.train.batch_size=512 --config.data.shards="('/data/shards/slices-*.array_record',)"

Any config field can be overridden with --config.a.b=value (Python literal syntax). Re-running
the same command resumes from the latest checkpoint in --workdir. Multi-process runs: set
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID on every process (GPU clusters),
or pass --distributed where JAX detects the cluster itself (TPU pod slices, SLURM).
"""

from __future__ import annotations

import argparse
import os
import sys

import braindino_jax
from data_prep.options import HelpFormatter

PROG = "braindino-train"
ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {braindino_jax.__version__}")
    p.add_argument("--config", required=True,
                   help="config file defining get_config(), optionally with ':ARG' (configs/*.py)")
    p.add_argument("--workdir", required=True,
                   help="run directory: checkpoints, metrics.jsonl, tensorboard/, export/")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many steps of this invocation (schedules keep the "
                        "configured length)")
    p.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() with JAX's own cluster detection "
                        f"(TPU pods, SLURM); implied when {', '.join(ENV)} are set")
    return p


def init_distributed(auto_detect: bool) -> None:
    """Join the multi-process run described by the environment (or detected by JAX)."""
    import jax

    present = [name for name in ENV if name in os.environ]
    if present and len(present) != len(ENV):
        missing = sorted(set(ENV) - set(present))
        raise SystemExit(f"{PROG}: error: set all of {', '.join(ENV)} (missing {', '.join(missing)})")
    if present:
        jax.distributed.initialize(coordinator_address=os.environ[ENV[0]],
                                   num_processes=int(os.environ[ENV[1]]),
                                   process_id=int(os.environ[ENV[2]]))
    elif auto_detect:
        jax.distributed.initialize()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)} "
                     "(config overrides look like --config.train.batch_size=256)")
    init_distributed(args.distributed)

    from braindino_jax.data.pipeline import PipelineError
    from braindino_jax.train.checkpoint import CheckpointError
    from braindino_jax.train.config import ConfigError, load_config
    from braindino_jax.train.loop import TrainError, train
    from braindino_jax.train.pretrained import InitError

    try:
        config = load_config(args.config, rest)
        summary = train(config, args.workdir, max_steps=args.max_steps)
    except (ConfigError, TrainError, CheckpointError, PipelineError, InitError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    if summary.preempted:
        print(f"preempted: saved step {summary.final_step} in {summary.workdir}/checkpoints; "
              "run the same command to resume")
        return 0
    print(f"done: step {summary.final_step}/{summary.total_steps}\n"
          f"  checkpoints: {summary.workdir}/checkpoints\n"
          f"  metrics:     {summary.workdir}/metrics.jsonl, {summary.workdir}/tensorboard\n"
          f"  curves:      {summary.curves_png}\n"
          f"  teacher:     {summary.export_dir} (braindino-probe export:..., "
          "braindino-convert to-torch)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
