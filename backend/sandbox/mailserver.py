"""A real mail server for the demo and the tests: Dovecot (IMAP, LMTP, submission) and
Postfix, started as child processes on free loopback ports from configuration generated
into a directory of their own, with a certificate made for the occasion.

Mail flows as in life: SMTP into Postfix, which delivers every recipient through LMTP into
Dovecot (any address has a mailbox); the submission service (TLS, STARTTLS, AUTH) relays
what a mailbox sends to Postfix. Users log in with the passwords given to `add_user`.
Nothing here touches the machine's own Dovecot or Postfix.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"
DOVEADM = shutil.which("doveadm") or "/usr/bin/doveadm"
POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
POSTFIX_MASTER = "/usr/lib/postfix/sbin/master"


def available() -> bool:
    """Dovecot (IMAP, LMTP, submission) and Postfix are installed."""
    return (
        Path(DOVECOT).exists()
        and Path(POSTFIX).exists()
        and Path("/usr/lib/dovecot/imap").exists()
        and Path("/usr/lib/dovecot/lmtp").exists()
        and Path("/usr/lib/dovecot/submission").exists()
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Ports:
    imap: int  # STARTTLS (or plain)
    imaps: int  # implicit TLS
    submission: int  # STARTTLS
    submissions: int  # implicit TLS
    lmtp: int
    smtp: int  # Postfix, plain, loopback only: where "the internet" delivers


def make_certificate(directory: Path, hostname: str = "localhost") -> tuple[Path, Path]:
    """A self-signed certificate for `hostname` and 127.0.0.1: (cert.pem, key.pem)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName(hostname),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


