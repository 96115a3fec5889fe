"""DocumentStore on MongoDB through motor: journaled writes, idempotent upserts by `_id`, unique
indexes surfaced as bus.store.DuplicateKeyError; the only place PeerNet speaks MongoDB's query
language."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import pymongo.errors
from motor.motor_asyncio import AsyncIOMotorClient, AsyncIOMotorCollection, AsyncIOMotorDatabase
from pymongo import ReplaceOne, WriteConcern

from bus.lifecycle import Lifecycle
from bus.store import MESSAGES, Document, DuplicateKeyError, page_limit
from peernet.errors import PeerNetError, unavailable

_DUPLICATE_KEY = 11000

# Failures to reach the server (ServerSelectionTimeoutError, AutoReconnect, NetworkTimeout are
# all ConnectionFailure); a write concern that could not be satisfied is the same to callers.
_WIRE_ERRORS = (pymongo.errors.ConnectionFailure, pymongo.errors.WriteConcernError,
                pymongo.errors.ExecutionTimeout, TimeoutError)


def _unavailable(what: str, exc: BaseException) -> PeerNetError:
    return unavailable(f"mongo: {what}: {type(exc).__name__}: {str(exc)[:300]}")


def _is_duplicate_id(error: Mapping[str, Any]) -> bool:
    """Whether one of a bulk write's writeErrors is a duplicate `_id` (not another unique
    index). Servers since MongoDB 4.4, SecantusDB among them, name the index in keyPattern;
    older ones only in the message."""
    if error.get("code") != _DUPLICATE_KEY:
        return False
    pattern = error.get("keyPattern")
    if pattern is not None:
        return list(pattern) == ["_id"]
    return " index: _id_ " in str(error.get("errmsg", ""))


def _is_duplicate(exc: pymongo.errors.PyMongoError) -> bool:
    if isinstance(exc, pymongo.errors.DuplicateKeyError):
        return True
    if isinstance(exc, pymongo.errors.BulkWriteError):
        return any(e.get("code") == _DUPLICATE_KEY for e in exc.details.get("writeErrors", ()))
    if isinstance(exc, pymongo.errors.OperationFailure):
        return exc.code == _DUPLICATE_KEY  # e.g. a unique index build over duplicates
    return False


class MongoDocumentStore(Lifecycle):
    """DocumentStore on MongoDB (any wire-compatible server).

    Writes use WriteConcern(j=True). A server that cannot be selected within
    `server_selection_timeout_ms` gives PeerNetError(unavailable); the client reconnects by
    itself when the server is back.
    """

    def __init__(self, url: str, db: str, *, server_selection_timeout_ms: int = 3000,
                 socket_timeout_ms: int = 10_000, app_name: str = "peernet") -> None:
        self._url = url
        self._db_name = db
        self._server_selection_timeout_ms = server_selection_timeout_ms
        self._socket_timeout_ms = socket_timeout_ms
        self._app_name = app_name
        self._client: AsyncIOMotorClient[Document] | None = None
        self._db: AsyncIOMotorDatabase[Document] | None = None

    @property
    def db_name(self) -> str:
        return self._db_name

    async def start(self) -> None:
        if self._client is not None:
            return
        self._client = AsyncIOMotorClient(
            self._url,
            serverSelectionTimeoutMS=self._server_selection_timeout_ms,
            connectTimeoutMS=self._server_selection_timeout_ms,
            socketTimeoutMS=self._socket_timeout_ms,
            appname=self._app_name,
            tz_aware=False,
        )
        self._db = self._client.get_database(self._db_name,
                                             write_concern=WriteConcern(j=True))

    async def stop(self) -> None:
        client, self._client, self._db = self._client, None, None
        if client is not None:
            client.close()

    def _coll(self, name: str) -> AsyncIOMotorCollection[Document]:
        if self._db is None:
            raise RuntimeError("MongoDocumentStore is not started")
        return self._db[name]

    async def drop_database(self) -> None:
        """Drop the whole database (tests use one database each)."""
        if self._client is None:
            raise RuntimeError("MongoDocumentStore is not started")
        try:
            await self._client.drop_database(self._db_name)
        except _WIRE_ERRORS as exc:
            raise _unavailable("drop database", exc) from exc

    async def ensure_index(self, collection: str, keys: Sequence[tuple[str, int]], *,
                           unique: bool = False) -> None:
        try:
            await self._coll(collection).create_index(list(keys), unique=unique)
        except _WIRE_ERRORS as exc:
            raise _unavailable(f"create index on {collection}", exc) from exc
        except pymongo.errors.PyMongoError as exc:
            if _is_duplicate(exc):
                raise DuplicateKeyError(f"{collection}: unique index {list(keys)} over "
                                        f"duplicates: {exc}") from exc
            # e.g. the same keys indexed with other options: a programming error
            raise ValueError(f"{collection}: cannot create index {list(keys)}: {exc}") from exc

    async def insert(self, collection: str, doc: Document) -> None:
        try:
            # A copy: the driver would add `_id` to the caller's dict.
            await self._coll(collection).insert_one(dict(doc))
        except pymongo.errors.DuplicateKeyError as exc:
            raise DuplicateKeyError(f"{collection}: {exc.details or exc}") from exc
        except _WIRE_ERRORS as exc:
            raise _unavailable(f"insert into {collection}", exc) from exc

    async def upsert_many(self, collection: str, docs: Sequence[Document]) -> None:
        """Replace-or-insert each document by `_id`, in order; a document that a unique index
        refuses raises DuplicateKeyError (the ones before it are written)."""
        if not docs:
            return
        ops = []
        for doc in docs:
            if "_id" not in doc:
                raise ValueError("upsert_many needs an _id in every document")
            ops.append(ReplaceOne({"_id": doc["_id"]}, dict(doc), upsert=True))
        try:
            await self._coll(collection).bulk_write(ops, ordered=True)
        except pymongo.errors.BulkWriteError as exc:
            if _is_duplicate(exc):
                raise DuplicateKeyError(f"{collection}: {exc.details.get('writeErrors')}") from exc
            raise
        except _WIRE_ERRORS as exc:
            raise _unavailable(f"upsert into {collection}", exc) from exc

    async def insert_new(self, collection: str, docs: Sequence[Document]) -> None:
        """Unordered insert_many whose duplicate-`_id` errors are dropped: the server writes
        every other document of the batch, and an existing document is not touched."""
        if not docs:
            return
        if any("_id" not in doc for doc in docs):
            raise ValueError("insert_new needs an _id in every document")
        try:
            # Copies: the driver would write into the caller's dicts.
            await self._coll(collection).insert_many([dict(doc) for doc in docs], ordered=False)
        except pymongo.errors.BulkWriteError as exc:
            details = exc.details
            if details.get("writeConcernErrors"):
                raise _unavailable(f"insert into {collection}", exc) from exc
            others = [e for e in details.get("writeErrors", ()) if not _is_duplicate_id(e)]
            if not others:
                return
            if all(e.get("code") == _DUPLICATE_KEY for e in others):
                raise DuplicateKeyError(f"{collection}: {others}") from exc
            # Any other refusal (a document too large, say) is a failed write like an outage to
            # callers, which retry it and count the error, rather than a driver type leaking.
            raise _unavailable(f"insert into {collection}", exc) from exc
        except _WIRE_ERRORS as exc:
            raise _unavailable(f"insert into {collection}", exc) from exc

    async def delete(self, collection: str, ids: Sequence[Any]) -> int:
        if not ids:
            return 0
        return await self._delete_many(collection, {"_id": {"$in": list(ids)}})

    async def clear(self, collection: str) -> int:
        return await self._delete_many(collection, {})

    async def documents(self, collection: str, ids: Sequence[Any] | None = None
                        ) -> list[Document]:
        query = {} if ids is None else {"_id": {"$in": list(ids)}}
        return await self._find(collection, query, sort=[("_id", 1)])

    async def history_page(self, conversation: str, *, before: int | None = None,
                           limit: int) -> list[Document]:
        # Served by the projector's index on (conv, pos descending).
        query: dict[str, Any] = {"conv": conversation}
        if before is not None:
            query["pos"] = {"$lt": before}
        return await self._find(MESSAGES, query, sort=[("pos", -1)], limit=page_limit(limit))

    async def _find(self, collection: str, query: Mapping[str, Any], *,
                    sort: Sequence[tuple[str, int]], limit: int = 0) -> list[Document]:
        try:
            cursor = self._coll(collection).find(dict(query), sort=list(sort), limit=limit)
            return list(await cursor.to_list(length=None))
        except _WIRE_ERRORS as exc:
            raise _unavailable(f"find in {collection}", exc) from exc

    async def _delete_many(self, collection: str, query: Mapping[str, Any]) -> int:
        try:
            result = await self._coll(collection).delete_many(dict(query))
        except _WIRE_ERRORS as exc:
            raise _unavailable(f"delete from {collection}", exc) from exc
        return int(result.deleted_count)

    async def ping(self) -> None:
        if self._client is None:
            raise RuntimeError("MongoDocumentStore is not started")
        try:
            # The server-selection timeout bounds this; asyncio's is a second line of defence.
            async with asyncio.timeout(self._server_selection_timeout_ms / 1000 + 2):
                await self._client.admin.command("ping")
        except _WIRE_ERRORS as exc:
            raise _unavailable("ping", exc) from exc
