"""The docs say what the code does, and their cross-references lead somewhere: every setting is
in docs/configuration.md (tests/unit/test_configuration_doc.py checks it against the code), the
README points there, and every relative link and every section cited by name exists."""

from __future__ import annotations

import re
from pathlib import Path

from peernet.config import ENV_VARS, PROJECT_ROOT

DOCS = [PROJECT_ROOT / "README.md", *sorted((PROJECT_ROOT / "docs").glob("*.md"))]
# [text](target) with a relative target: a file, a file#anchor, or #anchor
LINK = re.compile(r"\]\((?!https?://|mailto:)([^)\s]*)\)")
# docs/x.md, "Section" (or docs/x.md "Section"): a section cited by its title
CITED = re.compile(r"(docs/[a-z-]+\.md),? \"([^\"]+)\"")
HEADING = re.compile(r"^#{1,6} (.+?)\s*$", re.M)


def anchor(title: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def headings(doc: Path) -> list[str]:
    return HEADING.findall(doc.read_text())


def test_the_readme_points_to_the_settings_and_the_settings_page_names_every_one() -> None:
    readme = (PROJECT_ROOT / "README.md").read_text()
    assert "(docs/configuration.md)" in readme
    page = (PROJECT_ROOT / "docs" / "configuration.md").read_text()
    missing = [var for var in ENV_VARS if f"`{var}`" not in page]
    assert not missing, f"docs/configuration.md does not document {missing}"


def test_every_relative_link_in_the_docs_leads_to_a_file_and_heading_that_exist() -> None:
    broken = []
    for doc in DOCS:
        for target in LINK.findall(doc.read_text()):
            path, _, frag = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            if not dest.exists():
                broken.append(f"{doc.name}: {target}")
            elif frag and dest.suffix == ".md" and frag not in {anchor(h) for h in headings(dest)}:
                broken.append(f"{doc.name}: {target} (no such heading)")
    assert not broken, broken


def test_every_section_cited_by_name_in_the_docs_exists() -> None:
    # "docs/benchmarks.md, \"Kafka fetches\"" must name the start of a heading of that file.
    missing = []
    for doc in DOCS:
        for path, cited in CITED.findall(doc.read_text()):
            title = " ".join(cited.split())  # a title may wrap across lines
            target = PROJECT_ROOT / path
            if not target.exists() or not any(h.startswith(title) for h in headings(target)):
                missing.append(f"{doc.name}: {path}, \"{title}\"")
    assert not missing, missing
