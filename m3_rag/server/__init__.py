"""``m3-rag serve``: the model, reranker and index over HTTP (FastAPI, uvicorn).

:func:`create_app` builds the ASGI app; :func:`~m3_rag.server.main.run_from_args` runs it
for the command line. Nothing outside this package imports it but the CLI."""

from __future__ import annotations

from m3_rag.server.app import create_app
from m3_rag.server.config import ServerConfig

__all__ = ["ServerConfig", "create_app"]