class MailServer:
    """Dovecot + Postfix on loopback. `start()` then `add_user()`; `stop()` ends both."""

    def __init__(self, directory: Path | None = None) -> None:
        # Dovecot's login processes run as `dovenull` and Postfix's as `postfix`: they need to
        # reach their sockets, so the directory is world-traversable (not pytest's 0700 one).
        self.dir = Path(directory or tempfile.mkdtemp(prefix="mailsync-mail-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)
        self.ports = Ports(*(_free_port() for _ in range(6)))
        self.cert, self.key = make_certificate(self.dir)
        # One passwd-file per user: Dovecot may not notice a change to a shared one made
        # within the second of its last read, while a new user's file is read afresh.
        self.users = self.dir / "users"
        self.users.mkdir()
        self.dovecot_conf = self.dir / "dovecot.conf"
        self.postfix_dir = self.dir / "postfix"
        self._dovecot: subprocess.Popen[bytes] | None = None
        self._postfix: subprocess.Popen[bytes] | None = None

    # --- configuration -------------------------------------------------------------------

    def _write_dovecot(self) -> None:
        d = self.dir
        for sub in ("run", "state", "mail"):
            (d / sub).mkdir(exist_ok=True)
        # Dovecot refuses to keep mail as root; its own user owns the mailboxes.
        shutil.chown(d / "mail", "dovecot", "dovecot")
        (d / "run").chmod(0o755)
        self.dovecot_conf.write_text(
            f"""
instance_name = mailsync-{self.ports.imap}
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
protocols = imap lmtp submission
listen = 127.0.0.1
hostname = mail.example.test
ssl = yes
ssl_cert = <{self.cert}
ssl_key = <{self.key}
disable_plaintext_auth = no
auth_mechanisms = plain login
default_internal_user = dovecot
default_internal_group = dovecot
default_login_user = dovenull
first_valid_uid = 1
mail_location = maildir:~/Maildir
mail_max_userip_connections = 10000
imap_idle_notify_interval = 1 secs
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {self.users}/%u
}}
userdb {{
  driver = static
  args = uid=dovecot gid=dovecot home={d}/mail/%u allow_all_users=yes
}}
namespace inbox {{
  inbox = yes
  separator = /
  mailbox Sent {{
    special_use = \\Sent
    auto = subscribe
  }}
  mailbox Drafts {{
    special_use = \\Drafts
    auto = subscribe
  }}
}}
service imap-login {{
  inet_listener imap {{
    port = {self.ports.imap}
  }}
  inet_listener imaps {{
    port = {self.ports.imaps}
    ssl = yes
  }}
  process_limit = 10000
  client_limit = 1000
}}
service imap {{
  process_limit = 10000
}}
service submission-login {{
  inet_listener submission {{
    port = {self.ports.submission}
  }}
  inet_listener submissions {{
    port = {self.ports.submissions}
    ssl = yes
  }}
}}
submission_relay_host = 127.0.0.1
submission_relay_port = {self.ports.smtp}
submission_relay_trusted = yes
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {self.ports.lmtp}
  }}
}}
service imap-hibernate {{
  unix_listener imap-hibernate {{
    mode = 0600
  }}
}}
protocol lmtp {{
  postmaster_address = postmaster@example.test
}}
"""
        )

    def _write_postfix(self) -> None:
        p = self.postfix_dir
        p.mkdir(exist_ok=True)
        queue, data = self.dir / "postfix-queue", self.dir / "postfix-data"
        queue.mkdir(exist_ok=True)
        queue.chmod(0o755)
        data.mkdir(exist_ok=True)
        shutil.chown(data, "postfix")
        (p / "main.cf").write_text(
            f"""
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
meta_directory = /etc/postfix
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
maillog_file_prefixes = {self.dir}
maillog_file = {self.dir}/postfix.log
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = mx.example.test
myorigin = example.test
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
relay_domains =
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_peername_lookup = no
smtp_dns_support_level = disabled
lmtp_host_lookup = native
default_transport = lmtp:inet:127.0.0.1:{self.ports.lmtp}
relay_transport = lmtp:inet:127.0.0.1:{self.ports.lmtp}
biff = no
append_dot_mydomain = no
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 5s
"""
        )
        (p / "master.cf").write_text(
            f"""
127.0.0.1:{self.ports.smtp} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""
        )

    # --- processes -----------------------------------------------------------------------

    def start(self, timeout: float = 60) -> None:
        self._write_dovecot()
        self._write_postfix()
        self._dovecot = subprocess.Popen(  # noqa: S603 (our own fixed command)
            [DOVECOT, "-F", "-c", str(self.dovecot_conf)],
            stdout=subprocess.DEVNULL,
            stderr=(self.dir / "dovecot.stderr").open("wb"),
            start_new_session=True,
        )
        # `postfix check` makes the queue's directories; the master then runs in the
        # foreground (-d) as our child, so stopping it is a signal to one process group.
        subprocess.run(  # noqa: S603 (our own fixed command)
            [POSTFIX, "-c", str(self.postfix_dir), "check"], check=True, capture_output=True
        )
        self._postfix = subprocess.Popen(  # noqa: S603 (our own fixed command)
            [POSTFIX_MASTER, "-c", str(self.postfix_dir), "-d"],
            stdout=subprocess.DEVNULL,
            stderr=(self.dir / "postfix.stderr").open("wb"),
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        for port in (self.ports.imap, self.ports.submission, self.ports.lmtp, self.ports.smtp):
            while not _listening(port):
                for name, proc in (("dovecot", self._dovecot), ("postfix", self._postfix)):
                    if proc.poll() is not None:
                        self.stop()
                        raise RuntimeError(f"{name} exited: {self.logs()}")
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"mail server did not listen on {port}: {self.logs()}")
                time.sleep(0.05)

    def logs(self) -> str:
        parts = []
        for name in ("dovecot.log", "dovecot.stderr", "postfix.log", "postfix.stderr"):
            path = self.dir / name
            if path.exists():
                parts.append(f"--- {name}\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        for proc in (self._postfix, self._dovecot):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (self._postfix, self._dovecot):
            if proc is not None:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        self._postfix = self._dovecot = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    # --- users and mailboxes -------------------------------------------------------------

    def add_user(self, address: str, password: str) -> None:
        (self.users / address).write_text(f"{address}:{{PLAIN}}{password}::::::\n")

    def set_password(self, address: str, password: str) -> None:
        # Dovecot looks at a passwd-file again only in a later second than its last look (and
        # by its mtime): a change within the same second would go unseen. This waits for the
        # clock, whatever the machine's load, not for the server.
        time.sleep(1.1)
        self.add_user(address, password)

    def doveadm(self, *args: str) -> str:
        done = subprocess.run(  # noqa: S603 (our own fixed command)
            [DOVEADM, "-c", str(self.dovecot_conf), *args],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"doveadm {' '.join(args)}: {done.stderr}")
        return done.stdout

    def kick(self, address: str) -> None:
        """Drop every IMAP connection of `address`, as a server restart or a timeout does."""
        self.doveadm("kick", address)

    def set_uidvalidity(self, address: str, folder: str, uidvalidity: int) -> None:
        """Renumber a folder, as a restored or migrated server does."""
        self.doveadm("mailbox", "update", "--uid-validity", str(uidvalidity), "-u", address, folder)

    async def deliver(self, sender: str, recipients: list[str], raw: bytes) -> None:
        """Mail from outside: SMTP into Postfix, which delivers it through LMTP."""
        import aiosmtplib

        await aiosmtplib.send(
            raw,
            sender=sender,
            recipients=recipients,
            hostname="127.0.0.1",
            port=self.ports.smtp,
            start_tls=False,
            use_tls=False,
        )


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0
