"""Test-session setup: 8 host CPU devices so that sharded code is tested without accelerators."""

import os

# Must happen before JAX initialises its backends.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def pytest_sessionfinish(session, exitstatus):
    """`pytest -m slow` (README's command for the long tests) succeeds when none are selected:
    an empty selection is not a failure of the code under test."""
    if exitstatus == 5 and "slow" in (session.config.getoption("markexpr") or ""):
        session.exitstatus = 0
