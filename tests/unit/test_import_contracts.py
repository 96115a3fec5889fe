"""docs/architecture.md's "Who may import whom" table against the import contracts (.importlinter):
for every module of every row, the contracts themselves are asked which of our modules (and Ray) it
may import, and the answer must be what the row says, so the table and the contracts cannot drift.

`lint-imports` (run by `./dev test`) checks the code against the contracts; this checks the prose.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grimp
import pytest
from importlinter import api
from importlinter.contracts.forbidden import ForbiddenContract
from importlinter.contracts.layers import LayersContract
from importlinter.contracts.protected import ProtectedContract
from importlinter.domain.contract import Contract

ROOT = Path(__file__).resolve().parents[2]
CONTRACT_TYPES: dict[str, type[Contract]] = {
    "forbidden": ForbiddenContract, "layers": LayersContract, "protected": ProtectedContract,
}
# The one external package the table speaks of; the contracts name others (backend clients).
RAY = "ray"
OTHER_MODULES = re.compile(r"^the other modules of `([\w.]+)`$")


@dataclass(frozen=True)
class Row:
    room: str
    modules: frozenset[str]
    may_import: str  # the cell as written


def configuration() -> dict[str, Any]:
    return api.read_configuration(str(ROOT / ".importlinter"))


def our_modules(packages: list[str]) -> list[str]:
    """Every module of our packages, from the files (a package is its __init__)."""
    found = []
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return found


def table_rows(modules: list[str]) -> list[Row]:
    """The rows of the table, each with the modules it covers ("the other modules of `X`": X's
    modules that no other row names)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## Who may import whom", 1)[1].split("\n## ", 1)[0]
    cells = [[c.strip() for c in line.strip().strip("|").split("|")]
             for line in section.splitlines() if line.startswith("| ")]
    header, body = cells[0], cells[1:]
    assert header == ["room", "modules", "what", "may import"], header
    named: set[str] = set()
    raw: list[tuple[str, str, str]] = []
    for room, mods, _what, may in body:
        raw.append((room, mods, may))
        if not OTHER_MODULES.match(mods):
            named |= {m for name in re.findall(r"`([\w.]+)`", mods) for m in within(name, modules)}
    rows = []
    for room, mods, may in raw:
        rest = OTHER_MODULES.match(mods)
        covered = ({m for m in within(rest[1], modules) if m not in named} if rest else
                   {m for name in re.findall(r"`([\w.]+)`", mods) for m in within(name, modules)})
        rows.append(Row(room, frozenset(covered), may))
    return rows


def within(name: str, modules: list[str]) -> set[str]:
    """`name` and, if it is a package, every module in it."""
    found = {m for m in modules if m == name or m.startswith(name + ".")}
    assert found, f"the table names {name!r}, which is none of our modules"
    return found


def parents(module: str) -> set[str]:
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def allowed_by_table(row: Row, rows: list[Row], modules: list[str]) -> tuple[set[str], set[str]]:
    """What the row says its modules may import (what it names, a package whole; the rooms it
    names; its own room), and what it leaves open: the parent packages of a module it names
    (`import peernet.codec` runs peernet/__init__.py anyway, whatever the contracts say of it)."""
    rooms = {r.room for r in rows}
    out: set[str] = set()
    open_: set[str] = set()
    for item in (i.strip() for i in row.may_import.split(",")):
        if item == "nothing":
            continue
        if item in rooms:
            out |= {m for r in rows if r.room == item for m in r.modules}
        elif item == f"`{RAY}`":
            out.add(RAY)
        else:
            name = re.fullmatch(r"`([\w.]+)`", item)
            assert name, f"row {row.room}: cannot read {item!r} in the may-import column"
            out |= within(name[1], modules)
            open_ |= parents(name[1])
    out |= {m for r in rows if r.room == row.room for m in r.modules}
    return out, open_ - out


def links(found: object) -> Iterator[tuple[str, str]]:
    """Every (importer, imported) a contract check's report names, however it nests them."""
    if isinstance(found, dict):
        if "importer" in found and "imported" in found:
            yield str(found["importer"]), str(found["imported"])
        for value in found.values():
            yield from links(value)
    elif isinstance(found, list | tuple | set | frozenset):
        for value in found:
            yield from links(value)
    elif hasattr(found, "__dict__") and not isinstance(found, type):
        yield from links(vars(found))


class Contracts:
    """The contracts of .importlinter, asked about imports of our choosing on a graph of our
    modules with no imports of its own."""

    def __init__(self, modules: list[str]) -> None:
        config = configuration()
        session = config["session_options"]
        self.contracts: list[Contract] = []
        external: set[str] = set()
        for options in config["contracts_options"]:
            # The ignored imports are the real code's; this graph has none of them to ignore.
            options = {**options, "unmatched_ignore_imports_alerting": "none"}
            self.contracts.append(CONTRACT_TYPES[options["type"]](
                name=options["name"], session_options=session, contract_options=options))
            for key in ("source_modules", "forbidden_modules", "protected_modules", "allowed_importers"):
                external |= {m for m in options.get(key, [])
                             if m.split(".")[0] not in session["root_packages"]}
        self.graph = grimp.ImportGraph()
        for module in modules:
            self.graph.add_module(module)
        for name in external | {RAY}:
            self.graph.add_module(name, is_squashed=True)

    def may_import(self, importer: str, candidates: list[str]) -> set[str]:
        """Which of `candidates` the contracts let `importer` import: one graph with an import
        of each, whose breaches all start at `importer` (nothing else imports anything)."""
        graph = copy.deepcopy(self.graph)
        for imported in candidates:
            graph.add_import(importer=importer, imported=imported)
        refused: set[str] = set()
        for contract in self.contracts:
            check = contract.check(copy.deepcopy(graph), verbose=False)
            if not check.kept:
                named = {imported for who, imported in links(check.metadata) if who == importer}
                assert named, f"{contract.name}: broken, but its report names no import"
                refused |= named
        return set(candidates) - refused


@pytest.fixture(scope="module")
def modules() -> list[str]:
    return our_modules(configuration()["session_options"]["root_packages"])


def test_every_module_is_in_exactly_one_row(modules: list[str]) -> None:
    rows = table_rows(modules)
    for module in modules:
        holders = [r.room for r in rows if module in r.modules]
        assert len(holders) == 1, f"{module} is in {holders or 'no'} row(s) of the table"


def test_each_row_may_import_what_the_contracts_allow(modules: list[str]) -> None:
    rows = table_rows(modules)
    contracts = Contracts(modules)
    for row in rows:
        said, open_ = allowed_by_table(row, rows, modules)
        for module in sorted(row.modules):
            candidates = [m for m in [*modules, RAY] if m != module and m not in open_]
            allowed = contracts.may_import(module, candidates)
            assert allowed == said - {module}, (
                f"{module} ({row.room}): the contracts allow {sorted(allowed - said) or 'nothing'} "
                f"that the table does not, and refuse {sorted(said - allowed - {module}) or 'nothing'} "
                "that it allows")


def test_the_contracts_catch_a_bad_import(modules: list[str]) -> None:
    """The check above means something only if the contracts refuse imports at all: the core
    importing the app, and the app importing Ray, are refused."""
    contracts = Contracts(modules)
    assert contracts.may_import("peernet.codec", ["serve.app", "peernet.errors"]) == {"peernet.errors"}
    assert contracts.may_import("serve.hub", [RAY, "bus.pubsub"]) == {"bus.pubsub"}
