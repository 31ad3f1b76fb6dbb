"""The training run: resume or start, step, log, evaluate, checkpoint, survive preemption.

``train(config, workdir)`` is what ``braindino-train`` runs. It resumes automatically from the
latest readable checkpoint in ``workdir`` (refusing one whose config changes the model), keeps
the data position with the state, and on SIGTERM (cloud preemption) saves and returns cleanly.
The host looks at the step's metrics only every ``train.log_every`` steps; between those the
steps are dispatched without waiting, so the device never idles on the host.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

import jax
import ml_collections

from braindino_jax.data.pipeline import device_iterator
from braindino_jax.models.vit import VisionTransformer
from braindino_jax.train import setup as train_setup
from braindino_jax.train.checkpoint import EXPORT, Checkpointer, config_dict, export_teacher
from braindino_jax.train.config import build_spec
from braindino_jax.train.metrics_log import MetricsLog, console_line, plot_curves
from braindino_jax.train.pretrained import EXECUTION_FIELDS
from braindino_jax.train.step import nonfinite_terms

log = logging.getLogger(__name__)
EvalHook = Callable[[VisionTransformer, int], dict[str, float]]


class TrainError(RuntimeError):
    """A run that cannot start or continue; the message says why and what was kept."""


@dataclasses.dataclass
class RunSummary:
    workdir: str
    start_step: int
    final_step: int
    total_steps: int
    preempted: bool
    restore_s: float
    compile_s: float
    export_dir: str | None
    curves_png: str | None


def check_workdir(workdir: str) -> str:
    """Create ``workdir`` if needed and prove it writable, before any compile."""
    path = os.path.abspath(workdir)
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise TrainError(f"--workdir {workdir}: not writable ({exc.strerror or exc})") from exc
    return path


def _model_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The config fields that decide the parameters' shapes and meaning."""
    model = config.get("model", {})
    fields = {"model.arch": model.get("arch")}
    for name, value in model.get("vit", {}).items():
        if name not in EXECUTION_FIELDS:
            fields[f"model.vit.{name}"] = value
    for head in ("dino_head", "ibot_head"):
        for name, value in model.get(head, {}).items():
            if name != "dtype":
                fields[f"model.{head}.{name}"] = value
    fields["gram.enabled"] = config.get("gram", {}).get("enabled")
    return fields


