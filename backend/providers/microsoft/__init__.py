"""Microsoft 365 / Outlook through msgraph-sdk (in progress: the client; the provider and
its OAuth connector register here once they land)."""
