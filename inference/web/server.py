"""Serving the app with waitress on the configured address (127.0.0.1 unless `node.web_host` says otherwise)."""

from __future__ import annotations

from typing import Any

from flask import Flask
from waitress import create_server


def web_server(app: Flask, host: str = "127.0.0.1", port: int = 8080, *, threads: int = 4) -> Any:
    """A waitress server bound now (port 0: the OS picks; `server.effective_port` says which); `run()` serves
    until `close()`. The Server header is plain so it tells a scanner nothing."""
    return create_server(app, host=host, port=port, threads=threads, ident="fedlesion", clear_untrusted_proxy_headers=True)
