"""The training run: exact resume after SIGKILL, preemption, checkpoints, logs, bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from braindino_jax.data import records
from braindino_jax.models.convert import load_flax_checkpoint
from braindino_jax.train import setup as train_setup
from braindino_jax.train.checkpoint import Checkpointer, CheckpointError, load_teacher
from braindino_jax.train.config import ConfigError, build_spec, load_config
from braindino_jax.train.loop import TrainError, train
from braindino_jax.train.metrics_log import read_metrics

from .conftest import IMAGE, mesh_of

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
STEPS = 12          # configured run length (the schedules)
EVERY = 3           # checkpoint interval

CONFIG = """
import sys
sys.path.insert(0, {here!r})
from conftest import tiny_config

def get_config(arg=None):
    c = tiny_config()
    c.data.shards = ({shards!r},)
    c.train.update(dict(epochs=1.0, epoch_length={steps}, log_every=1))
    c.checkpoint.update(dict(every={every}, keep=10))
    return c
"""


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """64 disc slices in two ArrayRecord shards, written with the real record schema."""
    root = tmp_path_factory.mktemp("run_shards")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:IMAGE, :IMAGE] - IMAGE / 2
    for shard in range(2):
        writer = ArrayRecordWriter(str(root / f"slices-{shard:05d}-of-00002.array_record"),
                                   "group_size:1,zstd")
        for i in range(32):
            pixels = np.zeros((IMAGE, IMAGE), np.uint8)
            inside = yy**2 + xx**2 < (rng.uniform(0.25, 0.45) * IMAGE) ** 2
            pixels[inside] = rng.integers(30, 255, int(inside.sum()))
            fg = pixels[inside].astype(np.float64)
            writer.write(records.encode(records.SliceRecord(
                pixels=pixels, dataset="synthetic", subject=f"sub-{shard}{i}", session="",
                modality="T1w", source_path=f"synthetic/{shard}/{i}.nii.gz", slice_index=i,
                n_slices=32, spacing=(1.0, 1.0, 1.0), fg_mean=float(fg.mean()),
                fg_std=float(fg.std()))))
        writer.close()
    return str(root / "slices-*.array_record")


@pytest.fixture(scope="module")
def config_file(shards, tmp_path_factory):
    path = tmp_path_factory.mktemp("configs") / "tiny_run.py"
    path.write_text(CONFIG.format(here=str(HERE), shards=shards, steps=STEPS, every=EVERY))
    return str(path)


@pytest.fixture(scope="module")
def reference(config_file, tmp_path_factory):
    """The uninterrupted run: all 12 steps in one go, a checkpoint every 3."""
    workdir = tmp_path_factory.mktemp("reference")
    summary = train(load_config(config_file), str(workdir), progress=False)
    assert summary.final_step == STEPS
    return workdir


def _cli(config_file, workdir, *extra):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + sys.path),
               PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "braindino_jax.cli.train", "--config", config_file,
                             "--workdir", str(workdir), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _wait_for_checkpoint(workdir, step, proc, timeout=600):
    marker = Path(workdir) / "checkpoints" / str(step) / "commit_success.txt"
    deadline = time.time() + timeout
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.05)


def _rows(workdir):
    return {r["step"]: r for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))}


def _state(workdir, step, setup):
    return Checkpointer(str(workdir), every=EVERY).restore(setup.state_spec(), None, step)[1]


def test_sigkill_then_resume_is_bit_identical_and_sigterm_saves(reference, config_file, tmp_path):
    """Kill -9 after the first checkpoint; a new process resumes with the same losses, batches
    (input checksums) and parameters as the uninterrupted run, bit for bit. That process is
    then preempted (SIGTERM): it saves the step it reached and exits 0. (Both in one pair of
    processes: on 2 cores their start-up and compile cost more than the steps.)"""
    workdir = tmp_path / "killed"
    proc = _cli(config_file, workdir)
    _wait_for_checkpoint(workdir, EVERY, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed_from = Checkpointer(str(workdir), every=EVERY).latest_step()
    assert resumed_from is not None and resumed_from < STEPS - EVERY
    proc = _cli(config_file, workdir)
    _wait_for_checkpoint(workdir, resumed_from + EVERY, proc)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
    assert "resumed from" in out
    saved = Checkpointer(str(workdir), every=EVERY).latest_step()
    assert saved == STEPS or f"preempted: saved step {saved}" in out, out[-3000:]
    ref, got = _rows(reference), _rows(workdir)
    assert max(got) == saved
    for step in range(resumed_from + 1, saved + 1):
        for key in ("loss", "dino_loss", "ibot_loss", "koleo_loss", "input_checksum"):
            assert got[step][key] == ref[step][key], (step, key)
    setup = train_setup.build(build_spec(load_config(config_file)))
    both = resumed_from + EVERY  # a checkpoint step of both runs (SIGTERM may save any step)
    a, b = _state(reference, both, setup), _state(workdir, both, setup)
    for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))):
        np.testing.assert_array_equal(x, y)
    if saved < STEPS:  # the preempted run resumes at the step after the one it saved
        summary = train(load_config(config_file), str(workdir), max_steps=1, progress=False)
        assert summary.start_step == saved and summary.final_step == saved + 1
        assert _rows(workdir)[saved + 1]["loss"] == ref[saved + 1]["loss"]


def test_interrupted_or_corrupt_latest_checkpoint_falls_back(reference, config_file, tmp_path,
                                                             caplog):
    """A half-written save (Orbax temp folder) is ignored; a damaged latest one is skipped
    with a warning and the previous one restored; nothing saved is lost."""
    workdir = tmp_path / "damaged"
    shutil.copytree(reference, workdir)
    ckpts = workdir / "checkpoints"
    shutil.copytree(ckpts / "6", ckpts / "99.orbax-checkpoint-tmp-1234")  # a kill mid-save
    for f in (ckpts / "12" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 64 and "metadata" not in f.name:
            f.write_bytes(b"\0" * 8)  # damaged array data in the latest checkpoint
    setup = train_setup.build(build_spec(load_config(config_file)))
    checkpointer = Checkpointer(str(workdir), every=EVERY)
    assert checkpointer.latest_step() == STEPS
    with caplog.at_level("WARNING"):
        step, state = checkpointer.restore(setup.state_spec(), None)
    assert step == 9 and "unreadable" in caplog.text
    expected = _state(reference, 9, setup)
    for x, y in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(jax.device_get(expected))):
        np.testing.assert_array_equal(x, y)
    assert (ckpts / "12").exists()  # kept for inspection, not deleted


def test_restore_onto_one_device_and_backbone_export(reference, config_file):
    """Saved on 8 devices, restored on 1; the export loads through the converter and gives
    the checkpoint teacher's features."""
    spec = build_spec(load_config(config_file))
    one = train_setup.build(spec, mesh_of(1))
    state = _state(reference, STEPS, one)
    assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(state.student))
    eight = _state(reference, STEPS, train_setup.build(spec))
    for x, y in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(jax.device_get(eight))):
        np.testing.assert_array_equal(x, y)
    exported, heads = load_flax_checkpoint(str(Path(reference) / "export"))
    teacher, _ = load_teacher(str(reference))
    assert set(heads) == {"dino_head", "ibot_head"}
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    np.testing.assert_allclose(exported(images)["x_norm_clstoken"],
                               teacher(images)["x_norm_clstoken"], rtol=1e-6, atol=1e-6)


