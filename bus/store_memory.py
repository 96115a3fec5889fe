"""DocumentStore in memory, for unit tests, behaving like MongoDB on the wire: documents
round-trip through BSON, `_id` and unique indexes are enforced, and `set_down` makes every call
PeerNetError(unavailable). `client()` returns another client of the same server."""

from __future__ import annotations

import datetime
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import bson

from bus.store import Document, DuplicateKeyError
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


_MISSING = object()


def _values_at(doc: Any, path: list[str]) -> list[Any]:
    """The values a dotted path reaches, MongoDB-style: arrays along the way are traversed."""
    if not path:
        return [doc]
    if isinstance(doc, dict):
        if path[0] not in doc:
            return [_MISSING]
        return _values_at(doc[path[0]], path[1:])
    if isinstance(doc, list):
        if path[0].isdigit():
            i = int(path[0])
            return _values_at(doc[i], path[1:]) if i < len(doc) else [_MISSING]
        out: list[Any] = []
        for item in doc:
            if isinstance(item, (dict, list)):
                out.extend(v for v in _values_at(item, path) if v is not _MISSING)
        return out or [_MISSING]
    return [_MISSING]


def _candidates(v: Any) -> list[Any]:
    # A field holding an array matches a condition on the array or on any element.
    return [v, *v] if isinstance(v, list) else [v]


def _eq(v: Any, target: Any) -> bool:
    if v is _MISSING:
        return target is None
    return any(_canon(c) == _canon(target) for c in _candidates(v))


def _cmp(v: Any, target: Any, op: Callable[[Any, Any], bool]) -> bool:
    if v is _MISSING:
        return False
    t = _canon(target)
    return any(_rank(c) == _rank(target) and op(_canon(c), t) for c in _candidates(v))


_OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "$eq": _eq,
    "$ne": lambda v, t: not _eq(v, t),
    "$gt": lambda v, t: _cmp(v, t, lambda a, b: a > b),
    "$gte": lambda v, t: _cmp(v, t, lambda a, b: a >= b),
    "$lt": lambda v, t: _cmp(v, t, lambda a, b: a < b),
    "$lte": lambda v, t: _cmp(v, t, lambda a, b: a <= b),
    "$in": lambda v, t: any(_eq(v, x) for x in t),
    "$nin": lambda v, t: not any(_eq(v, x) for x in t),
    "$exists": lambda v, t: (v is not _MISSING) == bool(t),
}


def _field_matches(values: list[Any], cond: Any) -> bool:
    if isinstance(cond, dict) and cond and all(k.startswith("$") for k in cond):
        for op, target in cond.items():
            fn = _OPERATORS.get(op)
            if fn is None:
                raise NotImplementedError(f"memory store: query operator {op} not supported")
            if op in ("$ne", "$nin"):  # true only if no reached value matches
                if not all(fn(v, target) for v in values):
                    return False
            elif not any(fn(v, target) for v in values):
                return False
        return True
    return any(_eq(v, cond) for v in values)


def _matches(doc: Document, query: Mapping[str, Any]) -> bool:
    for key, cond in query.items():
        if key == "$and":
            if not all(_matches(doc, q) for q in cond):
                return False
        elif key == "$or":
            if not any(_matches(doc, q) for q in cond):
                return False
        elif key == "$nor":
            if any(_matches(doc, q) for q in cond):
                return False
        elif key.startswith("$"):
            raise NotImplementedError(f"memory store: query operator {key} not supported")
        elif not _field_matches(_values_at(doc, key.split(".")), cond):
            return False
    return True


def _sort_key(doc: Document, path: str) -> Any:
    v = _values_at(doc, path.split("."))[0]
    return _canon(None if v is _MISSING else v)


@dataclass
class _Collection:
    docs: dict[Any, bytes] = field(default_factory=dict)  # canon(_id) -> BSON
    # key pattern -> unique
    indexes: dict[tuple[tuple[str, int], ...], bool] = field(default_factory=dict)


class _StoreServer:
    def __init__(self) -> None:
        self.collections: dict[str, _Collection] = {}
        self.down = False


class MemoryDocumentStore:
    """DocumentStore in memory. Documents are stored as BSON and decoded on every read, so
    callers get copies with exactly the types MongoDB gives back; `_id` and unique indexes are
    enforced (a missing field counts as null; arrays are compared whole, not per element).
    Queries support equality, $eq/$ne/$gt/$gte/$lt/$lte/$in/$nin/$exists, $and/$or/$nor and
    dotted paths; anything else raises NotImplementedError rather than answer wrongly."""

    def __init__(self, _server: _StoreServer | None = None) -> None:
        self._server = _server or _StoreServer()

    def client(self) -> MemoryDocumentStore:
        return MemoryDocumentStore(self._server)

    def set_down(self, down: bool) -> None:
        self._server.down = down

    async def __aenter__(self) -> MemoryDocumentStore:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

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
            mine = tuple(_sort_key(doc, k) for k, _ in keys)
            for other_id, raw in coll.docs.items():
                if other_id == own_id:
                    continue
                other = self._decode(raw)
                if tuple(_sort_key(other, k) for k, _ in keys) == mine:
                    raise DuplicateKeyError(
                        f"{name}: E11000 duplicate key on {[k for k, _ in keys]}: {mine}")

    async def ensure_index(self, collection: str, keys: Sequence[tuple[str, int]], *,
                           unique: bool = False) -> None:
        coll = self._coll(collection)
        pattern = tuple((str(k), int(d)) for k, d in keys)
        if not pattern:
            raise ValueError("an index needs keys")
        existing = coll.indexes.get(pattern)
        if existing is not None:
            if existing != unique:
                raise ValueError(f"{collection}: index {list(pattern)} exists with other options")
            return
        if unique:
            seen: set[Any] = set()
            for raw in coll.docs.values():
                doc = self._decode(raw)
                k = tuple(_sort_key(doc, f) for f, _ in pattern)
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

    async def find(self, collection: str, query: Mapping[str, Any], *,
                   sort: Sequence[tuple[str, int]] = (), limit: int = 0) -> list[Document]:
        coll = self._coll(collection)
        found = [d for d in map(self._decode, coll.docs.values()) if _matches(d, query)]
        for path, direction in reversed(list(sort)):  # stable sorts, last key first
            found.sort(key=functools.partial(_sort_key, path=path), reverse=direction < 0)
        return found[:limit] if limit > 0 else found

    async def delete_many(self, collection: str, query: Mapping[str, Any]) -> int:
        coll = self._coll(collection)
        doomed = [k for k, raw in coll.docs.items() if _matches(self._decode(raw), query)]
        for k in doomed:
            del coll.docs[k]
        return len(doomed)

    async def ping(self) -> None:
        if self._server.down:
            raise unavailable("memory document store is down")


__all__ = ["MemoryDocumentStore"]
