"""requirements.lock against pyproject.toml: `./dev` installs only what the lock pins, so a dependency
added to pyproject.toml (or a bound raised) without `./dev lock` must fail here, not on a fresh machine."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def locked() -> dict[str, Version]:
    """Each pinned name (canonical) and its version; asserts every pin carries a hash, as
    `pip install --require-hashes` will."""
    pins: dict[str, Version] = {}
    lines = (ROOT / "requirements.lock").read_text().splitlines()
    for i, line in enumerate(lines):
        match = PIN.match(line)
        if match:
            name = canonicalize_name(match[1])
            assert name not in pins, f"{name} is pinned twice in requirements.lock"
            pins[name] = Version(match[2])
            assert i + 1 < len(lines) and "--hash=sha256:" in lines[i + 1], f"{name} has no hash in the lock"
    return pins


def declared() -> list[str]:
    """What ./dev installs: the dependencies, the dev extra and the build backend (the editable
    install runs without build isolation, on the lock's setuptools)."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = pyproject["project"]
    return [*project["dependencies"], *project["optional-dependencies"]["dev"],
            *pyproject["build-system"]["requires"]]


def test_lock_parses_to_many_pins() -> None:
    # A broken pattern above would make the test below pass on an empty dict.
    pins = locked()
    assert len(pins) > 50 and pins[canonicalize_name("ray")] == Version("2.60.0")


@pytest.mark.parametrize("spec", declared())
def test_every_declared_dependency_is_pinned_within_its_bounds(spec: str) -> None:
    req = Requirement(spec)
    pins = locked()
    name = canonicalize_name(req.name)
    assert name in pins, f"{req.name} is in pyproject.toml but not in requirements.lock: run ./dev lock"
    assert req.specifier.contains(pins[name], prereleases=True), (
        f"requirements.lock pins {req.name}=={pins[name]}, outside pyproject.toml's {req.specifier}: "
        "run ./dev lock")


def test_lock_names_the_command_that_refreshes_it() -> None:
    head = (ROOT / "requirements.lock").read_text().splitlines()[:3]
    assert any(line.strip("# ") == "./dev lock" for line in head), head
