"""Offline data-preparation jobs (local process pool, Apache Beam)."""
