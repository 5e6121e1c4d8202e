"""The README's settings table names every setting the code reads."""

from __future__ import annotations

from pathlib import Path

from backend.settings import Settings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_setting_is_in_the_readme_table() -> None:
    missing = []
    for name in Settings.model_fields:
        variable = f"MAILSYNC_{name.upper()}"
        # Rows may name a family at once: `MAILSYNC_GOOGLE_OAUTH_URL`, `_TOKEN_URL`, ...
        parts = variable.split("_", 2)
        short = f"`_{parts[2]}`" if len(parts) == 3 else f"`{variable}`"
        if f"`{variable}`" not in README and short not in README:
            missing.append(variable)
    assert missing == []
