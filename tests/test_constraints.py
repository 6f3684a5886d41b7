"""constraints.txt, the tested versions: it pins every package the project asks for, each pin
lies inside pyproject.toml's range, and the README's commands and .ci/run install with it."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Extras whose packages CI installs (vision's torchvision must match the torch build: not pinned).
PINNED_EXTRAS = ("test", "docs", "dashboard")


def pins() -> dict[str, str]:
    found: dict[str, str] = {}
    for number, line in enumerate((ROOT / "constraints.txt").read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([A-Za-z0-9.!+_-]+)", line)
        assert match, f"constraints.txt:{number}: not 'name==version': {line!r}"
        name = canonicalize_name(match[1])
        assert name not in found, f"constraints.txt:{number}: {name} pinned twice"
        found[name] = match[2]
    return found


def requirements() -> list[Requirement]:
    project = PYPROJECT["project"]
    listed = list(project["dependencies"])
    for extra in PINNED_EXTRAS:
        listed += project["optional-dependencies"][extra]
    return [r for r in map(Requirement, listed) if canonicalize_name(r.name) != "landscape-sweeps"]


def test_every_requirement_is_pinned_inside_its_range():
    pinned = pins()
    for req in requirements():
        name = canonicalize_name(req.name)
        assert name in pinned, f"{req.name} ({req}) has no tested version in constraints.txt"
        assert req.specifier.contains(pinned[name], prereleases=True), (
            f"constraints.txt pins {name}=={pinned[name]}, outside pyproject's {req}"
        )


def test_torch_pin_has_no_local_build_label():
    # torch==2.13.0 admits the +cpu and the +cu128 builds; torch==2.13.0+cpu would refuse a GPU one.
    assert "+" not in pins()["torch"]


def test_install_commands_use_the_constraints():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = [line for line in readme.splitlines() if line.startswith("python -m pip install")]
    assert len(commands) == 2, commands
    for command in commands:
        assert "-c constraints.txt" in command, command
    assert commands[1] in ci.splitlines(), ".ci/run must run the README's test command"
