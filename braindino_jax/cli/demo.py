"""`braindino demo`: from nothing to a pretrained, probed encoder and a report, on a laptop CPU.

    braindino demo                      # writes braindino_demo/ (report.html at the end)
    braindino demo --out DIR --steps 50 # a shorter pretraining run
    braindino demo --fresh              # start over instead of reusing finished stages

Every stage runs the command a user runs at scale, with the arguments it prints: phantoms →
`braindino-prep` → `braindino-preview` → `braindino-train --config configs/debug_cpu.py` →
`braindino-probe` on three phantom tasks (the trained teacher against the same architecture at
random init, as initialised and with LayerScale 1) → `report.html`. A stage is reused when its
marker (written last, holding the stage's arguments) matches; an interrupted stage resumes in
place (prep from its work folder, training from its latest checkpoint, probes from the feature
cache); a stage whose arguments changed is redone from scratch, and so is everything after a
stage that ran. The report is written anew every time (it takes a second).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import braindino_jax
from braindino_jax.cli.demo_report import DemoError, read_verdicts, write_report
from braindino_jax.data.atomic_file import write_atomic

PROG = "braindino"
PROBE_TASKS = ("classification", "regression", "segmentation")
MARKERS = ".stages"
# The pretraining corpus (preprocessing.phantom.write_sessions_dataset): 6 heads x 4 sessions x
# FLAIR/T1w = 48 volumes, a lesion-free baseline and then new lesions each session.
PRETRAIN_PHANTOMS = {"n_subjects": 6, "sessions": 4}
PROBE_SUBJECTS = 48
PROBE_SEED = 1  # probe subjects are other phantoms than the pretraining ones (seed 0)
# --tiny (tests): fewer phantoms and a one-seed, short probe protocol; every stage still runs.
TINY_PRETRAIN_PHANTOMS = {"n_subjects": 1, "sessions": 2}
TINY_PROBE_SUBJECTS = 8
PROBE_SPACING = 2.0  # mm, the phantoms' voxels (the probe config resamples to 2 mm)
TINY_PROBE_SPACING = 3.0
TINY_PROBE_OVERRIDES = ("--config.protocol.seeds=(0,)", "--config.protocol.label_fractions=(1.0,)",
                        "--config.protocol.bootstrap=20", "--config.train.epochs=20",
                        "--config.segmentation.steps=20", "--config.segmentation.eval_every=10",
                        "--config.input.n_slices=8", "--config.visualize.n_volumes=1")


def configs_dir() -> Path:
    """The repository's configs/ folder, beside the package of an editable install."""
    path = Path(braindino_jax.__file__).resolve().parents[1] / "configs"
    if not (path / "debug_cpu.py").is_file():
        raise DemoError(f"no configs/ folder next to the braindino_jax package (looked for {path}/debug_cpu.py); "
                        "`braindino demo` runs from a source checkout installed with `pip install -e .`")
    return path


class Layout:
    """Where each stage writes, under ``--out``."""

    def __init__(self, out: Path):
        self.out = out
        self.pretrain_phantoms = out / "phantoms" / "pretrain"
        self.probe_task = out / "phantoms" / "probe_task"
        self.shards = out / "shards"
        self.preview = out / "preview" / "augmentation.png"
        self.train = out / "train"
        self.probe = out / "probe"
        self.report = out / "report.html"
        self.markers = out / MARKERS

    def probe_dir(self, task: str) -> Path:
        return self.probe / task


def _command(name: str, main: Callable[[list[str]], int], argv: list[str]) -> None:
    """Run one of the package's commands in this process, as its console script would."""
    print(f"$ {name} {' '.join(_quote(a) for a in argv)}", flush=True)
    code = main(argv)
    if code != 0:
        raise DemoError(f"{name} exited with code {code} (its message is above)")


