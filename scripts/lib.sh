# Shared by scripts/test and scripts/demo: install what a fresh Debian machine lacks.

apt_updated=""
apt_install() {
  if [ "$(id -u)" != 0 ]; then
    echo "missing: $* (install them, or run this script as root)" >&2
    exit 1
  fi
  if [ -z "$apt_updated" ]; then
    apt-get update -qq
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

ensure_uv() {
  if ! command -v uv >/dev/null 2>&1; then
    python3 -m pip install --quiet uv
  fi
  uv sync --frozen --quiet
}

ensure_graphiql_assets() {
  # GraphiQL is served by the API itself (no CDN): its npm packages are pinned in
  # backend/graphiql/package-lock.json and installed here.
  if ! command -v npm >/dev/null 2>&1; then
    apt_install nodejs npm
  fi
  # A copy of the lockfile installed last says whether it changed (npm's own
  # node_modules/.package-lock.json never equals package-lock.json).
  if ! cmp -s backend/graphiql/package-lock.json backend/graphiql/node_modules/.installed-lock.json 2>/dev/null; then
    (cd backend/graphiql && npm ci --no-audit --no-fund --loglevel=error >/dev/null \
      && cp package-lock.json node_modules/.installed-lock.json)
  fi
}

ensure_test_js() {
  # The SPA example and graphql-http's audit suite (tests/spa): pinned in its package-lock.
  # npm's own node_modules/.package-lock.json never equals package-lock.json, so a copy of
  # the lockfile installed last says whether it changed.
  if ! cmp -s tests/spa/package-lock.json tests/spa/node_modules/.installed-lock.json 2>/dev/null; then
    (cd tests/spa && npm ci --no-audit --no-fund --loglevel=error >/dev/null \
      && cp package-lock.json node_modules/.installed-lock.json)
  fi
}

redis_answers() {
  uv run --quiet python -c "import redis,sys; sys.exit(0 if redis.Redis.from_url('$1', socket_connect_timeout=1).ping() else 1)" 2>/dev/null
}

ensure_mail_servers() {
  # Dovecot and Postfix for the IMAP/SMTP tests and the demo's IMAP mailbox; they are started
  # on free ports from generated configuration (backend/sandbox/mailserver.py), never as the
  # machine's services. Debian's postfix asks questions at install time: none here.
  if [ ! -x /usr/lib/dovecot/imap ] || [ ! -x /usr/lib/dovecot/lmtp ] \
    || [ ! -x /usr/lib/dovecot/submission ] || ! command -v postfix >/dev/null 2>&1; then
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections 2>/dev/null || true
    apt_install dovecot-imapd dovecot-lmtpd dovecot-submissiond postfix
  fi
}
