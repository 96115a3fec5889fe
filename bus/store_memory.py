"""DocumentStore in memory, for unit tests, behaving like MongoDB on the wire: documents
round-trip through BSON, `_id` and unique indexes are enforced, and `set_down` makes every call
PeerNetError(unavailable). `client()` returns another client of the same server."""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import bson

from bus.lifecycle import Lifecycle
from bus.store import MESSAGES, Document, DuplicateKeyError, page_limit
from peernet.errors import unavailable

# MongoDB's sort order of BSON types (null stands for a missing field too).
_TYPE_RANK: tuple[tuple[type, int], ...] = (
    (type(None), 1), (bool, 8), (int, 2), (float, 2), (bson.Int64, 2),
    (bson.Decimal128, 2), (str, 3), (dict, 4), (list, 5), (bytes, 6), (bson.Binary, 6),
    (bson.ObjectId, 7), (datetime.datetime, 9), (bson.Timestamp, 10),
)


def _rank(v: Any) -> int:
    for t, r in _TYPE_RANK:  # bool before int: bool is an int subclass
        if type(v) is t:
            return r
    for t, r in _TYPE_RANK:
        if isinstance(v, t):
            return r
    return 11


def _canon(v: Any) -> Any:
    """A hashable, ordered stand-in for a BSON value: equal where MongoDB's comparison is
    (1 == 1.0 == Int64(1)), distinct across types (True is not 1)."""
    r = _rank(v)
    if isinstance(v, dict):
        return (r, tuple((k, _canon(x)) for k, x in v.items()))
    if isinstance(v, list):
        return (r, tuple(_canon(x) for x in v))
    if isinstance(v, bson.Decimal128):
        return (r, v.to_decimal())
    if v is None:
        return (r, 0)
    return (r, v)


def _field(doc: Document, name: str) -> Any:
    """The canonical value of a top-level field; a missing one counts as null, as in MongoDB's
    indexes and sorts."""
    return _canon(doc.get(name))


def _below(value: Any, bound: Any) -> bool:
    """MongoDB's `$lt`: only values of the bound's type bracket compare (a missing `pos` or a
    string is below no number)."""
    return _rank(value) == _rank(bound) and _canon(value) < _canon(bound)


def _as_sent(**values: Any) -> dict[str, Any]:
    """`values` as the server receives them: through BSON, which refuses what it cannot carry
    (OverflowError past 8-byte integers, TypeError) as the driver would."""
    return dict(bson.decode(bson.encode(values)))


@dataclass
class _Collection:
    docs: dict[Any, bytes] = field(default_factory=dict)  # canon(_id) -> BSON
    # key pattern -> unique
    indexes: dict[tuple[tuple[str, int], ...], bool] = field(default_factory=dict)


class _StoreServer:
    def __init__(self) -> None:
        self.collections: dict[str, _Collection] = {}
        self.down = False


