"""constraints.txt pins public versions only, covers every direct dependency, and is what the venv has."""

from __future__ import annotations

import tomllib
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import REPO
from tools import lock_check


def _pins():
    return lock_check.read_pins(REPO / "constraints.txt")


def test_lock_holds_no_local_version_label():
    pins = _pins()
    assert lock_check.local_labels(pins) == []
    assert pins["torch"] == "2.13.0"  # resolves to this machine's CPU wheel here, the CUDA build elsewhere


def test_lock_pins_every_direct_dependency_and_the_hub_tokenizer_needs():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    direct = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    pins = _pins()
    missing = [d for d in direct if canonicalize_name(Requirement(d).name) not in pins]
    assert missing == []
    for name in ("sentencepiece", "protobuf", "mistral-common"):  # sentencepiece-only hub tokenizers
        assert name in pins


def test_the_venv_has_the_locked_versions():
    wrong = []
    for name, version in _pins().items():
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            wrong.append(f"{name}: not installed")
            continue
        if installed.public != Version(version).public:  # 2.13.0+cpu here is torch 2.13.0
            wrong.append(f"{name}: locked {version}, installed {installed}")
    assert wrong == []


def _item(name, version, url="https://files.pythonhosted.org/x.whl", requires=()):
    return {
        "metadata": {"name": name, "version": version, "requires_dist": list(requires)},
        "download_info": {"url": url},
    }


def test_report_check_flags_local_labels_local_files_and_drift():
    pins = {"torch": "2.13.0", "numpy": "2.4.6", "rich": "15.0.0"}
    report = {
        "install": [
            _item("torch", "2.13.0", requires=['triton==3.7.1; platform_system == "Linux"', "numpy"]),
            _item("triton", "3.7.1"),  # torch's own CUDA build brings it: allowed unpinned
            _item("numpy", "2.4.6+local", url="file:///opt/wheels/numpy.whl"),
            _item("rich", "14.0.0"),
            _item("stray", "1.0"),
        ]
    }
    problems = lock_check.check_report(report, pins)
    assert any("numpy==2.4.6+local: a local version label" in p for p in problems)
    assert any("numpy==2.4.6+local: resolved from a local path" in p for p in problems)
    assert any("rich: pinned 15.0.0, resolved 14.0.0" in p for p in problems)
    assert any("stray==1.0: resolved but not pinned" in p for p in problems)
    assert not any("triton" in p for p in problems)
    good = {"install": [_item("torch", "2.13.0", requires=["triton==3.7.1"]), _item("triton", "3.7.1")]}
    assert lock_check.check_report(good, {"torch": "2.13.0"}) == []
