"""BGE-M3 checkpoints between the official layout and a transformers-native one whose
``AutoModel`` returns all three outputs (``m3-rag convert``; see ``docs/layouts.md``)."""

from __future__ import annotations

from m3_rag.convert.layouts import convert_checkpoint

__all__ = ["convert_checkpoint"]
