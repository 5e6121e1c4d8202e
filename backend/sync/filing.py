"""The filing rules (R1, R3, R4, R5, R8, R12) as pure decisions over a parsed message."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from backend.auth.tables import ContactAutoCreation
from backend.exclusions.rules import is_excluded
from backend.mail.tables import EmailDirection, EmailSource
from backend.mailboxes.tables import SyncMode
from backend.sync.parsing import ParsedAddress, ParsedMessage, is_no_reply


@dataclass(frozen=True)
class FilingContext:
    """What the rules need to know about the workspace, loaded once per pass."""

    own_addresses: dict[str, uuid.UUID]  # R1: address -> user
    excluded: frozenset[str]  # R4: exclusions plus the addresses of contacts with sync off
    auto_creation: ContactAutoCreation
    sync_mode: SyncMode = SyncMode.TWO_WAY


@dataclass
class FilingDecision:
    direction: EmailDirection
    # Addresses whose contacts get the email (R2 resolves them), in participant order.
    candidates: list[str] = field(default_factory=list)
    # Addresses that may become new contacts, each one that no contact has yet (R5).
    creatable: list[ParsedAddress] = field(default_factory=list)
    skip_reason: str | None = None


def direction_of(parsed: ParsedMessage, own: dict[str, uuid.UUID]) -> EmailDirection:
    """R8: OUTGOING when From is an own address of any user of the workspace."""
    if parsed.sender is not None and parsed.sender.address in own:
        return EmailDirection.OUTGOING
    return EmailDirection.INCOMING


def decide(
    parsed: ParsedMessage, ctx: FilingContext, source: EmailSource = EmailSource.SYNC
) -> FilingDecision:
    direction = direction_of(parsed, ctx.own_addresses)
    decision = FilingDecision(direction=direction)
    if source == EmailSource.SYNC and ctx.sync_mode == SyncMode.ONE_WAY:
        decision.skip_reason = "mailbox syncs one way"  # R12
        return decision
    sender = [parsed.sender] if parsed.sender else []
    blocking = sender + parsed.to
    # R4: an excluded From or To keeps the email off every timeline (CRM-sent mail excepted).
    if source != EmailSource.CRM and any(is_excluded(p.address, ctx.excluded) for p in blocking):
        decision.skip_reason = "excluded participant"
        return decision
    seen: set[str] = set()
    # R3: From, To and Cc contacts file the email; Bcc never does.
    for p in [*blocking, *parsed.cc]:
        if p.address in seen or p.address in ctx.own_addresses:  # R1
            continue
        seen.add(p.address)
        if source != EmailSource.CRM and is_excluded(p.address, ctx.excluded):
            continue  # R4: excluded Cc participants are skipped, the rest still file.
        decision.candidates.append(p.address)
        if _may_create(p, parsed, direction, ctx):
            decision.creatable.append(p)
    if not decision.candidates:
        decision.skip_reason = "internal mail" if parsed.sender else "no participants"
    return decision


def _may_create(
    p: ParsedAddress, parsed: ParsedMessage, direction: EmailDirection, ctx: FilingContext
) -> bool:
    """R5: auto-creation by setting; never for bulk mail or no-reply addresses."""
    if ctx.auto_creation == ContactAutoCreation.NONE or parsed.is_bulk or is_no_reply(p.address):
        return False
    if ctx.auto_creation == ContactAutoCreation.SENT:
        return direction == EmailDirection.OUTGOING and (p in parsed.to or p in parsed.cc)
    return True
