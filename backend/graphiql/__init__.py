"""GraphiQL served by the app itself, from npm packages installed at build time (no CDN)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).parent
NODE_MODULES = ROOT / "node_modules"

# URL name -> file inside node_modules; nothing else under node_modules is served.
ASSETS = {
    "react.js": "react/umd/react.production.min.js",
    "react-dom.js": "react-dom/umd/react-dom.production.min.js",
    "graphiql.js": "graphiql/graphiql.min.js",
    "graphiql.css": "graphiql/graphiql.min.css",
    "graphql-ws.js": "graphql-ws/umd/graphql-ws.min.js",
}


def asset_path(name: str) -> Path | None:
    relative = ASSETS.get(name)
    return NODE_MODULES / relative if relative else None


def missing_assets() -> list[str]:
    return [rel for rel in ASSETS.values() if not (NODE_MODULES / rel).is_file()]


def page() -> str:
    return (ROOT / "index.html").read_text()
