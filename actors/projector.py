"""Projections: the store of record (MongoDB) written from the event log by a consumer group:
users, follows, posts, likes, notes, messages, groups, group memberships and read markers.

Documents that never change once written (users, posts, notes, messages) are inserted, keyed by
event id or user id, and one whose `_id` exists is left as it is; follows and likes, which an
unfollow or unlike deletes, are upserts and deletions by natural key. Either way a replayed record
changes nothing; offsets are committed only after the write. When MongoDB is slow or down, the
projector waits and retries while delivery, which does not depend on it, goes on; it catches up
from the log afterwards.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from actors.consuming import ConsumerLoop, until_ok
from bus.eventlog import ConsumerLag, EventLog, Record
from bus.store import Document, DocumentStore
from peernet.config import PeerNetConfig
from peernet.envelope import EnvelopeError, Event

log = logging.getLogger("peernet.projector")

PROJECTIONS_GROUP = "peernet.projections"

# The collections of the store of record, each written only here (and by `peernet replay`).
PROJECTIONS = ("users", "follows", "posts", "likes", "notes", "messages", "groups",
               "memberships", "reads")

# Read markers only move forward: a `reads` document is written only over one further back.
FORWARD_ONLY = "reads"

# Those whose documents are made from one event alone and never change or go: written with
# DocumentStore.insert_new, which costs SecantusDB a fraction of an upsert. A document that may
# change (a follow's ts on a re-follow) or go (unfollow, unlike) must not be listed here.
INSERTED = frozenset({"users", "posts", "notes", "messages"})

# User ids the projector remembers having written, the most recently seen ones. Bounded because
# the projector lives as long as the server and its users are not; forgetting one costs an insert
# whose duplicate the server drops, remembering 50,000 a few MB.
REMEMBERED_USERS = 50_000

# An index for each query made of them: history pages of a conversation; a user's followers
# and followees; an author's posts; a post's likes and a user's likes; a user's notes; a user's
# groups and a group's members; a conversation's markers.
PROJECTION_INDEXES: tuple[tuple[str, list[tuple[str, int]]], ...] = (
    ("messages", [("conv", 1), ("pos", -1)]),
    ("follows", [("follower", 1), ("ts", -1)]),
    ("follows", [("followee", 1), ("ts", -1)]),
    ("posts", [("author", 1), ("ts", -1)]),
    ("likes", [("post", 1), ("ts", -1)]),
    ("likes", [("user", 1), ("ts", -1)]),
    ("notes", [("user", 1), ("ts", -1)]),
    ("memberships", [("user", 1), ("ts", -1)]),
    ("memberships", [("conv", 1), ("ts", -1)]),
    ("reads", [("conv", 1), ("pos", -1)]),
)


def project(event: Event, offset: int, writes: dict[str, dict[str, Document | None]]) -> None:
    """What one event does to the projections: documents keyed by event id or by a natural key
    (follower:followee, post:user), so that applying an event twice changes nothing.

    Within a batch the last event for a follow or like wins (the log's order); for the INSERTED
    collections the first does, as insert_new keeps the first across batches: a record the log
    holds twice (a producer's retry, at another offset) keeps its first `pos` however the records
    were batched."""
    d, actor = event.data, event.actor
    users = writes["users"]
    users.setdefault(actor, {"_id": actor})
    if event.type == "dm":
        users.setdefault(d["to"], {"_id": d["to"]})
        # `pos`, the record's offset in the conversation's partition, is the one order every
        # participant saw; history pages by it.
        writes["messages"].setdefault(event.id, {
            "_id": event.id, "conv": d["conv"], "from": actor, "to": d["to"], "body": d["body"],
            "ts": event.ts, "pos": offset})
    elif event.type == "group_msg":
        writes["messages"].setdefault(event.id, {
            "_id": event.id, "conv": d["conv"], "from": actor, "body": d["body"],
            "ts": event.ts, "pos": offset})
    elif event.type == "group":
        _project_group(event, writes)
    elif event.type == "read":
        # A user's marker in a conversation, {_id: conv:user}: the furthest of the batch.
        key = f"{d['conv']}:{actor}"
        pos = int(d["pos"])
        known = writes["reads"].get(key)
        if known is None or known["pos"] < pos:
            writes["reads"][key] = {"_id": key, "conv": str(d["conv"]), "user": actor,
                                    "id": str(d["id"]), "pos": pos, "ts": event.ts}
    elif event.type in ("follow", "unfollow"):
        target = str(d["user"])
        users.setdefault(target, {"_id": target})
        key = f"{actor}:{target}"
        if event.type == "follow":
            writes["follows"][key] = {"_id": key, "follower": actor, "followee": target,
                                      "ts": event.ts}
            writes["notes"].setdefault(event.id, {"_id": event.id, "user": target,
                                                  "kind": "follow", "from": actor,
                                                  "ts": event.ts})
        else:
            writes["follows"][key] = None
    elif event.type == "post":
        writes["posts"].setdefault(event.id, {"_id": event.id, "author": actor,
                                              "body": str(d["body"]), "ts": event.ts})
    elif event.type in ("like", "unlike"):
        post = str(d["post"])
        key = f"{post}:{actor}"
        if event.type == "like":
            writes["likes"][key] = {"_id": key, "post": post, "user": actor, "ts": event.ts}
            author = d.get("author")
            if isinstance(author, str) and author != actor:
                writes["notes"].setdefault(event.id, {"_id": event.id, "user": author,
                                                      "kind": "like", "from": actor,
                                                      "ts": event.ts, "post": post})
        else:
            writes["likes"][key] = None


def _project_group(event: Event, writes: dict[str, dict[str, Document | None]]) -> None:
    """A membership change: the group's state after it (an upsert, the last change wins: a
    group's changes share a partition, in version order), a membership per user who joined
    (upserted) or left (deleted)."""
    d = event.data
    conv = str(d["conv"])
    writes["groups"][conv] = {"_id": conv, "title": str(d["title"]), "owner": d["owner"],
                              "members": [str(u) for u in d["members"]],
                              "version": int(d["version"]), "ts": event.ts}
    for user in d["added"]:
        writes["users"].setdefault(str(user), {"_id": str(user)})
        key = f"{conv}:{user}"
        writes["memberships"][key] = {"_id": key, "conv": conv, "user": str(user),
                                      "ts": event.ts}
    for user in d["removed"]:
        writes["memberships"][f"{conv}:{user}"] = None


class WrittenUsers:
    """The user ids known to be in the users collection, at most `capacity` of them: those most
    recently seen are kept, the others forgotten (and written again, harmlessly, if they come
    back)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError("capacity must not be negative")
        self._capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._ids)

    def seen(self, user: str) -> bool:
        """Whether `user` is known to be written; a known one becomes the most recent."""
        if user not in self._ids:
            return False
        self._ids.move_to_end(user)
        return True

    def add(self, users: Iterable[str]) -> None:
        for user in users:
            self._ids[user] = None
            self._ids.move_to_end(user)
        while len(self._ids) > self._capacity:
            self._ids.popitem(last=False)


@dataclass
class ProjectorStats:
    records: int = 0
    written: int = 0
    batches: int = 0
    errors: int = 0
    last_error: str = ""
    started: bool = False


class Projector:
    """Reads the events topic and keeps the MongoDB collections of the store of record."""

    def __init__(self, cfg: PeerNetConfig, log_: EventLog, store: DocumentStore, *,
                 remembered_users: int = REMEMBERED_USERS) -> None:
        self._cfg = cfg
        self._log = log_
        self._store = store
        self._loop: ConsumerLoop | None = None
        self._stopping = False
        # Every event names one or two users, nearly always known ones: they are written once
        # per projector's life instead of once per event (three documents a DM otherwise).
        self._users = WrittenUsers(remembered_users)
        self.stats = ProjectorStats()

    async def start(self) -> None:
        await until_ok("indexes", self.ensure_indexes, on_error=self._count_error,
                       stopping=lambda: self._stopping)
        # The broker gathers up to a linger's records into one fetch instead of a fetch per
        # event; the loop then gathers for up to another linger (which the in-memory log needs),
        # so the store of record trails delivery by up to two lingers. Both logs: the social
        # events and the conversations' messages.
        linger = self._cfg.shards.projector_linger_ms
        self._loop = ConsumerLoop(
            self._log, list(dict.fromkeys([self._cfg.topics.events, self._cfg.topics.messages])),
            PROJECTIONS_GROUP, self.apply, name="projector", on_error=self._count_error,
            max_records=self._cfg.shards.max_batch, linger_ms=linger, gather_ms=linger, step="write")
        await self._loop.start()
        self.stats.started = True

    async def lag(self) -> list[ConsumerLag]:
        """How far this projector's consumers trail the logs (empty before `start`)."""
        return await self._loop.lag() if self._loop is not None else []

    def queue_depth(self) -> int:
        """Records fetched and not yet handled: those the loop holds, from their poll (the
        linger gathers more) until the batch's writes to the store are done. A batch is written
        as one and retried whole while the store is away, so every record of it counts until
        then."""
        return self._loop.queue_depth() if self._loop is not None else 0

    async def stop(self) -> None:
        self._stopping = True
        if self._loop is not None:
            await self._loop.stop()

    async def ensure_indexes(self) -> None:
        for collection, keys in PROJECTION_INDEXES:
            await self._store.ensure_index(collection, keys)

    async def apply(self, records: Sequence[Record]) -> None:
        # _id -> document, or None for a deletion, per collection: within a batch the last
        # event for a follow or like wins, which is the log's order (a pair's events share a
        # partition), so a follow then an unfollow in one batch ends deleted (see `project`).
        writes: dict[str, dict[str, Document | None]] = {c: {} for c in PROJECTIONS}
        self.stats.batches += 1
        for record in records:
            self.stats.records += 1
            try:
                event = Event.decode(record.value)
            except EnvelopeError as exc:
                self._count_error("decode", exc)
                continue
            try:
                project(event, record.offset, writes)
            except (KeyError, TypeError, ValueError) as exc:
                self._count_error(f"malformed {event.type} event {event.id}", exc)
        # Users already written are left out; the rest are inserted like any other document.
        writes["users"] = {u: d for u, d in writes["users"].items() if not self._users.seen(u)}
        if writes[FORWARD_ONLY]:
            writes[FORWARD_ONLY] = await self._forward(writes[FORWARD_ONLY])
        for collection, docs in writes.items():
            if collection in INSERTED:
                inserts = [d for d in docs.values() if d is not None]
                if inserts:
                    await self._store.insert_new(collection, inserts)
                if collection == "users":
                    # Only once written: a batch retried after a failure writes them again.
                    self._users.add(docs)
                self.stats.written += len(inserts)
                continue
            upserts = [d for d in docs.values() if d is not None]
            deletes = [i for i, d in docs.items() if d is None]
            if upserts:
                await self._store.upsert_many(collection, upserts)
            if deletes:
                await self._store.delete(collection, deletes)
            self.stats.written += len(upserts) + len(deletes)

    async def _forward(self, markers: dict[str, Document | None]) -> dict[str, Document | None]:
        """The markers that move forward: two reads of one user may reach the log in either
        order (two devices), and a replay writes old ones beside the live projector. One read
        of the batch's markers; the projector is the only live writer of the collection."""
        stored = {d["_id"]: d for d in await self._store.documents(FORWARD_ONLY, list(markers))}
        return {k: d for k, d in markers.items()
                if d is not None and (k not in stored or stored[k]["pos"] < d["pos"])}

    def _count_error(self, what: str, exc: BaseException, trace: bool = False) -> None:
        self.stats.errors += 1
        self.stats.last_error = f"{what}: {exc}"
        log.warning("projector: %s failed: %s", what, exc, exc_info=exc if trace else None)
