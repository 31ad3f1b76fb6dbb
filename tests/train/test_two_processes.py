"""Two JAX processes on localhost (4 CPU devices each, gloo collectives) train like one
process with 8 devices on the same global batch."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from braindino_jax.train import setup as train_setup

from .conftest import built, put, synthetic_batch

HERE = Path(__file__).resolve().parent
STEPS = 3

WORKER = textwrap.dedent("""
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    port, pid, here, steps = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                               process_id=pid, initialization_timeout=120)
    sys.path.insert(0, here)
    import numpy as np
    from conftest import synthetic_batch, tiny_spec
    from braindino_jax.train import setup as train_setup
    from braindino_jax.train.sharding import make_mesh
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    spec = tiny_spec()
    setup = train_setup.build(spec, make_mesh(8, 1))
    state = train_setup.init_state(setup)
    losses = []
    for i in range(steps):
        full = synthetic_batch(spec, i)
        # Every process supplies the rows of the global batch its own devices hold.
        batch = {k: jax.make_array_from_callback(v.shape, setup.batch_sharding,
                                                 lambda idx, v=v: v[idx])
                 for k, v in full.items()}
        state, metrics = setup.step(state, batch)
        losses.append(float(metrics["loss"]))
    if pid == 0:
        print("LOSSES", json.dumps(losses), flush=True)
    jax.distributed.shutdown()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_with_eight_devices(tmp_path):
    setup = built(8)  # the same spec and mesh shape as the workers', compiled once per session
    spec = setup.spec
    state = train_setup.init_state(setup)
    expected = []
    for i in range(STEPS):
        state, metrics = setup.step(state, put(setup, synthetic_batch(spec, i)))
        expected.append(float(metrics["loss"]))

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = str(_free_port())
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parents[1])] + sys.path)
    procs = [subprocess.Popen([sys.executable, str(script), port, str(pid), str(HERE), str(STEPS)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for pid in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    line = next(l for l in outputs[0].splitlines() if l.startswith("LOSSES"))
    losses = json.loads(line.split(" ", 1)[1])
    assert losses == pytest.approx(expected, rel=1e-5)