class MemoryDocumentStore(Lifecycle):
    """DocumentStore in memory. Documents are stored as BSON and decoded on every read, so
    callers get copies with exactly the types MongoDB gives back; `_id` and unique indexes are
    enforced (a missing field counts as null; arrays are compared whole, not per element; index
    keys are top-level fields, a dotted one raises NotImplementedError rather than answer
    wrongly). `_id`s compare as MongoDB's do (1 and 1.0 are the same)."""

    def __init__(self, _server: _StoreServer | None = None) -> None:
        self._server = _server or _StoreServer()

    def client(self) -> MemoryDocumentStore:
        return MemoryDocumentStore(self._server)

    def set_down(self, down: bool) -> None:
        self._server.down = down

    def _coll(self, name: str) -> _Collection:
        if self._server.down:
            raise unavailable("memory document store is down")
        if not name or "$" in name:
            raise ValueError(f"invalid collection name {name!r}")
        return self._server.collections.setdefault(name, _Collection())

    @staticmethod
    def _decode(raw: bytes) -> Document:
        return dict(bson.decode(raw))

    def _check_unique(self, coll: _Collection, name: str, doc: Document, own_id: Any) -> None:
        for keys, unique in coll.indexes.items():
            if not unique:
                continue
            mine = tuple(_field(doc, k) for k, _ in keys)
            for other_id, raw in coll.docs.items():
                if other_id == own_id:
                    continue
                other = self._decode(raw)
                if tuple(_field(other, k) for k, _ in keys) == mine:
                    raise DuplicateKeyError(
                        f"{name}: E11000 duplicate key on {[k for k, _ in keys]}: {mine}")

    async def ensure_index(self, collection: str, keys: Sequence[tuple[str, int]], *,
                           unique: bool = False) -> None:
        coll = self._coll(collection)
        pattern = tuple((str(k), int(d)) for k, d in keys)
        if not pattern:
            raise ValueError("an index needs keys")
        if any("." in k for k, _ in pattern):
            raise NotImplementedError("memory store: dotted index keys are not supported")
        existing = coll.indexes.get(pattern)
        if existing is not None:
            if existing != unique:
                raise ValueError(f"{collection}: index {list(pattern)} exists with other options")
            return
        if unique:
            seen: set[Any] = set()
            for raw in coll.docs.values():
                doc = self._decode(raw)
                k = tuple(_field(doc, f) for f, _ in pattern)
                if k in seen:
                    raise DuplicateKeyError(f"{collection}: unique index {list(pattern)} over "
                                            f"duplicates: {k}")
                seen.add(k)
        coll.indexes[pattern] = unique

    def _encode(self, doc: Mapping[str, Any]) -> tuple[Any, bytes, Document]:
        if "_id" not in doc:
            doc = {"_id": bson.ObjectId(), **doc}
        else:
            doc = {"_id": doc["_id"], **{k: v for k, v in doc.items() if k != "_id"}}
        raw = bson.encode(doc)  # TypeError/InvalidDocument on what BSON cannot carry
        decoded = self._decode(raw)
        return _canon(decoded["_id"]), raw, decoded

    async def insert(self, collection: str, doc: Document) -> None:
        coll = self._coll(collection)
        key, raw, decoded = self._encode(doc)
        if key in coll.docs:
            raise DuplicateKeyError(f"{collection}: E11000 duplicate key on _id: {decoded['_id']!r}")
        self._check_unique(coll, collection, decoded, key)
        coll.docs[key] = raw

    async def upsert_many(self, collection: str, docs: Sequence[Document]) -> None:
        coll = self._coll(collection)
        for doc in docs:
            if "_id" not in doc:
                raise ValueError("upsert_many needs an _id in every document")
        for doc in docs:  # in order: a refused document stops the rest, as ordered bulk writes
            key, raw, decoded = self._encode(doc)
            self._check_unique(coll, collection, decoded, key)
            coll.docs[key] = raw

    async def insert_new(self, collection: str, docs: Sequence[Document]) -> None:
        coll = self._coll(collection)
        if any("_id" not in doc for doc in docs):
            raise ValueError("insert_new needs an _id in every document")
        refused: list[str] = []
        for doc in docs:  # unordered: a refused document does not stop the rest
            key, raw, decoded = self._encode(doc)
            if key in coll.docs:
                continue
            try:
                self._check_unique(coll, collection, decoded, key)
            except DuplicateKeyError as exc:
                refused.append(str(exc))
                continue
            coll.docs[key] = raw
        if refused:
            raise DuplicateKeyError("; ".join(refused))

    async def delete(self, collection: str, ids: Sequence[Any]) -> int:
        if not ids:
            return 0
        coll = self._coll(collection)
        doomed = {_canon(i) for i in _as_sent(ids=list(ids))["ids"]} & coll.docs.keys()
        for key in doomed:
            del coll.docs[key]
        return len(doomed)

    async def clear(self, collection: str) -> int:
        coll = self._coll(collection)
        count = len(coll.docs)
        coll.docs.clear()
        return count

    async def documents(self, collection: str, ids: Sequence[Any] | None = None
                        ) -> list[Document]:
        coll = self._coll(collection)
        if ids is None:
            keys = list(coll.docs)
        else:
            keys = list({_canon(i) for i in _as_sent(ids=list(ids))["ids"]} & coll.docs.keys())
        return [self._decode(coll.docs[k]) for k in sorted(keys)]

    async def history_page(self, conversation: str, *, before: int | None = None,
                           limit: int) -> list[Document]:
        page_limit(limit)
        sent = _as_sent(conv=conversation, before=before)
        conv, bound = _canon(sent["conv"]), sent["before"]
        page = [doc for doc in map(self._decode, self._coll(MESSAGES).docs.values())
                if _field(doc, "conv") == conv
                and (bound is None or _below(doc.get("pos"), bound))]
        page.sort(key=lambda doc: _field(doc, "pos"), reverse=True)
        return page[:limit]

    async def ping(self) -> None:
        if self._server.down:
            raise unavailable("memory document store is down")


__all__ = ["MemoryDocumentStore"]
