"""`GET /v1/conversations`: the caller's conversations, most recently active first, with the
last message, the unread count and every member's marker (read from the conversation index,
bus/conversations.py); `GET /v1/conversations/{conv}/messages`: a page of a conversation's
history, newest first, for its participants."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bus.conversations import Conversation, ConversationIndex, Cursor
from bus.groups import GroupStore
from bus.store import Document
from peernet.errors import ErrorCode, PeerNetError, bad_request, unavailable
from serve.deps import GatewayDeps
from serve.groups import is_group_conv
from serve.routes import error_reply, request_error_reply
from serve.routes.tokens import caller_or_reply
from serve.social import limit_param
from serve.validate import conv_participants


def message_item(doc: Document) -> dict[str, Any]:
    """A stored message as history gives it: a group's messages have no `to`."""
    item = {"id": doc["_id"], "conv": doc["conv"], "from": doc["from"]}
    if doc.get("to") is not None:
        item["to"] = doc["to"]
    item.update(body=doc["body"], ts=doc["ts"])
    return item


def groups_of(deps: GatewayDeps) -> GroupStore:
    if deps.groups is None:
        raise unavailable("groups are not configured on this gateway")
    return deps.groups


def index_of(deps: GatewayDeps) -> ConversationIndex:
    if deps.conversations is None:
        raise unavailable("conversations are not configured on this gateway")
    return deps.conversations


def convo(entry: Conversation, caller: str) -> dict[str, Any] | None:
    """A CONVO of the protocol, or None for an entry the caller is no longer in (a group left
    while a replay wrote older states: the index converges, the page never shows it)."""
    if is_group_conv(entry.conv):
        group = entry.group
        if group is None or caller not in group["members"]:
            return None
        kind, title, owner = "group", group["title"], group["owner"]
        members = [str(u) for u in group["members"]]
    else:
        parts = conv_participants(entry.conv)
        if parts is None or caller not in parts:
            return None
        kind, title, owner, members = "dm", None, None, list(parts)
    inside = set(members)
    return {"conv": entry.conv, "kind": kind, "title": title, "owner": owner,
            "members": members, "last": entry.last, "unread": entry.unread,
            "read": {u: i for u, i in entry.read.items() if u in inside}}


def conversation_routes(deps: GatewayDeps) -> list[Route]:
    """`GET /v1/conversations?limit=` (1 to 100, 20) `&before=`, and
    `GET /v1/conversations/{conv}/messages?limit=` (1 to 100, 50) `&before=` (the `next` of the
    page before): {"items", "next"}, `next` null on the last page."""

    async def conversations(request: Request) -> Response:
        user = caller_or_reply(request, deps.cfg.gateway)
        if isinstance(user, Response):
            return user
        try:
            limit = limit_param(request)
            raw = request.query_params.get("before")
            try:
                before = Cursor.decode(raw) if raw else None
            except ValueError:
                raise bad_request("before is not a cursor of this list") from None
            page = await index_of(deps).page(user, limit, before)
        except PeerNetError as exc:
            return request_error_reply(exc)
        items = [c for c in (convo(e, user) for e in page.items) if c is not None]
        return JSONResponse({"items": items,
                             "next": page.next.encode() if page.next is not None else None})

    async def conversation_messages(request: Request) -> Response:
        user = caller_or_reply(request, deps.cfg.gateway)
        if isinstance(user, Response):
            return user
        conv = request.path_params["conv"]
        if is_group_conv(conv):
            # The group's members as they are now: a removed member reads nothing more.
            try:
                (group,) = await groups_of(deps).get_many([conv])
            except PeerNetError as exc:
                return error_reply(503, exc.code, exc.message)
            if group is None or not group.has(user):
                return error_reply(403, ErrorCode.FORBIDDEN, "only members may read a group")
        else:
            parts = conv_participants(conv)
            if parts is None:
                return error_reply(404, ErrorCode.NOT_FOUND, "no such conversation")
            if user not in parts:
                return error_reply(403, ErrorCode.FORBIDDEN,
                                   "only participants may read a conversation")
        try:
            limit = int(request.query_params.get("limit", "50"))
            before_raw = request.query_params.get("before")
            before = int(before_raw) if before_raw else None
        except ValueError:
            return error_reply(400, ErrorCode.BAD_REQUEST, "limit and before must be integers")
        if not 1 <= limit <= 100:
            return error_reply(400, ErrorCode.BAD_REQUEST, "limit must be from 1 to 100")
        if before is not None and not 0 <= before < 2**63:
            # A cursor is a log position (a Kafka offset); a larger int would reach MongoDB,
            # whose BSON encoder raises OverflowError, a 500, for anything past 8 bytes.
            return error_reply(400, ErrorCode.BAD_REQUEST,
                               "before is not a cursor of this conversation")
        try:
            docs = await deps.store.history_page(conv, before=before, limit=limit)
        except PeerNetError as exc:
            return error_reply(503, exc.code, exc.message)
        items = [message_item(d) for d in docs]
        nxt = str(docs[-1]["pos"]) if len(docs) == limit else None
        return JSONResponse({"items": items, "next": nxt})

    return [Route("/v1/conversations", conversations),
            Route("/v1/conversations/{conv}/messages", conversation_messages)]
