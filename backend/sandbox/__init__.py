"""Local stand-ins for Google's OAuth and Gmail API and Microsoft's identity platform and
Graph mail, for the demo, the tests and anyone trying mailsync without real accounts.

They are driven through the real client libraries, so they follow the vendors' wire
formats: docs/providers.md says what they implement and where they differ.
"""
