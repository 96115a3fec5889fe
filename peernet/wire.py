"""The names the gateway replicas and the shard actors agree on across processes: the pub/sub
channels they push on, the frame types that are inbox items, and the log header of recipients.

They live in the core so that each side reads them from here, and neither imports the other.
"""

from __future__ import annotations

# The Kafka header that names an event's inbox recipients ("a,b"), so that session shards can
# skip events for users they do not own without decoding them.
RECIPIENTS_HEADER = "to"

# A group's conversation is this prefix and an id the server made; its log records (messages and
# membership changes) are keyed by the conversation, so they start with it too.
GROUP_CONV_PREFIX = "g:"

# The frame types that are inbox items (they carry the per-user `seq`).
INBOX_FRAME_TYPES = frozenset({"msg", "note"})


def user_channel(user: str) -> str:
    """The pub/sub channel of everything pushed to `user`'s connections."""
    return f"u:{user}"


def presence_channel(user: str) -> str:
    """The pub/sub channel of `user`'s presence changes."""
    return f"p:{user}"


def recipients_header(users: list[str]) -> tuple[str, bytes]:
    return (RECIPIENTS_HEADER, ",".join(dict.fromkeys(users)).encode())


def parse_recipients(headers: tuple[tuple[str, bytes], ...]) -> list[str]:
    for name, value in headers:
        if name == RECIPIENTS_HEADER:
            return value.decode().split(",") if value else []
    return []
