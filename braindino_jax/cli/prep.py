"""`braindino-prep`: NIfTI volumes → axial-slice ArrayRecord shards (the local runner's face).

    braindino-prep --demo --out demo_out
    braindino-prep --root ds1=/data/ds1 --root /data/ds2 --out /data/shards --workers 32
    braindino-prep --csv volumes.csv --exclude-subjects eval_subjects.txt --out /data/shards

The flags are data_prep.options' (shared with the Beam job); the work is data_prep.local_runner's.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tqdm import tqdm

from braindino_jax.data.inputs import InputError
from braindino_jax.preprocessing.errors import ConfigError
from data_prep.local_runner import WORK_DIR, finished_volumes, run_local
from data_prep.options import (
    DEMO_INPUTS,
    DEMO_VOLUMES,
    build_parser,
    check_out_dir,
    flag_error,
    inputs_from_args,
    options_from_args,
)

PROG = "braindino-prep"


def main(argv: list[str] | None = None) -> int:
    args = build_parser(PROG).parse_args(argv)
    options = options_from_args(args)
    try:
        options.validate()
        check_out_dir(args.out)
        writing_demo = args.demo and not (Path(args.out) / DEMO_INPUTS).is_dir()
        with tqdm(total=DEMO_VOLUMES, unit="volume", desc="writing demo phantoms",
                  disable=not (writing_demo and options.progress)) as bar:
            volumes, exclusions = inputs_from_args(args, lambda path: bar.update())
        summary = run_local(volumes, options, exclusions)
    except ConfigError as exc:
        print(f"{PROG}: error: {flag_error(exc)}", file=sys.stderr)
        return 2
    except InputError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        finished = finished_volumes(args.out)
        kept = (f"{finished} finished volume{'s' if finished != 1 else ''} kept in {Path(args.out) / WORK_DIR}; "
                "re-run the same command to resume" if finished else
                "no volume had finished; re-run the same command to start again")
        print(f"{PROG}: interrupted; {kept}", file=sys.stderr)
        return 130
    print(summary.format(options.max_failure_fraction))
    return summary.exit_code(options.max_failure_fraction)


if __name__ == "__main__":
    sys.exit(main())
