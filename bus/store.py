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
    - `insert_new` is idempotent for documents that never change once written: a document whose
      `_id` exists is left as it is, without error, and the new ones are written.
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

    async def insert_new(self, collection: str, docs: Sequence[Document]) -> None:
        """Insert each document whose `_id` is not in the collection yet; leave the others as
        they are. Unordered: every new document is written whatever happens to the others.
        Which of two documents with the same `_id` in one call is kept is not defined. Cheaper
        for the server than `upsert_many` (SecantusDB: about 50 us a document in a batch of 50
        against 200 us an upsert), hence for documents that never change once written. A
        document that a unique index other than `_id`'s refuses raises DuplicateKeyError once the
        others are written. Every document needs an `_id` (ValueError)."""

    async def find(self, collection: str, query: Mapping[str, Any], *,
                   sort: Sequence[tuple[str, int]] = (), limit: int = 0) -> list[Document]: ...

    async def delete_many(self, collection: str, query: Mapping[str, Any]) -> int: ...

    async def ping(self) -> None: ...
