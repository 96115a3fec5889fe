"""The `proxy` ingress (PEERNET_INGRESS=proxy), end to end: a `peernet serve` of this module's
own whose sockets Serve's HTTP proxy actor holds and relays to the one gateway replica. There
WebSocket pings reach the replica only as the messages the proxy's server makes of them
(serve/ws_server.py, ProxyHeardProtocol, installed by Serve's proxy callback)."""

from __future__ import annotations

from collections.abc import Iterator

import psutil
import pytest
from test_hostile import connect, pings_alone_keep_open_and_silence_closes_4408
from wsclient import Server, running_server, server_env, server_port, unique_user

from peernet.config import PeerNetConfig

pytestmark = [pytest.mark.ray, pytest.mark.stack]

START_TIMEOUT_S = 420.0  # as the session's server: a busy machine may need Ray started twice


@pytest.fixture(scope="module")
def proxy_server(local_stack: PeerNetConfig, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[Server]:
    env = {**server_env(local_stack, tmp_path_factory.mktemp("proxy-home")),
           "PEERNET_PORT": server_port("PEERNET_TEST_PROXY_INGRESS_PORT"),
           "PEERNET_INGRESS": "proxy",
           "PEERNET_REPLICAS": "1",
           # Three heartbeats of pings stay short.
           "PEERNET_HEARTBEAT_MS": "6000"}
    log_path = tmp_path_factory.mktemp("proxy-server") / "peernet-serve.log"
    with running_server(env, log_path, START_TIMEOUT_S) as server:
        yield server


def listener_of(port: int) -> psutil.Process:
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return psutil.Process(conn.pid)
    raise AssertionError(f"nothing listens on {port}")


async def test_websocket_pings_count_through_serves_proxy(proxy_server: Server) -> None:
    # The socket is Serve's proxy's (a Ray worker), not HAProxy's: the mode under test.
    port = int(proxy_server.url.rsplit(":", 1)[1])
    assert "haproxy" not in listener_of(port).name().lower()
    c = await connect(proxy_server, unique_user("px"))  # frames go both ways through the proxy
    await c.close()
    await pings_alone_keep_open_and_silence_closes_4408(proxy_server)
