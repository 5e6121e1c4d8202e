"""Secrets at rest (OAuth tokens, IMAP passwords): Fernet with a key derived from SECRET_KEY."""

from __future__ import annotations

import base64
import functools
import json
from typing import Any

from cryptography.fernet import Fernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF


@functools.cache
def _fernet(secret: bytes) -> Fernet:
    key = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=b"mailsync", info=b"credentials-v1"
    ).derive(secret)
    return Fernet(base64.urlsafe_b64encode(key))


def encrypt_json(secret: bytes, value: dict[str, Any]) -> str:
    return _fernet(secret).encrypt(json.dumps(value).encode()).decode()


def decrypt_json(secret: bytes, token: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(_fernet(secret).decrypt(token.encode()))
    return data
