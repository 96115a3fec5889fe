"""The replica's uvicorn settings (serve/ws_server.py), applied to `uvicorn.Config`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import uvicorn
from unit_helpers import unit_cfg

from serve.ws_server import use_server_settings


@pytest.fixture
def restored_config() -> Iterator[None]:
    original = uvicorn.Config
    try:
        yield
    finally:
        uvicorn.Config = original  # type: ignore[misc]


async def app(scope: object, receive: object, send: object) -> None:  # pragma: no cover
    pass


def test_compression_is_declined_by_default(restored_config: None) -> None:
    assert uvicorn.Config(app).ws_per_message_deflate  # uvicorn's own default agrees to it
    use_server_settings(unit_cfg().gateway)
    assert not uvicorn.Config(app).ws_per_message_deflate


def test_compression_can_be_turned_on_and_an_explicit_argument_wins(restored_config: None) -> None:
    use_server_settings(unit_cfg({"PEERNET_WS_COMPRESSION": "1"}).gateway)
    assert uvicorn.Config(app).ws_per_message_deflate
    assert not uvicorn.Config(app, ws_per_message_deflate=False).ws_per_message_deflate


def test_applying_the_settings_twice_does_not_stack_subclasses(restored_config: None) -> None:
    original = uvicorn.Config
    use_server_settings(unit_cfg().gateway)
    use_server_settings(unit_cfg().gateway)
    assert uvicorn.Config.__mro__[1] is original
