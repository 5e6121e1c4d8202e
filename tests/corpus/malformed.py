"""Hand-made malformed messages, each a way real mail breaks.

Every message involves CONTACT (so a parseable one has someone to be filed for) and USER
(the mailbox). The engine must file each one or record it as IMPORT_FAILED: never crash.
"""

from __future__ import annotations

CONTACT = "corpus@client.test"
USER = "corpus-user@crm.test"
DATE = "Date: Tue, 24 Nov 2026 10:00:00 +0000"


def _msg(*header_lines: str, body: str = "Hello", sep: str = "\r\n") -> bytes:
    return (sep.join(header_lines) + sep + sep + body).encode("utf-8", "surrogateescape")


def _std(extra: list[str] | None = None, body: str = "Hello", mid: str = "x") -> bytes:
    return _msg(
        f"From: Corpus <{CONTACT}>",
        f"To: {USER}",
        "Subject: test",
        DATE,
        f"Message-ID: <{mid}@corpus.test>",
        *(extra or []),
        body=body,
    )


def _deep_multipart(depth: int) -> bytes:
    parts = "Content-Type: text/plain\r\n\r\ninnermost\r\n"
    for i in range(depth):
        parts = (
            f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n{parts}--b{i}--\r\n'
        )
    head = f"From: {CONTACT}\r\nTo: {USER}\r\nSubject: deep\r\n{DATE}\r\nMessage-ID: <deep@corpus.test>\r\nMIME-Version: 1.0\r\n"
    return (head + parts).encode()