def _quote(arg: str) -> str:
    return f"'{arg}'" if any(c in arg for c in " *()'\",") else arg


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of the demo: what it runs and what it leaves.

    ``settings`` are its identity: output made with other settings is removed before it runs.
    ``extent`` is how far it goes (training's --max-steps): a change re-runs the stage in place,
    so a longer run resumes a shorter one.
    """

    name: str
    title: str
    settings: Any
    run: Callable[[], None]
    outputs: list[Path]
    extent: Any = None


def _stages(layout: Layout, args: argparse.Namespace) -> list[Stage]:
    from braindino_jax.cli import preview, prep, probe, train
    from braindino_jax.train.config import load_config

    configs = configs_dir()
    pretrain = TINY_PRETRAIN_PHANTOMS if args.tiny else PRETRAIN_PHANTOMS
    probe_subjects = TINY_PROBE_SUBJECTS if args.tiny else PROBE_SUBJECTS
    probe_spacing = TINY_PROBE_SPACING if args.tiny else PROBE_SPACING
    shard_glob = str(layout.shards / "slices-*.array_record")

    def phantoms() -> None:
        from braindino_jax.preprocessing.phantom import write_sessions_dataset
        from braindino_jax.probes.phantom_tasks import write_phantom_task

        print(f"writing pretraining phantoms ({pretrain['n_subjects']} heads x {pretrain['sessions']} sessions x "
              f"FLAIR/T1w, BIDS layout) to {layout.pretrain_phantoms}", flush=True)
        write_sessions_dataset(layout.pretrain_phantoms, **pretrain)
        print(f"writing {probe_subjects} probe subjects (T1w, FLAIR, tissue labels, half with lesions) to "
              f"{layout.probe_task}", flush=True)
        write_phantom_task(layout.probe_task, n_subjects=probe_subjects, seed=PROBE_SEED, spacing=probe_spacing)

    def prep_argv() -> list[str]:  # one --root per dataset folder the phantoms stage wrote
        roots = sorted(d for d in layout.pretrain_phantoms.iterdir() if d.is_dir())
        return [*(f"--root={d.name}={d}" for d in roots), "--out", str(layout.shards)]

    train_config = str(configs / "debug_cpu.py")
    train_argv = ["--config", train_config, "--workdir", str(layout.train),
                  f"--config.data.shards=({shard_glob!r},)"]
    max_steps = ["--max-steps", str(args.steps)] if args.steps else []
    augment = load_config(train_config, train_argv[4:]).augment
    preview_argv = [shard_glob, "--out", str(layout.preview), "--samples", "4",
                    "--global-size", str(augment.global_size), "--local-size", str(augment.local_size),
                    "--n-local", str(augment.n_local)]

    def probe_stage(task: str) -> Stage:
        argv = probe_argv(configs, layout, task, args.tiny)
        return Stage(f"probe-{task}", f"braindino-probe: {task}, frozen teacher vs random inits",
                     [*argv, file_digest(configs / "probes" / "demo.py")],
                     lambda: _command("braindino-probe", probe.main, argv), [layout.probe_dir(task)])

    return [
        Stage("phantoms", "generate phantoms", [pretrain, probe_subjects, PROBE_SEED, probe_spacing], phantoms,
              [layout.pretrain_phantoms, layout.probe_task]),
        Stage("prep", "braindino-prep: phantoms -> ArrayRecord shards", [str(layout.shards)],
              lambda: _command("braindino-prep", prep.main, prep_argv()), [layout.shards]),
        Stage("preview", "braindino-preview: what the model sees", preview_argv,
              lambda: _command("braindino-preview", preview.main, preview_argv), [layout.preview.parent]),
        Stage("train", "braindino-train: pretrain debug_cpu", [*train_argv, file_digest(Path(train_config))],
              lambda: _command("braindino-train", train.main, train_argv + max_steps), [layout.train], max_steps),
        *(probe_stage(task) for task in PROBE_TASKS),
    ]


def file_digest(path: Path) -> str:
    """A config file's sha256, part of its stage's settings: an edited config redoes the stage."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def probe_argv(configs: Path, layout: Layout, task: str, tiny: bool) -> list[str]:
    """The probe command of one phantom task: the demo config with the trained run's teacher and
    its random controls, on the phantoms written by the first stage."""
    from braindino_jax.probes.phantom_tasks import TISSUE_CLASSES

    names = [f"--config.task.class_names={TISSUE_CLASSES!r}"] if task == "segmentation" else []
    return ["--config", f"{configs / 'probes' / 'demo.py'}:{task},{layout.train}",
            f"--config.output_dir={layout.probe_dir(task)}",
            f"--config.task.csv={layout.probe_task / 'task.csv'}", "--config.task.phantoms=0", *names,
            f"--config.extract.cache_dir={layout.probe / 'feature_cache'}",
            *(TINY_PROBE_OVERRIDES if tiny else ())]


def _marker(layout: Layout, stage: Stage, kind: str) -> Path:
    return layout.markers / f"{stage.name}.{kind}.json"


def _read_marker(path: Path, field: str = "settings") -> Any:
    try:
        return json.loads(path.read_text())[field]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _clear(stage: Stage) -> None:
    for path in stage.outputs:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def run_demo(out: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run (or reuse) every stage, then write the report; returns `run_stages`' rows."""
    layout = Layout(out)
    stages = _stages(layout, args)
    if args.fresh:  # the probes' shared feature cache belongs to no one stage
        shutil.rmtree(layout.probe, ignore_errors=True)
    done = run_stages(layout, stages, args.fresh)
    print(f"\n[{len(stages) + 1}/{len(stages) + 1}] report", flush=True)
    print(f"  wrote {write_report(layout, PROBE_TASKS)}", flush=True)
    return done


def run_stages(layout: Layout, stages: list[Stage], fresh: bool = False) -> list[dict[str, Any]]:
    """Run each stage unless its marker says it finished with these settings and nothing before
    it ran; returns one row per stage: name, reused, seconds."""
    if fresh:
        for stage in stages:
            _clear(stage)
        shutil.rmtree(layout.markers, ignore_errors=True)
    layout.out.mkdir(parents=True, exist_ok=True)
    done: list[dict[str, Any]] = []
    redo = False  # once a stage runs, every later one runs too (its inputs changed)
    for i, stage in enumerate(stages, 1):
        settings = json.loads(json.dumps(stage.settings))
        extent = json.loads(json.dumps(stage.extent))
        finished, started = _marker(layout, stage, "done"), _marker(layout, stage, "started")
        print(f"\n[{i}/{len(stages) + 1}] {stage.title}", flush=True)
        if not redo and _read_marker(finished) == settings and _read_marker(finished, "extent") == extent:
            print("  finished earlier: reused (--fresh starts over)", flush=True)
            done.append({"stage": stage.name, "reused": True, "seconds": 0.0})
            continue
        finished.unlink(missing_ok=True)
        if redo or _read_marker(started) != settings:
            _clear(stage)  # made from other inputs or with other settings: start this stage over
        redo = True
        write_atomic(started, json.dumps({"settings": settings}).encode())
        t0 = time.perf_counter()
        stage.run()
        seconds = time.perf_counter() - t0
        write_atomic(finished, json.dumps({"settings": settings, "extent": extent, "seconds": seconds}).encode())
        print(f"  done in {seconds:.0f} s", flush=True)
        done.append({"stage": stage.name, "reused": False, "seconds": seconds})
    return done


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="BrainDINO-JAX: the demo of the three jobs.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {braindino_jax.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                          help="phantoms -> prep -> pretrain -> probes -> report.html, on a CPU")
    demo.add_argument("--out", type=Path, default=Path("braindino_demo"),
                      help="folder for everything the demo writes (default: %(default)s)")
    demo.add_argument("--steps", type=int, default=None,
                      help="stop pretraining after this many steps, with the schedules of the full run "
                      "(default: configs/debug_cpu.py's whole run; a later run without it resumes)")
    demo.add_argument("--fresh", action="store_true", help="start over instead of reusing finished stages")
    demo.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps is not None and args.steps < 1:
        print(f"{PROG} demo: error: --steps: expected >= 1, got {args.steps}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        stages = run_demo(args.out, args)
        verdicts = read_verdicts(Layout(args.out).probe, PROBE_TASKS)
    except DemoError as exc:
        print(f"{PROG} demo: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} demo: interrupted; run the same command again to resume (finished stages are kept)",
              file=sys.stderr)
        return 130
    layout = Layout(args.out)
    reused = sum(s["reused"] for s in stages)
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s ({reused} of {len(stages)} stages reused)")
    for name, path in (("phantoms", layout.out / "phantoms"), ("shards", layout.shards),
                       ("manifest", layout.shards / "manifest.jsonl"),
                       ("card", layout.shards / "dataset_card.json"), ("QC", layout.shards / "qc"),
                       ("preview", layout.preview), ("checkpoints", layout.train / "checkpoints"),
                       ("teacher", layout.train / "export"), ("curves", layout.train / "curves.png"),
                       ("probes", layout.probe), ("report", layout.report)):
        print(f"  {name + ':':<12} {path}")
    print("verdicts (pretrained minus the better random control, test set, all training labels):")
    for verdict in verdicts:
        print(f"  {verdict.line()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