def test_logs(reference):
    rows = read_metrics(str(Path(reference) / "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(np.isfinite(r["loss"]) for r in rows)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(reference) / "tensorboard"))
    events.Reload()
    losses = events.Scalars("loss")
    assert [e.step for e in losses] == list(range(1, STEPS + 1))
    assert losses[-1].value == pytest.approx(rows[-1]["loss"], rel=1e-6)
    png = Path(reference) / "curves.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_nonfinite_state_is_never_written(reference, config_file, tmp_path):
    setup = train_setup.build(build_spec(load_config(config_file)))
    state = _state(reference, STEPS, setup)
    bad = state.replace(teacher=jax.tree.map(lambda x: x * np.nan, state.teacher))
    checkpointer = Checkpointer(str(tmp_path / "nan"), every=1)
    import grain

    with pytest.raises(CheckpointError, match="not finite"):
        checkpointer.save(1, bad, iter(grain.MapDataset.range(4).to_iter_dataset()),
                          load_config(config_file))
    checkpointer.wait()
    assert checkpointer.steps() == []


def test_bad_input_gets_clear_errors(reference, config_file, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(TrainError, match=r"--workdir .*a_file/run: not writable"):
        train(load_config(config_file), str(blocker / "run"))
    changed = load_config(config_file, ["--config.model.vit.embed_dim=48"])
    before = sorted(os.listdir(Path(reference) / "checkpoints"))
    with pytest.raises(TrainError, match=r"config\.model\.vit\.embed_dim: 32 in the checkpoint, 48 now"):
        train(changed, str(reference))
    assert sorted(os.listdir(Path(reference) / "checkpoints")) == before
    with pytest.raises(ConfigError, match=r"config\.data\.shards: .*matches no file"):
        train(load_config(config_file, [f"--config.data.shards=('{tmp_path}/none-*',)"]),
              str(tmp_path / "run"))


def test_eval_hook_runs_on_its_own_schedule(reference, config_file, tmp_path):
    """Every ``eval.every`` steps, even between logging steps, on the teacher backbone."""
    workdir = tmp_path / "evaluated"
    shutil.copytree(reference, workdir)
    shutil.rmtree(workdir / "checkpoints" / str(STEPS))
    calls = []

    def hook(backbone, step):
        calls.append(step)
        return {"cls_norm": float(np.linalg.norm(backbone.cls_token[...]))}

    config = load_config(config_file)
    config.train.log_every = 3
    config.eval.every = 2
    train(config, str(workdir), hooks=[hook], progress=False)
    assert calls == [10, 12]
    rows = _rows(workdir)
    assert {s for s, r in rows.items() if "eval/cls_norm" in r and s > 9} == {10, 12}