def check_resumable(saved: dict[str, Any], config: ml_collections.ConfigDict, where: str) -> None:
    """Refuse to resume a checkpoint whose model differs from the config; name the fields."""
    old, new = _model_fields(saved), _model_fields(config_dict(config))
    changed = [f"config.{k}: {old.get(k)!r} in the checkpoint, {new.get(k)!r} now"
               for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if changed:
        raise TrainError(f"{where} was written by a run with another model; it cannot resume "
                         "with this config (use a new --workdir, or the old values):\n  "
                         + "\n  ".join(changed))


def load_hook(spec: str) -> EvalHook:
    """``package.module:function`` → the function (``config.eval.hook``)."""
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise TrainError(f"config.eval.hook: cannot import {spec!r} ({exc})") from exc


class _Preemption:
    """Turns SIGTERM into a flag the loop reads between steps (no host sync)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading_main():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        log.warning("SIGTERM: saving a checkpoint after this step, then exiting")

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _print(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def train(config: ml_collections.ConfigDict, workdir: str, *, hooks: Sequence[EvalHook] = (),
          max_steps: int | None = None, progress: bool | None = None) -> RunSummary:
    """Run (or resume) pretraining in ``workdir``; returns what happened.

    ``max_steps`` stops early (the schedules still follow the configured length), e.g. for a
    smoke run; ``progress`` shows a tqdm bar (default: when stderr is a terminal).
    """
    workdir = check_workdir(workdir)
    spec = build_spec(config)  # every config and data error, before anything compiles
    hooks = list(hooks) + ([load_hook(config.eval.hook)] if config.eval.hook else [])
    setup = train_setup.build(spec)
    c = config.checkpoint
    checkpointer = Checkpointer(workdir, every=c.every, keep=c.keep,
                                keep_every=c.keep_every or None, async_save=c.async_save)
    iterator = device_iterator(spec.pipeline, setup.mesh)
    t_restore = time.perf_counter()
    start = 0
    latest = checkpointer.latest_step()
    if latest is not None:
        check_resumable(checkpointer.saved_config(latest),
                        config, f"{checkpointer.directory}/{latest}")
        start, state = checkpointer.restore(setup.state_spec(), iterator)
        _print(f"resumed from {checkpointer.directory}/{start}")
    else:
        state = train_setup.init_state(setup)
    restore_s = time.perf_counter() - t_restore
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(config_dict(config), f, indent=2)

    t_compile = time.perf_counter()
    step_fn = setup.step.lower(setup.state_spec(), setup.batch_spec()).compile()
    compile_s = time.perf_counter() - t_compile
    _print(f"compiled the train step in {compile_s:.1f} s "
           f"({setup.mesh.shape['data']} x {setup.mesh.shape['fsdp']} data x fsdp mesh, "
           f"{spec.batch_size} images per step)")

    total = spec.total_steps
    end = total if max_steps is None else min(total, start + max_steps)
    metrics_log = MetricsLog(workdir, resume_step=start)
    show_bar = (sys.stderr.isatty() if progress is None else progress) and jax.process_index() == 0
    bar = None
    if show_bar:
        from tqdm import tqdm

        bar = tqdm(total=end, initial=start, unit="step", dynamic_ncols=True)
    every = config.train.log_every
    last_saved = start if latest is not None else None
    t_window, window_start = time.perf_counter(), start
    step = start
    with _Preemption() as preemption:
        try:
            while step < end:
                state, metrics = step_fn(state, next(iterator))
                step += 1
                if bar is not None:
                    bar.update(1)
                at_eval = bool(hooks) and config.eval.every > 0 and step % config.eval.every == 0
                if at_eval or step % every == 0 or step == end or preemption.requested:
                    host = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    elapsed = time.perf_counter() - t_window
                    rate = (step - window_start) * spec.batch_size / max(elapsed, 1e-9)
                    eta = (end - step) * spec.batch_size / max(rate, 1e-9)
                    host["images_per_s"] = rate
                    if int(host["halted_at"]) >= 0:
                        terms = ", ".join(nonfinite_terms(int(host["nonfinite"])))
                        kept = f"step {last_saved}" if last_saved is not None else "none"
                        raise TrainError(
                            f"training stopped at step {int(host['halted_at'])}: {terms} not finite "
                            f"for {spec.max_consecutive_skips} steps in a row (updates skipped, "
                            f"state unchanged). Last checkpoint: {kept}. See the README's "
                            "troubleshooting section on NaNs.")
                    if at_eval:
                        host.update(_evaluate(hooks, setup, state, step))
                    metrics_log.write(step, host)
                    line = console_line(step, total, host, rate, eta)
                    if bar is not None:
                        bar.write(line)
                    else:
                        _print(line)
                    t_window, window_start = time.perf_counter(), step
                if step % checkpointer.every == 0 or preemption.requested:
                    checkpointer.save(step, state, iterator, config)
                    last_saved = step
                if preemption.requested:
                    break
            if last_saved != step:
                checkpointer.save(step, state, iterator, config)
            checkpointer.wait()
        finally:
            if bar is not None:
                bar.close()
            metrics_log.close()
    export_dir = None
    curves = None
    if not preemption.requested:
        export_dir = export_teacher(state, setup.networks, os.path.join(workdir, EXPORT))
        if jax.process_index() == 0:
            curves = plot_curves(metrics_log.path, os.path.join(workdir, "curves.png"))
    checkpointer.close()
    iterator.close()
    return RunSummary(workdir, start, step, total, preemption.requested, restore_s, compile_s,
                      export_dir, curves)


def _evaluate(hooks: Sequence[EvalHook], setup: Any, state: Any, step: int) -> dict[str, float]:
    backbone = setup.networks.teacher(jax.device_get(state.teacher)).backbone
    out = {}
    for hook in hooks:
        for key, value in hook(backbone, step).items():
            out[f"eval/{key}"] = float(value)
    return out
