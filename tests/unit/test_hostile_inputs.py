"""Hostile input the other unit suites do not cover, in-process: an unsigned (`alg: none`) token
and an HMAC algorithm other than the pinned HS256 at hello (4401, a bystander unharmed)."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
from gateway_harness import gateway
from unit_helpers import unique_user

from peernet.errors import CloseCode


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
def test_unsigned_and_other_algorithm_tokens_close_4401_and_harm_no_one() -> None:
    with gateway() as gw, gw.connect(unique_user("bystander")) as (bystander, _):
        victim = unique_user("victim")
        claims: dict[str, Any] = {"sub": victim, "exp": int(time.time()) + 60}
        unsigned = jwt.encode(claims, None, algorithm="none")  # type: ignore[arg-type]
        hs512 = jwt.encode(claims, gw.cfg.gateway.token_secret, algorithm="HS512")
        # alg none with the right secret's HS256 signature kept: the header alone must not count.
        signed = gw.token(victim)
        swapped = ".".join([unsigned.split(".")[0], *signed.split(".")[1:]])
        for token in (unsigned, unsigned.rstrip("."), hs512, swapped):
            with gw.open() as ws:
                ws.send({"t": "hello", "token": token})
                code, frames = ws.closed()
            assert code == CloseCode.BAD_TOKEN, token
            assert frames == []
        assert bystander.request({"t": "ping", "rid": 1}) == {"t": "pong", "rid": 1}

