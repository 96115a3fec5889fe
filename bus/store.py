"""DocumentStore: the store of record (MongoDB through motor)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

Document = dict[str, Any]


class DuplicateKeyError(Exception):
    """An insert that a unique index refused."""


class DocumentStore(Protocol):
    """The store of record, written asynchronously by log consumers.

    - `upsert_many` is idempotent: documents are keyed by `_id` (an event id, or a natural key),
      so applying the same log record twice leaves one document.
    - `insert` enforces unique indexes: it raises DuplicateKeyError.
    - Writes return once the server has journaled them (j=True).
    - Failures to reach the server raise PeerNetError(unavailable).
    """

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def ensure_index(self, collection: str, keys: Sequence[tuple[str, int]], *,
                           unique: bool = False) -> None: ...

    async def insert(self, collection: str, doc: Document) -> None: ...

    async def upsert_many(self, collection: str, docs: Sequence[Document]) -> None:
        """Replace-or-insert each document by its `_id`."""

    async def find(self, collection: str, query: Mapping[str, Any], *,
                   sort: Sequence[tuple[str, int]] = (), limit: int = 0) -> list[Document]: ...

    async def delete_many(self, collection: str, query: Mapping[str, Any]) -> int: ...

    async def ping(self) -> None: ...
