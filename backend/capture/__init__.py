"""The capture address (R16): mail Bcc'd or forwarded to a workspace's address, received over
SMTP (`mailsync capture`) or posted by an inbound-mail service (`POST /inbound/mime`), and
filed like synced mail."""
