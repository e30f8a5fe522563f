"""``python -m m3_rag.cli`` runs the ``m3-rag`` command (as ``python -m m3_rag`` does)."""

from __future__ import annotations

import sys

from m3_rag.cli import main

sys.exit(main())
