"""Bearer tokens: `ms1.<payload>.<signature>`, HMAC-SHA256 over the payload with SECRET_KEY.

The signature rejects forgeries without touching the database; the ApiToken row named
by the payload makes every token expirable and revocable.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

PREFIX = "ms1"


@dataclass(frozen=True)
class TokenClaims:
    token_id: uuid.UUID
    user_id: uuid.UUID
    expires_at: datetime


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(data: str) -> bytes:
    return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))


def _sign(secret: bytes, payload: str) -> str:
    return _b64(hmac.new(secret, f"{PREFIX}.{payload}".encode(), hashlib.sha256).digest())


def encode_token(secret: bytes, claims: TokenClaims) -> str:
    payload = _b64(
        json.dumps(
            {
                "tid": str(claims.token_id),
                "sub": str(claims.user_id),
                "exp": int(claims.expires_at.timestamp()),
            },
            separators=(",", ":"),
        ).encode()
    )
    return f"{PREFIX}.{payload}.{_sign(secret, payload)}"


def decode_token(secret: bytes, token: str) -> TokenClaims | None:
    """The claims of a well-formed, correctly signed token; None for anything else."""
    parts = token.strip().split(".")
    if len(parts) != 3 or parts[0] != PREFIX:
        return None
    _, payload, signature = parts
    if not hmac.compare_digest(signature, _sign(secret, payload)):
        return None
    try:
        data = json.loads(_unb64(payload))
        return TokenClaims(
            token_id=uuid.UUID(data["tid"]),
            user_id=uuid.UUID(data["sub"]),
            expires_at=datetime.fromtimestamp(int(data["exp"]), UTC),
        )
    except (ValueError, KeyError, TypeError):
        return None


def bearer_value(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None
