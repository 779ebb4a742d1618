"""The set-up contract: the README's two Quick start commands, ``.ci/run`` and the lock agree, the lock
satisfies ``pyproject.toml``, fast-moving majors are capped, and FutureWarnings fail the suite."""

from __future__ import annotations

import re
import tomllib
import warnings
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = "constraints.txt"
CAPPED = [
    "transformers",
    "fastapi",
    "pydantic",
    "schemathesis",
    "pytest",
    "numpy",
    "faiss-cpu",
    "faiss-gpu-cu12",
]


def _quick_start() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "no bash block under '## Quick start'"
    return [line.split("  #")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _locked() -> dict[str, list[tuple[str, Requirement]]]:
    """name -> [(version, requirement with its marker)] from the lock (universal: a name can fork)."""
    pins: dict[str, list[tuple[str, Requirement]]] = {}
    for line in (ROOT / LOCK).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        req = Requirement(line)
        (spec,) = list(req.specifier)
        assert spec.operator == "==", line
        pins.setdefault(canonicalize_name(req.name), []).append((spec.version, req))
    return pins


def test_quick_start_has_two_commands_from_the_lock() -> None:
    commands = _quick_start()
    assert len(commands) == 2, commands
    demo, tests = commands
    for command in commands:
        assert f"-c {LOCK}" in command, command
    assert demo.endswith("python scripts/demo.py")
    assert tests.endswith("python -m pytest -q")


def test_ci_runs_the_readme_test_command() -> None:
    test_command = _quick_start()[1]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci, f"{test_command!r} not in .ci/run"


def test_lock_pins_every_requirement_within_the_ranges() -> None:
    project = _pyproject()["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    extras = project["optional-dependencies"]
    for extra in ("cpu", "dev", "quant", "heif"):
        requirements += [Requirement(r) for r in extras[extra] if not r.startswith(project["name"])]
    pins = _locked()
    env = {**default_environment(), "extra": ""}  # this interpreter
    for req in requirements:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in {LOCK}"
        versions = [v for v, pinned in pins[name] if pinned.marker is None or pinned.marker.evaluate(env)]
        assert len(versions) == 1, (req.name, pins[name])
        assert req.specifier.contains(versions[0], prereleases=True), f"{LOCK} pins {req.name}=={versions[0]}"
    assert "torch" in pins and "schemathesis" in pins and "bitsandbytes" in pins


def test_fast_moving_majors_are_capped() -> None:
    project = _pyproject()["project"]
    every = project["dependencies"] + [
        r for group in project["optional-dependencies"].values() for r in group
    ]
    found = {canonicalize_name(Requirement(r).name): Requirement(r) for r in every}
    for name in CAPPED:
        req = found[canonicalize_name(name)]
        assert any(s.operator == "<" for s in req.specifier), f"{name} has no upper bound: {req}"


def test_faiss_builds_are_separate_extras() -> None:
    project = _pyproject()["project"]
    assert not any(r.startswith("faiss") for r in project["dependencies"])
    extras = project["optional-dependencies"]
    assert [Requirement(r).name for r in extras["cpu"]] == ["faiss-cpu"]
    assert [Requirement(r).name for r in extras["gpu"]] == ["faiss-gpu-cu12"]
    assert not any("flash-attn" in r for group in extras.values() for r in group)


def test_future_warnings_fail_the_suite() -> None:
    assert "error::FutureWarning" in _pyproject()["tool"]["pytest"]["ini_options"]["filterwarnings"]
    from transformers.utils.deprecation import deprecate_kwarg

    @deprecate_kwarg("old", "99.0.0", new_name="new")
    def forward(new: int = 0) -> int:
        return new

    with pytest.raises(FutureWarning, match="deprecated"):
        forward(old=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert forward(new=1) == 1
