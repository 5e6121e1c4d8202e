"""Local stand-ins for Google's OAuth and Gmail API (and, later, Microsoft's), for the demo,
the tests and anyone trying mailsync without real accounts.

They are driven through the real client libraries, so they follow the wire formats of the
official docs: see ../shared/providers/EMULATOR-SPEC.md.
"""
