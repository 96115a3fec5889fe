"""The versioned envelope of every event in the log: msgpack, schema version, event id, type,
actor (the user who caused it), time, and the type's own data."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from peernet.codec import pack, unpack
from peernet.ids import new_id, now_ms

SCHEMA_VERSION = 1


class EnvelopeError(ValueError):
    """A log record that is not a PeerNet event of a schema version this code reads."""


@dataclass(frozen=True, slots=True)
class Event:
    type: str
    actor: str
    data: dict[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=new_id)
    ts: int = field(default_factory=now_ms)
    v: int = SCHEMA_VERSION

    def encode(self) -> bytes:
        return pack({"v": self.v, "id": self.id, "type": self.type, "actor": self.actor,
                     "ts": self.ts, "data": self.data})

    @classmethod
    def decode(cls, raw: bytes) -> Event:
        try:
            obj = unpack(raw)
        except Exception as exc:
            raise EnvelopeError(f"undecodable event: {type(exc).__name__}") from None
        if not isinstance(obj, dict) or obj.get("v") != SCHEMA_VERSION:
            version = obj.get("v") if isinstance(obj, dict) else obj
            raise EnvelopeError(f"unsupported event schema: {version!r}")
        try:
            return cls(type=obj["type"], actor=obj["actor"], data=obj["data"], id=obj["id"],
                       ts=obj["ts"], v=obj["v"])
        except KeyError as exc:
            raise EnvelopeError(f"event lacks field {exc}") from None
