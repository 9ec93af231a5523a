"""The console commands pyproject.toml declares (dpo-chat, dpo-publish) name real entry points."""

from __future__ import annotations

import importlib
import tomllib

from tests.conftest import REPO


def test_console_scripts_resolve_to_callables():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"dpo-chat", "dpo-publish"}
    for target in scripts.values():
        module, _, name = target.partition(":")
        assert callable(getattr(importlib.import_module(module), name)), target
