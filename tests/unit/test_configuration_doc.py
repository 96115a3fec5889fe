"""docs/configuration.md against peernet/config.py, both ways: every variable `load_config` reads
is documented with its real default, and every documented variable is read."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from peernet.config import ENV_VARS, PROJECT_ROOT, PeerNetConfig, load_config

DOC = PROJECT_ROOT / "docs" / "configuration.md"
# A row of a settings table: | `PEERNET_X` | default | meaning |
ROW = re.compile(r"^\| `(PEERNET_[A-Z0-9_]+)` \| (.*?) \| .+ \|$")


def documented() -> list[tuple[str, str]]:
    return [(m[1], m[2]) for line in DOC.read_text().splitlines() if (m := ROW.match(line))]


def written(default: object) -> str:
    """A default as the page writes it: as the variable would be set."""
    if isinstance(default, bool):
        return "`1`" if default else "`0`"
    if isinstance(default, Path):
        return f"`{str(default).replace(str(PROJECT_ROOT), '<repo>')}`"
    if default == "":
        return "(empty)"
    return f"`{default}`"


def test_every_variable_the_code_reads_is_documented_with_its_real_default() -> None:
    base = PeerNetConfig()
    rows = dict(documented())
    missing = [var for var in ENV_VARS if var not in rows]
    assert not missing, f"docs/configuration.md does not document {missing}"
    wrong = {var: (rows[var], written(getattr(getattr(base, section), name)))
             for var, (section, name) in ENV_VARS.items()
             if rows[var] != written(getattr(getattr(base, section), name))}
    assert not wrong, f"documented default != the code's, (doc, code): {wrong}"


def test_every_documented_variable_is_read_by_the_code_once() -> None:
    names = [var for var, _ in documented()]
    assert names, "no settings table found in docs/configuration.md"
    unknown = sorted(set(names) - set(ENV_VARS))
    assert not unknown, f"docs/configuration.md documents variables config.py does not read: {unknown}"
    twice = sorted({var for var in names if names.count(var) > 1})
    assert not twice, f"documented more than once: {twice}"


def test_the_written_defaults_are_the_values_load_config_parses_back() -> None:
    # What the page shows must be a value one may set: parsed, it gives the default again
    # (setting a service's variable also makes that service the user's own: not compared).
    rows = dict(documented())
    env = {var: rows[var].strip("`") for var in ENV_VARS if rows[var] != "(empty)"}
    env["PEERNET_HOME"] = str(PeerNetConfig().stack.home)
    parsed = load_config(env)
    own = replace(parsed.services, kafka_external=False, redis_external=False, mongo_external=False)
    assert replace(parsed, services=own) == load_config({})
