"""The lock (requirements/lock.txt) agrees with pyproject.toml's ranges.

It fails when a dependency is missing from the lock or locked outside its range; a new upstream
release changes nothing here. `scripts/lock.sh` refreshes the lock.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "lock.txt"
TOOLS = ROOT / "requirements" / "tools.in"


def locked_versions(lines: Iterable[str]) -> dict[str, list[Version]]:
    """Name -> every version the lock pins for it (a universal lock may pin one per marker)."""
    pins: dict[str, list[Version]] = {}
    for raw in lines:
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        requirement = Requirement(line)
        (spec,) = requirement.specifier  # a lock line pins exactly one version
        assert spec.operator == "==", f"not an exact pin: {raw!r}"
        pins.setdefault(canonicalize_name(requirement.name), []).append(Version(spec.version))
    return pins


def disagreements(wanted: Iterable[str], pins: dict[str, list[Version]]) -> list[str]:
    problems = []
    for text in wanted:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        versions = pins.get(name)
        if not versions:
            problems.append(f"{requirement.name} is not in the lock")
            continue
        for version in versions:
            if not requirement.specifier.contains(version, prereleases=True):
                problems.append(f"{name}=={version} is outside {requirement.specifier}")
    return problems


def project_requirements() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    return [*project["dependencies"], *project["optional-dependencies"]["test"], *build]


def test_lock_covers_every_dependency_within_its_range() -> None:
    pins = locked_versions(LOCK.read_text().splitlines())
    tools = [line for line in TOOLS.read_text().splitlines() if line and line[0] != "#"]
    assert disagreements([*project_requirements(), *tools], pins) == []


def test_the_check_sees_a_missing_or_out_of_range_pin() -> None:
    pins = locked_versions(["websockets==17.4", "redis==8.2.0 ; python_version >= '3.11'"])
    assert disagreements(["websockets>=15,<18", "redis>=8.1,<9"], pins) == []
    assert disagreements(["websockets>=15,<17", "litellm>=1.60"], pins) == [
        "websockets==17.4 is outside <17,>=15",
        "litellm is not in the lock",
    ]
