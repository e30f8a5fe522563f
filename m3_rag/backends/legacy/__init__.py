"""The first per-store engines, still used as validators (to be removed)."""
