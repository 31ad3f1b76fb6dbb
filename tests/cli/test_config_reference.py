"""docs/config_reference.md is tools/config_reference.py's output for the current code and configs."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _tool():
    spec = importlib.util.spec_from_file_location("config_reference", REPO / "tools" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_reference_matches_the_generator():
    tool = _tool()
    text = tool.render()
    assert (REPO / "docs" / "config_reference.md").read_text() == text, \
        "docs/config_reference.md is stale: run python tools/config_reference.py"


def test_reference_lists_every_default_field_and_each_config_file():
    from braindino_jax.probes.config import default_config as probe_defaults
    from braindino_jax.train.config import default_config as train_defaults

    tool = _tool()
    text = tool.render()
    for defaults in (train_defaults(), probe_defaults()):
        for name, value in tool.flatten(defaults).items():
            assert f"| `{name}` | `{repr(value)}` |" in text.replace("\\|", "|"), name
    for path in [*(REPO / "configs").glob("*.py"), *(REPO / "configs" / "probes").glob("*.py")]:
        assert f"### `{path.relative_to(REPO).as_posix()}`" in text
    # A config file's changes are listed with their values (debug_cpu: the tiny ViT).
    debug = text.split("### `configs/debug_cpu.py`")[1].split("###")[0]
    assert "| `model.vit.embed_dim` | `192` |" in debug and "| `train.batch_size` | `16` |" in debug
