"""The docs say what the code does: every setting is documented in the README."""

from __future__ import annotations

from peernet.config import ENV_VARS, PROJECT_ROOT


def test_the_readme_documents_every_peernet_setting() -> None:
    readme = (PROJECT_ROOT / "README.md").read_text()
    missing = [var for var in ENV_VARS if f"`{var}`" not in readme]
    assert not missing, f"README.md does not document {missing}"
