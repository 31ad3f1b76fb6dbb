"""Test-session setup: 8 host CPU devices so that sharded code is tested without accelerators."""

import os
import shutil
import tempfile

# Must happen before JAX initialises its backends. The tests' programs are small and compiled
# once each, so LLVM's optimisation of the CPU code costs more than it saves (the HLO passes,
# which decide fusion and collectives, still run in full).
_FLAGS = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _FLAGS:
    _FLAGS += " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in _FLAGS:
    _FLAGS += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _FLAGS.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache per test session, inherited by the subprocesses that the
# resume, preemption and multi-process tests start: they compile the programs this process
# already compiled, and on 2 cores that compile time dominates them.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="braindino-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "1"
else:
    _CACHE = None


def pytest_sessionfinish(session, exitstatus):
    """`pytest -m slow` (README's command for the long tests) succeeds when none are selected:
    an empty selection is not a failure of the code under test."""
    if exitstatus == 5 and "slow" in (session.config.getoption("markexpr") or ""):
        session.exitstatus = 0
    if _CACHE:
        shutil.rmtree(_CACHE, ignore_errors=True)
