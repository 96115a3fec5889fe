"""DocumentStore: the store of record (MongoDB through motor), spoken in PeerNet's terms: the
projector's writes by `_id`, documents by `_id`, a conversation's history page. No query
language crosses it: each implementation answers these calls its own way."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

Document = dict[str, Any]

# The collection of direct messages that `history_page` reads: the projector (actors/projector.py)
# writes one document per DM there, {_id, conv, from, to, body, ts, pos}, `pos` being the DM's
# offset in its partition of the messages log.
MESSAGES = "messages"


class DuplicateKeyError(Exception):
    """An insert that a unique index refused."""


class DocumentStore(Protocol):
    """The store of record, written asynchronously by log consumers, read for history.

    Writes:
    - `upsert_many` is idempotent: documents are keyed by `_id` (an event id, or a natural key),
      so applying the same log record twice leaves one document.
    - `insert_new` is idempotent for documents that never change once written: a document whose
      `_id` exists is left as it is, without error, and the new ones are written.
    - `delete` is idempotent too: an `_id` that is not there is no error.
    - `insert` enforces unique indexes: it raises DuplicateKeyError.
    - Writes return once the server has journaled them (j=True).
    Reads:
    - A read sees every write that returned before it began.
    - Documents come back as copies, with the types MongoDB gives back (datetimes naive UTC,
      to the millisecond).
    - Values BSON cannot carry (an integer past 8 bytes) are refused as BSON refuses them
      (OverflowError, TypeError), before anything is read or written.
    Failures to reach the server raise PeerNetError(unavailable).
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

    async def delete(self, collection: str, ids: Sequence[Any]) -> int:
        """Delete the documents with these `_id`s; how many there were."""

    async def clear(self, collection: str) -> int:
        """Delete every document of `collection` (its indexes stay); how many there were."""

    async def documents(self, collection: str, ids: Sequence[Any] | None = None
                        ) -> list[Document]:
        """The documents with these `_id`s (those not there are left out), or with `None` the
        whole collection (for checks and tests: unbounded), in ascending `_id` order."""

    async def history_page(self, conversation: str, *, before: int | None = None,
                           limit: int) -> list[Document]:
        """One page of `conversation`'s direct messages (MESSAGES), newest first: the `limit`
        (1 or more, else ValueError) with the highest `pos` below `before`, or the newest with
        `before` None. A page of `limit` documents may have more after it: the next page is
        `before` its last `pos`."""

    async def ping(self) -> None: ...


def page_limit(limit: int) -> int:
    """`limit` as a page size, refused unless positive: MongoDB would read 0 as no limit."""
    if limit < 1:
        raise ValueError(f"a page holds at least one document, not {limit}")
    return limit
