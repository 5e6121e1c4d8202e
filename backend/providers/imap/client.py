"""Connections to a user's IMAP and SMTP servers, and what their failures mean.

aioimaplib rather than IMAPClient: it is asyncio-native, so one worker process holds the IDLE
connections of thousands of mailboxes without a thread each; aiosmtplib for the same reason.
aioimaplib has no STARTTLS command of its own; `open_imap` upgrades the transport with
asyncio's `start_tls` after the server's go-ahead.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import ssl
from dataclasses import dataclass
from typing import Any

import aioimaplib
import aiosmtplib

from backend.providers.base import (
    AccessDenied,
    PermanentProviderError,
    SyncErrorCode,
    TransientProviderError,
)

SECURITIES = ("TLS", "STARTTLS", "NONE")
# Seconds for one command (greeting, login, a search); a FETCH of large mail gets more.
COMMAND_TIMEOUT = 30.0
# Seconds to wait for a server's greeting: something that answers at the port but is not an
# IMAP server never sends one.
GREETING_TIMEOUT = 10.0


@dataclass(frozen=True)
class ImapConfig:
    """What a mailbox needs to log in; stored encrypted as the mailbox's credentials."""

    email_address: str
    username: str
    password: str
    imap_host: str
    imap_port: int
    smtp_host: str
    smtp_port: int
    security: str = "TLS"

    def credentials(self) -> dict[str, Any]:
        return {
            "username": self.username,
            "password": self.password,
            "imap_host": self.imap_host,
            "imap_port": self.imap_port,
            "smtp_host": self.smtp_host,
            "smtp_port": self.smtp_port,
            "security": self.security,
        }

    @classmethod
    def from_credentials(cls, email_address: str, data: dict[str, Any]) -> ImapConfig:
        try:
            return cls(
                email_address=email_address,
                username=str(data["username"]),
                password=str(data["password"]),
                imap_host=str(data["imap_host"]),
                imap_port=int(data["imap_port"]),
                smtp_host=str(data["smtp_host"]),
                smtp_port=int(data["smtp_port"]),
                security=str(data.get("security") or "TLS"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise AccessDenied("the mailbox's IMAP settings are incomplete") from exc

    def __repr__(self) -> str:  # never the password, in logs or tracebacks
        return (
            f"ImapConfig({self.username!r}@{self.imap_host}:{self.imap_port}, "
            f"smtp {self.smtp_host}:{self.smtp_port}, {self.security})"
        )


# Failures of connecting, each of which `connectImapMailbox` answers with its own code.
class HostUnreachable(TransientProviderError):
    connect_code = "HOST_UNREACHABLE"


class TlsFailed(PermanentProviderError):
    connect_code = "TLS_FAILED"


class NotImap(PermanentProviderError):
    connect_code = "NOT_IMAP"


class AuthFailed(AccessDenied):
    connect_code = "AUTH_FAILED"


@functools.lru_cache(maxsize=4)
def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """The system's trust store, plus the operator's CA for private servers: certificates
    and host names are always verified. One context serves every connection (loading the
    trust store per connection would cost each held IDLE connection its own copy)."""
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    return context


_CODE = re.compile(rb"\[([A-Z-]+)")


def server_error(what: str, result: str, lines: list[Any]) -> Exception:
    """An IMAP NO/BAD answer as the R13 failure it is (RFC 5530 response codes)."""
    text = b" ".join(bytes(line) for line in lines[-1:]).decode(errors="replace")
    codes = {m.decode() for line in lines[-1:] for m in _CODE.findall(bytes(line))}
    detail = f"{what}: {result} {text}"[:500]
    if codes & {"UNAVAILABLE", "INUSE", "SERVERBUG"}:
        return TransientProviderError(detail)
    if "LIMIT" in codes or "OVERQUOTA" in codes:
        return TransientProviderError(detail, SyncErrorCode.RATE_LIMITED)
    if codes & {"AUTHENTICATIONFAILED", "AUTHORIZATIONFAILED", "EXPIRED", "PRIVACYREQUIRED"}:
        return AccessDenied(detail)
    if "NONEXISTENT" in codes:
        return PermanentProviderError(detail, SyncErrorCode.MAILBOX_NOT_FOUND)
    return PermanentProviderError(detail, SyncErrorCode.READ_FAILED)


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


async def open_imap(config: ImapConfig, ca_file: str | None) -> aioimaplib.IMAP4:
    """A logged-in IMAP connection, or the failure that says why not."""
    context = tls_context(ca_file)
    client: aioimaplib.IMAP4
    if config.security == "TLS":
        client = aioimaplib.IMAP4_SSL(
            config.imap_host, config.imap_port, timeout=COMMAND_TIMEOUT, ssl_context=context
        )
    else:
        client = aioimaplib.IMAP4(config.imap_host, config.imap_port, timeout=COMMAND_TIMEOUT)
    try:
        await _greeting(client, config)
        if config.security == "STARTTLS":
            await _starttls(client, config, context)
        response = await client.login(_quoted(config.username), config.password)
        if response.result != "OK":
            await _abandon(client)
            failure = server_error("LOGIN", response.result, list(response.lines))
            if isinstance(failure, TransientProviderError):
                # [UNAVAILABLE], [INUSE], [LIMIT]: nothing said about the password, and a
                # refused password stops IDLE until the credentials change.
                raise failure
            raise AuthFailed(f"the IMAP server refused the login of {config.username}")
        # Servers announce more after login (CONDSTORE, SPECIAL-USE...).
        await client.protocol.capability()
    except (AuthFailed, NotImap, TlsFailed, HostUnreachable):
        raise
    except ssl.SSLError as exc:
        await _abandon(client)
        raise TlsFailed(f"TLS with {config.imap_host}:{config.imap_port} failed: {exc}") from exc
    except (OSError, TimeoutError, aioimaplib.AioImapException) as exc:
        await _abandon(client)
        raise HostUnreachable(f"lost {config.imap_host}:{config.imap_port}: {exc!r}") from exc
    return client


async def _greeting(client: aioimaplib.IMAP4, config: ImapConfig) -> None:
    where = f"{config.imap_host}:{config.imap_port}"
    client.timeout = GREETING_TIMEOUT
    try:
        await client.wait_hello_from_server()
    except ssl.SSLError as exc:
        await _abandon(client)
        raise TlsFailed(f"TLS with {where} failed: {exc.reason or exc}") from exc
    except (TimeoutError, aioimaplib.AioImapException) as exc:  # before OSError, its base
        connected = client.protocol.transport is not None
        await _abandon(client)
        if connected:
            raise NotImap(f"{where} answers, but not as an IMAP server") from exc
        raise HostUnreachable(f"cannot reach {where} (timed out)") from exc
    except OSError as exc:
        await _abandon(client)
        raise HostUnreachable(f"cannot reach {where}: {exc.strerror or exc}") from exc
    finally:
        client.timeout = COMMAND_TIMEOUT


async def _starttls(client: aioimaplib.IMAP4, config: ImapConfig, context: ssl.SSLContext) -> None:
    protocol = client.protocol
    if "STARTTLS" not in protocol.capabilities:
        await _abandon(client)
        raise TlsFailed(f"{config.imap_host} does not offer STARTTLS")
    response = await asyncio.wait_for(
        protocol.execute(aioimaplib.Command("STARTTLS", protocol.new_tag(), loop=protocol.loop)),
        client.timeout,
    )
    if response.result != "OK":
        await _abandon(client)
        raise TlsFailed(f"{config.imap_host} refused STARTTLS")
    loop = asyncio.get_running_loop()
    try:
        transport = await loop.start_tls(
            protocol.transport, protocol, context, server_hostname=config.imap_host
        )
    except (ssl.SSLError, ConnectionError) as exc:
        await _abandon(client)
        raise TlsFailed(f"TLS with {config.imap_host} failed: {exc}") from exc
    protocol.transport = transport
    # What the server said before TLS may have been forged: ask again (RFC 3501 6.2.1).
    await protocol.capability()


async def _abandon(client: aioimaplib.IMAP4) -> None:
    transport = getattr(client.protocol, "transport", None)
    if transport is not None:
        transport.close()
    task = getattr(client, "_client_task", None)
    if task is not None and not task.done():
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


async def close_imap(client: aioimaplib.IMAP4) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.logout(), 5)
    await _abandon(client)


def smtp_client(config: ImapConfig, ca_file: str | None) -> aiosmtplib.SMTP:
    security = config.security
    return aiosmtplib.SMTP(
        hostname=config.smtp_host,
        port=config.smtp_port,
        use_tls=security == "TLS",
        start_tls=security == "STARTTLS",
        tls_context=tls_context(ca_file) if security != "NONE" else None,
        timeout=COMMAND_TIMEOUT,
    )


async def open_smtp(config: ImapConfig, ca_file: str | None) -> aiosmtplib.SMTP:
    """A connected, authenticated SMTP submission client, or the failure that says why not."""
    where = f"{config.smtp_host}:{config.smtp_port}"
    client = smtp_client(config, ca_file)
    try:
        await client.connect()
    except ssl.SSLError as exc:
        raise TlsFailed(f"TLS with {where} failed: {exc.reason or exc}") from exc
    except aiosmtplib.SMTPConnectError as exc:
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, ssl.SSLError):
            raise TlsFailed(f"TLS with {where} failed: {cause.reason or cause}") from exc
        raise HostUnreachable(f"cannot reach {where}: {exc}") from exc
    except aiosmtplib.SMTPConnectTimeoutError as exc:
        raise HostUnreachable(f"cannot reach {where} (timed out)") from exc
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPResponseException) as exc:
        raise NotImap(f"{where} answers, but not as an SMTP server: {exc}") from exc
    except aiosmtplib.SMTPException as exc:
        if "TLS" in str(exc) or isinstance(exc.__cause__, ssl.SSLError):
            raise TlsFailed(f"TLS with {where} failed: {exc}") from exc
        raise NotImap(f"{where} answers, but not as an SMTP server: {exc}") from exc
    except OSError as exc:
        raise HostUnreachable(f"cannot reach {where}: {exc.strerror or exc}") from exc
    try:
        await client.login(config.username, config.password)
    except aiosmtplib.SMTPAuthenticationError as exc:
        await _quit(client)
        raise AuthFailed(f"the SMTP server refused the login of {config.username}") from exc
    except aiosmtplib.SMTPException as exc:
        await _quit(client)
        raise AuthFailed(f"the SMTP server offers no usable login: {exc}") from exc
    return client


async def _quit(client: aiosmtplib.SMTP) -> None:
    with contextlib.suppress(Exception):
        await client.quit()
    client.close()


async def close_smtp(client: aiosmtplib.SMTP) -> None:
    await _quit(client)
