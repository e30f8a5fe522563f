"""The ``m3-rag`` command line: ``demo``, ``index``, ``migrate``, ``search``, ``eval``.

:mod:`m3_rag.cli.app` parses the arguments and runs :func:`main` (the console script
``m3-rag`` and ``python -m m3_rag``); :mod:`m3_rag.cli.commands` holds the commands. Every
failure is one line on stderr with exit code 2 (130 for Ctrl-C).
"""

from __future__ import annotations

from m3_rag.cli.app import build_parser, main
from m3_rag.cli.commands import CliError, hits_json, json_safe

__all__ = ["CliError", "build_parser", "hits_json", "json_safe", "main"]
