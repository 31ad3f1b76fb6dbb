"""SIGKILL the real `braindino-prep` process part-way, re-run it, and get a clean run's shards."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from braindino_jax.cli import prep
from braindino_jax.data import shards
from braindino_jax.preprocessing.phantom import write_phantom

N_VOLUMES = 10
PREP = "import sys; from braindino_jax.cli.prep import main; sys.exit(main(sys.argv[1:]))"


def _markers(out: Path) -> int:
    return len([p for p in (out / "_work").glob("*.json") if not p.name.startswith("_")])


def test_sigkill_mid_run_then_rerun_equals_uninterrupted_run(tmp_path, capsys):
    inputs = tmp_path / "in"
    for i in range(N_VOLUMES):
        write_phantom(inputs / f"sub-{i:02d}_T1w.nii.gz", i, spacing=(2.0, 2.0, 2.0),
                      orientation="LPS", skull_stripped=True)
    args = ["--root", f"ds={inputs}", "--workers", "1", "--shard-size", "40", "--spacing", "none",
            "--size", "64", "--no-progress"]
    assert prep.main(args + ["--out", str(tmp_path / "clean")]) == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", PREP, *args, "--out", str(killed)],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed / "_work").is_dir() or _markers(killed) < 2:
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no volume finished within 120 s"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = _markers(killed)
    assert 2 <= finished < N_VOLUMES, "the kill must land part-way through the volumes"
    assert not list(killed.glob("slices-*.array_record"))

    capsys.readouterr()
    assert prep.main(args + ["--out", str(killed)]) == 0
    assert f"{N_VOLUMES} ok ({finished} reused from an earlier run)" in capsys.readouterr().out
    clean = shards.list_shards(tmp_path / "clean", "slices")
    resumed = shards.list_shards(killed, "slices")
    assert len(clean) > 1
    assert [p.name for p in resumed] == [p.name for p in clean]
    assert [p.read_bytes() for p in resumed] == [p.read_bytes() for p in clean]
    manifest_rows = (killed / "manifest.jsonl").read_text().splitlines()
    assert len(manifest_rows) == N_VOLUMES
