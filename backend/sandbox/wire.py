"""Wire formats the Google client speaks besides plain JSON: multipart uploads and batches.

Parsed by hand on purpose: the client writes bare-LF line endings, and `email` would parse
an embedded message/rfc822 part as a nested message instead of handing back its bytes.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")


@dataclass
class Part:
    headers: dict[str, str]
    body: bytes


@dataclass
class SubRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    content_id: str | None = None


@dataclass
class SubResponse:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


def boundary_of(content_type: str) -> str | None:
    match = _BOUNDARY.search(content_type or "")
    return match.group(1) if match else None


def parse_headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    last = None
    for line in block.decode("utf-8", "replace").splitlines():
        if line[:1] in (" ", "\t") and last is not None:
            headers[last] += " " + line.strip()
            continue
        name, sep, value = line.partition(":")
        if sep:
            last = name.strip().lower()
            headers[last] = value.strip()
    return headers


def split_head(data: bytes) -> tuple[bytes, bytes]:
    match = _BLANK_LINE.search(data)
    if match is None:
        return data, b""
    return data[: match.start()], data[match.end() :]


def split_multipart(body: bytes, boundary: str) -> list[Part]:
    delimiter = b"--" + boundary.encode()
    parts: list[Part] = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        chunk = chunk.removeprefix(b"\r\n").removeprefix(b"\n")
        if chunk.endswith(b"\r\n"):
            chunk = chunk[:-2]
        elif chunk.endswith(b"\n"):
            chunk = chunk[:-1]
        head, content = split_head(chunk)
        parts.append(Part(parse_headers(head), content))
    return parts


def parse_batch(body: bytes, content_type: str) -> list[SubRequest]:
    boundary = boundary_of(content_type)
    if boundary is None:
        raise ValueError("a batch request needs a multipart/mixed boundary")
    requests = []
    for part in split_multipart(body, boundary):
        request_line, _, rest = part.body.partition(b"\n")
        method, target, *_ = request_line.decode().strip().split(" ")
        head, content = split_head(rest)
        url = urlsplit(target)
        requests.append(
            SubRequest(
                method=method.upper(),
                path=url.path,
                query=parse_qs(url.query, keep_blank_values=True),
                headers=parse_headers(head),
                body=content,
                content_id=part.headers.get("content-id"),
            )
        )
    return requests


def batch_response(items: list[tuple[SubRequest, SubResponse]]) -> tuple[bytes, str]:
    boundary = f"batch_{uuid.uuid4().hex}"
    reasons = {200: "OK", 204: "No Content", 400: "Bad Request", 401: "Unauthorized"}
    out = bytearray()
    for request, response in items:
        out += f"--{boundary}\r\nContent-Type: application/http\r\n".encode()
        if request.content_id:
            inner = request.content_id.strip().removeprefix("<").removesuffix(">")
            out += f"Content-ID: <response-{inner}>\r\n".encode()
        out += b"\r\n"
        reason = reasons.get(response.status, "Error")
        out += f"HTTP/1.1 {response.status} {reason}\r\n".encode()
        headers = {"Content-Type": "application/json; charset=UTF-8", **response.headers}
        for name, value in headers.items():
            out += f"{name}: {value}\r\n".encode()
        out += f"Content-Length: {len(response.body)}\r\n\r\n".encode()
        out += response.body + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/mixed; boundary={boundary}"


def header_block_end(raw: bytes) -> int:
    """Where a message's header block ends (the index of its blank line), or len(raw)."""
    match = _BLANK_LINE.search(raw)
    return match.start() if match else len(raw)


def strip_header(raw: bytes, name: str) -> bytes:
    """The message without every field `name` (and its folded lines); the rest byte for byte."""
    end = header_block_end(raw)
    lines = raw[:end].splitlines(keepends=True)
    kept: list[bytes] = []
    dropping = False
    prefix = name.lower().encode() + b":"
    for line in lines:
        if line[:1] in (b" ", b"\t") and dropping:
            continue
        dropping = line.lower().startswith(prefix)
        if not dropping:
            kept.append(line)
    head = b"".join(kept)
    if lines and not lines[-1].endswith(b"\n") and kept and kept[-1] is not lines[-1]:
        head = head.rstrip(b"\r\n")
    return head + raw[end:]


def prepend_headers(raw: bytes, headers: list[tuple[str, str]]) -> bytes:
    """Header fields added in front of a message, in its own line ending."""
    if not headers:
        return raw
    newline = b"\r\n" if b"\r\n" in raw[: header_block_end(raw) + 2] else b"\n"
    return b"".join(f"{k}: {v}".encode() + newline for k, v in headers) + raw
