"""The replica's WebSocket server: a setting of uvicorn that Ray Serve does not expose.

With the `haproxy` ingress each gateway replica serves its own sockets with uvicorn, which Serve
creates with `uvicorn.Config` and only its host, port and timeouts. uvicorn agrees to
permessage-deflate whenever a client offers it, as browsers do; the compression state then costs
memory on every connection for frames (small msgpack) that gain little from it.
`use_server_settings` makes `uvicorn.Config` in the replica default to PEERNET_WS_COMPRESSION
(an argument Serve passes itself still wins). It must run in the replica before Serve starts the
server, which Serve does after the deployment's constructor returns.

docs/architecture.md, "The ingress", has the measurement. With the `proxy` ingress the sockets
are Serve's proxy's, which this does not reach.
"""

from __future__ import annotations

from typing import Any

import uvicorn

from peernet.config import GatewayConfig


def use_server_settings(cfg: GatewayConfig) -> None:
    """Make `uvicorn.Config` in this process default to `cfg`'s WebSocket settings."""
    base: type[uvicorn.Config] = getattr(uvicorn.Config, "peernet_base", uvicorn.Config)
    defaults = {"ws_per_message_deflate": cfg.ws_compression}

    class Config(base):  # type: ignore[misc, valid-type]
        peernet_base = base

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **{**defaults, **kwargs})

    uvicorn.Config = Config  # type: ignore[misc]