MESSAGES: dict[str, bytes] = {
    "no_message_id": _msg(f"From: {CONTACT}", f"To: {USER}", "Subject: no id", DATE),
    "no_date": _msg(
        f"From: {CONTACT}", f"To: {USER}", "Subject: no date", "Message-ID: <nodate@corpus.test>"
    ),
    "garbage_date": _std(["Date: the day after tomorrow"], mid="garbage-date").replace(
        DATE.encode() + b"\r\n", b""
    ),
    "date_out_of_range": _std(["Date: Tue, 31 Feb 99999 25:61:61 +9999"], mid="bad-range").replace(
        DATE.encode() + b"\r\n", b""
    ),
    "no_from_contact_in_to": _msg(
        f"To: {CONTACT}, {USER}", "Subject: no from", DATE, "Message-ID: <nofrom@corpus.test>"
    ),
    "from_without_address": _msg(
        "From: undisclosed-recipients:;",
        f"To: {CONTACT}",
        "Subject: group",
        DATE,
        "Message-ID: <group@corpus.test>",
    ),
    "unknown_charset": _std(
        ["MIME-Version: 1.0", "Content-Type: text/plain; charset=x-unknown-charset"],
        body="caf\xe9",
        mid="unknown-charset",
    ),
    "wrong_charset": _std(
        [
            "MIME-Version: 1.0",
            "Content-Type: text/plain; charset=utf-8",
            "Content-Transfer-Encoding: 8bit",
        ],
        mid="wrong-charset",
    ).replace(b"Hello", b"Gr\xfc\xdfe"),
    "raw_utf8_subject": _std(mid="utf8-subject").replace(
        b"Subject: test", "Subject: Grüße aus Köln".encode()
    ),
    "raw_latin1_subject": _std(mid="latin1-subject").replace(
        b"Subject: test", b"Subject: Gr\xfc\xdfe"
    ),
    "broken_encoded_word": _std(mid="broken-ew").replace(
        b"Subject: test", b"Subject: =?utf-8?q?broken"
    ),
    "encoded_word_unknown_charset": _std(mid="ew-charset").replace(
        b"Subject: test", b"Subject: =?x-foo?q?abc?="
    ),
    "base64_bad_padding": _std(
        ["MIME-Version: 1.0", "Content-Type: text/plain", "Content-Transfer-Encoding: base64"],
        body="SGVsbG8gd29ybGQ",
        mid="b64",
    ),
    "base64_garbage": _std(
        ["MIME-Version: 1.0", "Content-Type: text/plain", "Content-Transfer-Encoding: base64"],
        body="!!!not base64 at all***",
        mid="b64-garbage",
    ),
    "quoted_printable_broken": _std(
        [
            "MIME-Version: 1.0",
            "Content-Type: text/plain",
            "Content-Transfer-Encoding: quoted-printable",
        ],
        body="caf=ZZ and =\r\nsoft=",
        mid="qp",
    ),
    "multipart_without_boundary": _std(
        ["MIME-Version: 1.0", "Content-Type: multipart/mixed"],
        body="--x\r\nContent-Type: text/plain\r\n\r\nhi\r\n--x--",
        mid="mp-no-boundary",
    ),
    "multipart_never_closed": _std(
        ["MIME-Version: 1.0", 'Content-Type: multipart/alternative; boundary="open"'],
        body="--open\r\nContent-Type: text/plain\r\n\r\nhi and no end",
        mid="mp-open",
    ),
    "multipart_boundary_mismatch": _std(
        ["MIME-Version: 1.0", 'Content-Type: multipart/mixed; boundary="aaa"'],
        body="--bbb\r\nContent-Type: text/plain\r\n\r\nhi\r\n--bbb--",
        mid="mp-mismatch",
    ),
    "multipart_nested_60_deep": _deep_multipart(60),
    "huge_subject": _std(mid="huge-subject").replace(
        b"Subject: test", b"Subject: " + b"A" * 200_000
    ),
    "two_thousand_recipients": _std(mid="many-rcpt").replace(
        f"To: {USER}".encode(),
        ("To: " + USER + ", " + ", ".join(f"r{i}@many.test" for i in range(2000))).encode(),
    ),
    "header_line_without_colon": _std(
        ["This line has no colon", "X-After: still here"], mid="no-colon"
    ),
    "bare_lf_line_endings": _msg(
        f"From: {CONTACT}",
        f"To: {USER}",
        "Subject: lf",
        DATE,
        "Message-ID: <lf@corpus.test>",
        sep="\n",
    ),
    "cr_only_line_endings": _msg(
        f"From: {CONTACT}",
        f"To: {USER}",
        "Subject: cr",
        DATE,
        "Message-ID: <cr@corpus.test>",
        sep="\r",
    ),
    "nul_in_body": _std(body="before\x00after", mid="nul-body"),
    "nul_in_header": _std(mid="nul-header").replace(b"Subject: test", b"Subject: te\x00st"),
    "garbage_content_type": _std(["MIME-Version: 1.0", "Content-Type: text/"], mid="ctype"),
    "unknown_transfer_encoding": _std(
        ["MIME-Version: 1.0", "Content-Type: text/plain", "Content-Transfer-Encoding: x-uuencode"],
        mid="cte",
    ),
    "attachment_without_filename": _std(
        ["MIME-Version: 1.0", 'Content-Type: multipart/mixed; boundary="z"'],
        body="--z\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n--z\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment\r\nContent-Transfer-Encoding: base64\r\n\r\nAAECAw==\r\n--z--",
        mid="att-noname",
    ),
    "rfc2231_filename_bad_charset": _std(
        ["MIME-Version: 1.0", 'Content-Type: multipart/mixed; boundary="z"'],
        body="--z\r\nContent-Type: text/plain\r\n\r\nhi\r\n--z\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; filename*=x-bogus''%FF%FE.pdf\r\n\r\n%PDF\r\n--z--",
        mid="rfc2231",
    ),
    "html_only_with_script": _std(
        ["MIME-Version: 1.0", "Content-Type: text/html"],
        body="<html><body onload=alert(1)><script>steal()</script><p>Hi<b>unclosed<img src=x onerror=alert(2)></body>",
        mid="html-script",
    ),
    "attached_message_rfc822": _std(
        ["MIME-Version: 1.0", 'Content-Type: multipart/mixed; boundary="m"'],
        body=f"--m\r\nContent-Type: text/plain\r\n\r\nforwarded\r\n--m\r\nContent-Type: message/rfc822\r\n\r\nFrom: other@x.test\r\nTo: {USER}\r\nSubject: inner\r\n\r\ninner body\r\n--m--",
        mid="rfc822",
    ),
    "duplicate_headers": _std(
        ["From: second@client.test", "Subject: second subject", "Message-ID: <dup2@corpus.test>"],
        mid="dup1",
    ),
    "odd_but_valid_addresses": _msg(
        f'From: "Doe, John (Sales)" <{CONTACT}> (comment)',
        f'To: "quoted local"@example.test, {USER}, x@bücher.example',
        "Subject: addresses",
        DATE,
        "Message-ID: <addr@corpus.test>",
    ),
    "headers_only": _msg(
        f"From: {CONTACT}",
        f"To: {USER}",
        "Subject: nothing",
        DATE,
        "Message-ID: <empty-body@corpus.test>",
        body="",
    ),
    "no_blank_line_after_headers": f"From: {CONTACT}\r\nTo: {USER}\r\nSubject: run-on\r\n{DATE}\r\nMessage-ID: <runon@corpus.test>".encode(),
    "binary_garbage": bytes(range(256)) * 8,
    "empty": b"",
    "whitespace_only": b"   \r\n\r\n  \t ",
    "message_id_without_brackets": _std(mid="x").replace(
        b"Message-ID: <x@corpus.test>", b"Message-ID: no-brackets@corpus.test"
    ),
    "in_reply_to_garbage": _std(
        ["In-Reply-To: <<<>>> garbage", "References: <a@b> <c@d> not-an-id <e@f"], mid="irt"
    ),
    "thousand_references": _std(
        ["References: " + " ".join(f"<r{i}@refs.test>" for i in range(1000))], mid="many-refs"
    ),
}
