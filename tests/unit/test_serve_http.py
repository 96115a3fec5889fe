"""The gateway's HTTP API (serve/app.py): health, development tokens, conversation history."""

from __future__ import annotations

from typing import Any

import pytest
from gateway_harness import Gateway, gateway
from unit_helpers import unique_user

from peernet.errors import unavailable
from peernet.tokens import verify_token


@pytest.fixture(scope="module")
def gw() -> Any:
    with gateway() as g:
        yield g


async def _ok() -> None:
    return None


async def _broken() -> None:
    raise RuntimeError("actors not started: session-shard-0-of-2")


def test_healthz_is_200_with_every_check_ok() -> None:
    with gateway(checks={"ray": _ok}) as gw:
        reply = gw.client.get("/healthz")
    assert reply.status_code == 200
    assert reply.json() == {"status": "ok", "checks": {"kafka": "ok", "redis": "ok", "mongo": "ok",
                                                       "ray": "ok"}}


def test_healthz_is_503_naming_an_injected_failing_check() -> None:
    with gateway(checks={"ray": _broken}) as gw:
        reply = gw.client.get("/healthz")
    assert reply.status_code == 503
    body = reply.json()
    assert body["failing"] == ["ray"]
    assert body["checks"]["ray"].startswith("down: RuntimeError: actors not started")
    assert {k: v for k, v in body["checks"].items() if k != "ray"} == {
        "kafka": "ok", "redis": "ok", "mongo": "ok"}


@pytest.mark.parametrize("service", ["kafka", "redis", "mongo"])
def test_healthz_names_a_backend_that_is_down(gw: Gateway, service: str) -> None:
    down = {"kafka": gw.log, "redis": gw.cache, "mongo": gw.store}[service]
    down.set_down(True)
    try:
        reply = gw.client.get("/healthz")
    finally:
        down.set_down(False)
    assert reply.status_code == 503
    assert reply.json()["failing"] == [service]
    assert "unavailable" in reply.json()["checks"][service] or "down" in reply.json()["checks"][service]


def test_a_hanging_check_is_down_after_the_health_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from serve import app as app_module

    monkeypatch.setattr(app_module, "HEALTH_TIMEOUT_S", 0.1)

    async def hangs() -> None:
        await asyncio.sleep(10)

    with gateway(checks={"ray": hangs}) as gw:
        reply = gw.client.get("/healthz")
    assert reply.status_code == 503 and reply.json()["failing"] == ["ray"]


def test_dev_tokens_are_404_when_disabled() -> None:
    with gateway({"PEERNET_DEV_TOKENS": "0"}) as gw:
        reply = gw.client.post("/v1/dev/token", json={"user": "alice"})
    assert reply.status_code == 404
    assert reply.json()["error"]["code"] == "not_found"


def test_dev_tokens_issue_a_token_for_the_user_when_enabled(gw: Gateway) -> None:
    reply = gw.client.post("/v1/dev/token", json={"user": "alice_1"})
    assert reply.status_code == 200
    assert verify_token(reply.json()["token"], gw.cfg.gateway) == "alice_1"
    with gw.connect("alice_1") as (_, welcome):
        assert welcome["user"] == "alice_1"


@pytest.mark.parametrize("body", [{"user": "Not Valid"}, {}, {"user": 5}, ["alice"]])
def test_dev_tokens_refuse_an_invalid_user(gw: Gateway, body: Any) -> None:
    reply = gw.client.post("/v1/dev/token", json=body)
    assert reply.status_code == 400
    assert reply.json()["error"]["code"] == "bad_request"


def test_dev_tokens_refuse_a_body_that_is_not_json(gw: Gateway) -> None:
    reply = gw.client.post("/v1/dev/token", content=b"user=alice")
    assert reply.status_code == 400


def test_metrics_are_prometheus_text(gw: Gateway) -> None:
    reply = gw.client.get("/metrics")
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain")
    assert "peernet_connections" in reply.text


# -- conversation history ----------------------------------------------------------------------


def _store_messages(gw: Gateway, conv: str, a: str, b: str, n: int) -> list[dict[str, Any]]:
    docs = [{"_id": f"{conv}#{i:03d}", "conv": conv, "from": a if i % 2 else b, "to": b if i % 2 else a,
             "body": f"body {i}", "ts": 1_700_000_000_000 + i, "pos": 10 + i} for i in range(n)]
    gw.run(gw.store.upsert_many, "messages", docs)
    return docs


def _history(gw: Gateway, user: str | None, conv: str, **params: Any) -> Any:
    headers = {"Authorization": f"Bearer {gw.token(user)}"} if user else {}
    return gw.client.get(f"/v1/conversations/{conv}/messages", headers=headers, params=params)


def test_history_without_a_valid_token_is_401(gw: Gateway) -> None:
    conv = "dm:alice:bob"
    assert _history(gw, None, conv).status_code == 401
    bad = gw.client.get(f"/v1/conversations/{conv}/messages",
                        headers={"Authorization": "Bearer forged"})
    assert bad.status_code == 401
    basic = gw.client.get(f"/v1/conversations/{conv}/messages",
                          headers={"Authorization": "Basic YWxpY2U6eA=="})
    assert basic.status_code == 401


def test_history_of_someone_elses_conversation_is_403(gw: Gateway) -> None:
    reply = _history(gw, "mallory", "dm:alice:bob")
    assert reply.status_code == 403
    assert reply.json()["error"]["code"] == "forbidden"


@pytest.mark.parametrize("conv", ["dm:bob:alice", "dm:alice:alice", "dm:alice", "group:alice:bob",
                                  "dm:alice:bob:carol", "dm:Alice:bob"])
def test_history_of_no_such_conversation_is_404(gw: Gateway, conv: str) -> None:
    assert _history(gw, "alice", conv).status_code == 404


def test_history_is_newest_first_and_pages_by_cursor(gw: Gateway) -> None:
    alice, bob = sorted([unique_user("a"), unique_user("b")])
    conv = f"dm:{alice}:{bob}"
    docs = _store_messages(gw, conv, alice, bob, 5)
    _store_messages(gw, f"dm:{alice}:{unique_user('z')}", alice, "zed", 3)  # another conversation
    first = _history(gw, bob, conv, limit=3)
    assert first.status_code == 200
    page = first.json()
    expected = [{k: d[k] for k in ("conv", "from", "to", "body", "ts")} | {"id": d["_id"]}
                for d in reversed(docs)]
    assert page["items"] == expected[:3]
    assert page["next"] is not None
    rest = _history(gw, alice, conv, limit=3, before=page["next"]).json()
    assert rest["items"] == expected[3:]
    assert rest["next"] is None


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 101}, {"limit": "x"}, {"before": "y"}])
def test_history_with_a_bad_limit_or_cursor_is_400(gw: Gateway, params: dict[str, Any]) -> None:
    assert _history(gw, "alice", "dm:alice:bob", **params).status_code == 400


def test_history_while_the_store_is_down_is_503(gw: Gateway) -> None:
    gw.store.set_down(True)
    try:
        reply = _history(gw, "alice", "dm:alice:bob")
    finally:
        gw.store.set_down(False)
    assert reply.status_code == 503
    assert reply.json()["error"]["code"] == "unavailable"


def test_unavailable_errors_are_retriable() -> None:
    assert unavailable("x").retriable
