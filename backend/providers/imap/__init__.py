"""IMAP and SMTP submission mailboxes (a password or an app password, no OAuth)."""

from backend.providers.imap import provider as provider  # registers the provider
