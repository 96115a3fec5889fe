"""Signed session tokens: JWT, HS256 only (the algorithm is pinned), with expiry checked."""

from __future__ import annotations

import re
import time

import jwt

from peernet.config import GatewayConfig
from peernet.errors import bad_request

USER_ID = re.compile(r"^[a-z0-9_]{1,32}$")
_ALGORITHM = "HS256"


class TokenError(Exception):
    """A token that is missing, forged, expired, unsigned or for an invalid user."""


def valid_user_id(user: object) -> bool:
    return isinstance(user, str) and USER_ID.fullmatch(user) is not None


def issue_token(user: str, cfg: GatewayConfig, *, ttl_s: int | None = None) -> str:
    if not valid_user_id(user):
        raise bad_request("user ids match ^[a-z0-9_]{1,32}$")
    now = int(time.time())
    claims = {"sub": user, "iat": now, "exp": now + (cfg.token_ttl_s if ttl_s is None else ttl_s)}
    return jwt.encode(claims, cfg.token_secret, algorithm=_ALGORITHM)


def verify_token(token: object, cfg: GatewayConfig) -> str:
    """The user id the token was issued for; TokenError otherwise."""
    if not isinstance(token, str) or not token or len(token) > 4096:
        raise TokenError("missing token")
    try:
        claims = jwt.decode(token, cfg.token_secret, algorithms=[_ALGORITHM],
                            options={"require": ["sub", "exp"]})
    except jwt.PyJWTError as exc:
        raise TokenError(f"invalid token: {type(exc).__name__}") from None
    user = claims.get("sub")
    if not valid_user_id(user):
        raise TokenError("token names no valid user")
    return str(user)
