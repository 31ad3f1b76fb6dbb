"""Import modules of Meta's ``dinov3`` package from a checkout, for the fixture scripts."""

import importlib
import sys
import types
from pathlib import Path


def import_dinov3(dinov3_root: str, *names: str) -> tuple[types.ModuleType, ...]:
    """``dinov3.<name>`` for each name, from the checkout at ``dinov3_root``. ``termcolor``
    (which only colours DINOv3's logs) is stubbed when it is not installed."""
    try:
        import termcolor  # noqa: F401
    except ImportError:
        stub = types.ModuleType("termcolor")
        stub.colored = lambda text, *args, **kwargs: text
        sys.modules["termcolor"] = stub
    sys.path.insert(0, str(Path(dinov3_root).resolve()))
    return tuple(importlib.import_module(f"dinov3.{name}") for name in names)
