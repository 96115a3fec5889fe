"""Session tokens (peernet/tokens.py): HS256 pinned, expiry and user checked."""

from __future__ import annotations

import time

import jwt
import pytest

from peernet.config import GatewayConfig
from peernet.errors import ErrorCode, PeerNetError
from peernet.tokens import TokenError, issue_token, valid_user_id, verify_token

SECRET = "unit-secret-long-enough-for-hs256-keys"
GW = GatewayConfig(token_secret=SECRET)


def test_an_issued_token_verifies_to_its_user() -> None:
    token = issue_token("alice_01", GW)
    assert verify_token(token, GW) == "alice_01"
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert claims["exp"] - claims["iat"] == GW.token_ttl_s


def test_an_expired_token_is_refused() -> None:
    token = issue_token("alice", GW, ttl_s=-5)
    with pytest.raises(TokenError, match="Expired"):
        verify_token(token, GW)


def test_a_token_signed_with_another_secret_is_refused() -> None:
    token = issue_token("alice", GatewayConfig(token_secret="another-secret-long-enough-for-hs256"))
    with pytest.raises(TokenError):
        verify_token(token, GW)


def test_an_unsigned_alg_none_token_is_refused() -> None:
    claims = {"sub": "alice", "exp": int(time.time()) + 60}
    token = jwt.encode(claims, None, algorithm="none")  # type: ignore[arg-type]
    with pytest.raises(TokenError):
        verify_token(token, GW)


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
def test_another_hmac_algorithm_with_the_right_secret_is_refused() -> None:
    claims = {"sub": "alice", "exp": int(time.time()) + 60}
    token = jwt.encode(claims, SECRET, algorithm="HS512")
    with pytest.raises(TokenError):
        verify_token(token, GW)


def test_a_token_without_expiry_is_refused() -> None:
    token = jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256")
    with pytest.raises(TokenError):
        verify_token(token, GW)


@pytest.mark.parametrize("sub", ["Alice", "a b", "", "x" * 33, "al-ice", 42, None])
def test_a_signed_token_for_an_invalid_user_is_refused(sub: object) -> None:
    claims = {"sub": sub, "exp": int(time.time()) + 60}
    token = jwt.encode(claims, SECRET, algorithm="HS256")
    with pytest.raises(TokenError):
        verify_token(token, GW)


@pytest.mark.parametrize("token", [None, "", 123, b"bytes", "x" * 5000, "not.a.jwt"])
def test_a_missing_or_malformed_token_is_refused(token: object) -> None:
    with pytest.raises(TokenError):
        verify_token(token, GW)


@pytest.mark.parametrize("user", ["Alice", "", "a" * 33, "a\n", "ä"])
def test_no_token_is_issued_for_an_invalid_user(user: str) -> None:
    with pytest.raises(PeerNetError) as caught:
        issue_token(user, GW)
    assert caught.value.code is ErrorCode.BAD_REQUEST


@pytest.mark.parametrize(("user", "valid"), [
    ("a", True), ("user_01", True), ("x" * 32, True), ("x" * 33, False), ("A", False),
    ("a\n", False), ("a.b", False), ("", False), (None, False), (7, False),
])
def test_user_ids(user: object, valid: bool) -> None:
    assert valid_user_id(user) is valid
