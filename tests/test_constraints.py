"""constraints.txt, the tested versions: it pins every package the project asks for, each pin
lies inside pyproject.toml's range, and the README's commands and .ci/run install with it.
constraints-lowest.txt, the floors: it pins each direct dependency at pyproject's lower bound."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Extras whose packages CI installs (vision's torchvision must match the torch build: not pinned).
PINNED_EXTRAS = ("test", "docs", "dashboard")


def pins(file: str = "constraints.txt") -> dict[str, str]:
    found: dict[str, str] = {}
    for number, line in enumerate((ROOT / file).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([A-Za-z0-9.!+_-]+)", line)
        assert match, f"{file}:{number}: not 'name==version': {line!r}"
        name = canonicalize_name(match[1])
        assert name not in found, f"{file}:{number}: {name} pinned twice"
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


# --- constraints-lowest.txt: the floors ---------------------------------------------------------
# Extras that `pip install -e ".[test]"` brings in (test asks for docs), whose floors .ci/lowest
# installs.
LOWEST_EXTRAS = ("test", "docs")
# Floors that .ci/lowest cannot install: torch wheels other than the 2.13.0 CPU one are CUDA
# builds of several GB, so the check runs on torch==2.13.0 and torch's floor stays untested.
NOT_PINNED_LOWEST = {"torch"}


def floor(req: Requirement) -> str | None:
    """The lowest version ``req`` admits (its ``>=``, ``~=`` or ``==`` bound), or ``None``."""
    bounds = [spec.version for spec in req.specifier if spec.operator in (">=", "~=", "==")]
    assert len(bounds) <= 1, f"{req}: more than one lower bound"
    return bounds[0] if bounds else None


def test_constraints_lowest_pins_exactly_the_floors():
    pinned = {name: Version(version) for name, version in pins("constraints-lowest.txt").items()}
    project = PYPROJECT["project"]
    listed = list(project["dependencies"])
    for extra in LOWEST_EXTRAS:
        listed += project["optional-dependencies"][extra]
    floors = {}
    for req in map(Requirement, listed):
        name = canonicalize_name(req.name)
        if name != "landscape-sweeps" and name not in NOT_PINNED_LOWEST and floor(req) is not None:
            floors[name] = Version(floor(req))  # 1.26 == 1.26.0
    assert pinned == floors, (
        "constraints-lowest.txt must pin each direct dependency with a lower bound in pyproject.toml"
        " at that bound (and nothing else)"
    )
