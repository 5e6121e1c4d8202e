"""HTML bodies: sanitized once when stored (R10), remote images made inert when read."""

from __future__ import annotations

import nh3

LINK_REL = "noopener noreferrer nofollow"
# cid: (an inline part) and data: (an embedded image) load nothing from anywhere.
_URL_SCHEMES = nh3.ALLOWED_URL_SCHEMES | {"cid", "data"}


def _is_local(value: str) -> bool:
    return value.strip().lower().startswith(("cid:", "data:image/"))


def _stored(element: str, attribute: str, value: str) -> str | None:
    # data: URLs only as images; a data: link could open a page of the sender's making.
    if value.strip().lower().startswith("data:") and not (
        element == "img" and attribute == "src" and _is_local(value)
    ):
        return None
    return value


def sanitize_html(value: str) -> str:
    """Safe to render as-is in a browser: no scripts, handlers, or remote-loading tricks."""
    return nh3.clean(value, link_rel=LINK_REL, url_schemes=_URL_SCHEMES, attribute_filter=_stored)


def _inert(element: str, attribute: str, value: str) -> str | None:
    if element == "img" and attribute in ("src", "srcset") and not _is_local(value):
        return None
    return _stored(element, attribute, value)


def without_remote_images(value: str) -> str:
    """What mail clients show by default: images from the sender's server (tracking pixels
    among them) do not load; cid: and data: images stay. Input is `sanitize_html` output."""
    if "<img" not in value.lower():
        return value
    return nh3.clean(value, link_rel=LINK_REL, url_schemes=_URL_SCHEMES, attribute_filter=_inert)
