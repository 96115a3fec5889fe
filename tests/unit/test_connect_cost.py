"""What a connect costs the backends: `hello` to `welcome` (the token, the user's channel, the
inbox's newest seq, presence) in at most two calls to the Redis-backed seams, each of which is
one round trip in its Redis implementation (`PubSub.subscribe`: one SUBSCRIBE, confirmed;
`InboxCache.bounds`: one pipeline), and none to anything else. The token is checked without
I/O; presence is reported by the replica in batches, not per connection."""

from __future__ import annotations

import functools
import inspect
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from gateway_harness import Gateway, gateway
from unit_helpers import unique_user


def _count_calls(obj: Any, name: str, calls: Counter[str]) -> None:
    """Count every call of `obj`'s public coroutine methods under `name.method`."""
    for attr in dir(obj):
        if attr.startswith("_"):
            continue
        method = getattr(obj, attr, None)
        if not inspect.iscoroutinefunction(method):
            continue

        def wrap(fn: Any, key: str) -> Any:
            @functools.wraps(fn)
            async def counted(*args: Any, **kwargs: Any) -> Any:
                calls[key] += 1
                return await fn(*args, **kwargs)
            return counted

        setattr(obj, attr, wrap(method, f"{name}.{attr}"))


@pytest.fixture
def counted() -> Iterator[tuple[Gateway, Counter[str]]]:
    calls: Counter[str] = Counter()
    # No periodic metrics publish (a Cache write every few seconds) among the calls counted.
    with gateway({"PEERNET_METRICS_PUBLISH_MS": "0"}) as gw:
        for name in ("cache", "inbox", "pubsub", "store", "log", "presence"):
            backend = getattr(gw.deps, name, None)
            if backend is not None:
                _count_calls(backend, name, calls)
        yield gw, calls


def test_hello_to_welcome_is_two_round_trips_subscribe_and_the_inbox_bounds(
        counted: tuple[Gateway, Counter[str]]) -> None:
    gw, calls = counted
    user = unique_user("conn")
    with gw.connect(user) as (_, welcome):
        assert welcome["user"] == user
        assert calls == Counter({"pubsub.subscribe": 1, "inbox.bounds": 1}), calls
        # A second socket of the same user on this replica: the channel is subscribed already.
        with gw.connect(user):
            assert calls == Counter({"pubsub.subscribe": 1, "inbox.bounds": 2}), calls


def test_a_resume_adds_only_the_inbox_read_of_what_was_missed(
        counted: tuple[Gateway, Counter[str]]) -> None:
    gw, calls = counted
    user = unique_user("conn")
    gw.put_items(user, [{"t": "note", "seq": s, "id": f"n{s}", "ts": 1, "kind": "x"} for s in (1, 2)])
    calls.clear()
    with gw.connect(user, resume=0) as (ws, welcome):
        assert welcome["seq"] == 2
        assert [ws.recv()["seq"] for _ in range(2)] == [1, 2]
        assert ws.expect("resumed")["to"] == 2
        assert calls == Counter({"pubsub.subscribe": 1, "inbox.bounds": 1, "inbox.read": 1}), calls
