"""The web client's static mount: web/dist served at / when it is built, nothing at / when it is
not, and in neither case in the way of the API's routes."""

from __future__ import annotations

from pathlib import Path

import pytest
from gateway_harness import gateway
from starlette.websockets import WebSocketDisconnect

import serve.app


def test_without_a_build_the_root_is_404_and_the_api_unchanged(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serve.app, "WEB_DIST", tmp_path / "dist")
    with gateway() as gw:
        assert gw.client.get("/").status_code == 404
        assert gw.client.get("/metrics").status_code == 200
        with gw.connect("alice") as (_, welcome):
            assert welcome["user"] == "alice"


def test_a_build_is_served_at_the_root_after_every_other_route(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    dist = tmp_path / "dist"
    (dist / "assets").mkdir(parents=True)
    (dist / "index.html").write_text('<div id="root"></div>')
    (dist / "assets" / "app.js").write_text("console.log('hi')")
    monkeypatch.setattr(serve.app, "WEB_DIST", dist)
    with gateway() as gw:
        index = gw.client.get("/")
        assert index.status_code == 200 and 'id="root"' in index.text
        assert "javascript" in gw.client.get("/assets/app.js").headers["content-type"]
        assert gw.client.get("/no/such/page").status_code == 404
        assert gw.client.get("/metrics").headers["content-type"].startswith("text/plain")
        assert gw.client.get("/v1/feed").status_code == 401  # the API, not a static 404
        with gw.connect("alice") as (_, welcome):
            assert welcome["user"] == "alice"
        # A WebSocket to a path that is not /v1/ws is refused, as without the mount.
        with pytest.raises(WebSocketDisconnect), gw.client.websocket_connect("/elsewhere"):
            pass
