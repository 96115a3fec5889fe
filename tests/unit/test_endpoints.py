"""GET /v1/endpoints (serve/endpoints.py): the replicas that know their own address publish it
with their open connections; any replica lists the live ones, the least loaded first."""

from __future__ import annotations

import json
import time

from gateway_harness import gateway
from unit_helpers import unique_user

from serve.endpoints import endpoints_group, ws_of


def test_a_replica_that_knows_its_address_is_listed_with_its_connections() -> None:
    with gateway({"PEERNET_METRICS_PUBLISH_MS": "100"}, direct_url=lambda: "http://10.0.0.7:30001") as gw:
        listed = gw.client.get("/v1/endpoints").json()["endpoints"]
        assert listed == [{"replica": "unit", "url": "http://10.0.0.7:30001",
                           "ws": "ws://10.0.0.7:30001/v1/ws", "connections": 0}]
        with gw.connect(unique_user("e")):
            deadline = time.monotonic() + 5
            while gw.client.get("/v1/endpoints").json()["endpoints"][0]["connections"] != 1:
                assert time.monotonic() < deadline, "the connection was never counted"
                time.sleep(0.05)


def test_the_least_loaded_replica_comes_first_and_a_bad_entry_is_left_out() -> None:
    with gateway(direct_url=lambda: "http://10.0.0.7:30001") as gw:
        group = endpoints_group(gw.cfg.metrics.keyspace)

        async def others() -> None:
            await gw.cache.put_member(group, "busy", json.dumps(
                {"url": "https://b:1", "connections": 50}).encode(), ttl_s=60)
            await gw.cache.put_member(group, "broken", b"{not json", ttl_s=60)

        gw.run(others)
        listed = gw.client.get("/v1/endpoints").json()["endpoints"]
        assert [e["replica"] for e in listed] == ["unit", "busy"]
        assert listed[1]["ws"] == "wss://b:1/v1/ws"


def test_no_address_or_the_setting_off_publishes_nothing() -> None:
    with gateway(direct_url=lambda: None) as gw:
        assert gw.client.get("/v1/endpoints").json() == {"endpoints": []}
    with gateway({"PEERNET_DIRECT_ENDPOINTS": "0"}, direct_url=lambda: "http://h:1") as gw:
        assert gw.client.get("/v1/endpoints").json() == {"endpoints": []}


def test_ws_of_keeps_the_scheme_family() -> None:
    assert ws_of("http://h:1/", "/v1/ws") == "ws://h:1/v1/ws"
    assert ws_of("https://h", "/v1/ws") == "wss://h/v1/ws"
