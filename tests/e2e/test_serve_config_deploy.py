"""The gateway deployed from a Serve config file (PEERNET_SERVE_CONFIG, issue 8): its settings,
checked by Serve's schema, reach the running server. Serve's autoscaler adds a gateway replica
when open WebSockets (each an ongoing request of its replica) pass the target; the file's
PEERNET_* variables apply, but one set in the environment wins."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator

import pytest
import yaml
from wsclient import Client, Server, running_server, server_env, server_port, unique_user

from peernet.config import PeerNetConfig

START_TIMEOUT_S = 420.0
# One replica to start with; a second once more than 3 sockets per replica are open, measured
# over the last 2 s (Serve's defaults wait 30 s before scaling up).
CONFIG = {
    "proxy_location": "EveryNode",
    # Refused by the port below, set in the environment: the environment wins.
    "http_options": {"host": "127.0.0.1", "port": 1},
    "applications": [{
        "name": "peernet", "route_prefix": "/", "import_path": "serve.gateway:Gateway",
        "runtime_env": {"env_vars": {"PEERNET_HEARTBEAT_MS": "20000"}},
        "deployments": [{
            "name": "Gateway",
            "autoscaling_config": {"min_replicas": 1, "max_replicas": 2,
                                   "target_ongoing_requests": 3, "upscale_delay_s": 1,
                                   "look_back_period_s": 2, "metrics_interval_s": 1,
                                   "downscale_delay_s": 600},
        }],
    }],
}


@pytest.fixture(scope="module")
def autoscaled_server(local_stack: PeerNetConfig, tmp_path_factory: pytest.TempPathFactory
                      ) -> Iterator[Server]:
    path = tmp_path_factory.mktemp("serve-config") / "serve-config.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    env = {**server_env(local_stack, tmp_path_factory.mktemp("sc-home")),
           "PEERNET_PORT": server_port("PEERNET_TEST_SERVE_CONFIG_PORT"),
           "PEERNET_SERVE_CONFIG": str(path)}
    env.pop("PEERNET_HEARTBEAT_MS")  # the file's value applies
    log_path = tmp_path_factory.mktemp("sc-server") / "peernet-serve.log"
    with running_server(env, log_path, START_TIMEOUT_S) as server:
        yield server


@pytest.mark.ray
@pytest.mark.timeout(600)
async def test_the_gateway_follows_the_serve_config_and_scales_on_connections(
        autoscaled_server: Server) -> None:
    server = autoscaled_server
    state = json.loads((server.cfg.stack.home / "run" / "serve.json").read_text())
    assert state["autoscaling"]["max_replicas"] == 2 and state["replicas"] == 1
    assert "autoscaled" in server.log_tail(200)

    held: list[Client] = []
    seen: set[str] = set()
    try:
        first = await Client.connect(server.ws_url, server.url, unique_user("sc"))
        held.append(first)
        # The file's variable reached the replicas: the welcome carries its heartbeat.
        assert first.welcome["heartbeat"] == 20000
        seen.add(first.welcome["replica"])
        deadline = time.monotonic() + 120
        while len(seen) < 2:
            assert time.monotonic() < deadline, (
                f"no second replica within 120 s with {len(held)} sockets open:\n"
                + server.log_tail())
            c = await Client.connect(server.ws_url, server.url, unique_user("sc"))
            held.append(c)
            seen.add(c.welcome["replica"])
            await asyncio.sleep(0.5 if len(held) >= 8 else 0)
    finally:
        for c in held:
            with contextlib.suppress(Exception):
                await c.close()
    assert len(seen) == 2
