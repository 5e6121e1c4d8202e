"""Short-lived signed values that travel through a browser (OAuth `state`)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(data: str) -> bytes:
    return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))


def _mac(secret: bytes, purpose: str, payload: str) -> str:
    return _b64(hmac.new(secret, f"{purpose}:{payload}".encode(), hashlib.sha256).digest())


def sign(secret: bytes, purpose: str, data: dict[str, Any], ttl_seconds: int) -> str:
    body = {**data, "exp": int(time.time()) + ttl_seconds}
    payload = _b64(json.dumps(body, separators=(",", ":")).encode())
    return f"{payload}.{_mac(secret, purpose, payload)}"


def unsign(secret: bytes, purpose: str, value: str) -> dict[str, Any] | None:
    """The signed data, or None when forged, for another purpose, or expired."""
    payload, _, mac = value.partition(".")
    if not payload or not hmac.compare_digest(mac, _mac(secret, purpose, payload)):
        return None
    try:
        data = json.loads(_unb64(payload))
    except ValueError:
        return None
    if not isinstance(data, dict) or int(data.get("exp", 0)) < time.time():
        return None
    return data
