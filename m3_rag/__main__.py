"""``python -m m3_rag`` runs the ``m3-rag`` command."""

from __future__ import annotations

import sys

from m3_rag.cli import main

sys.exit(main())
