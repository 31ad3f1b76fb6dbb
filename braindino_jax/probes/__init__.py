"""Frozen-encoder probes: features from NIfTI volumes, small heads, metrics, plots.

Kept free of JAX imports so that preprocessing worker processes start quickly; import the
submodules (``encoders``, ``features``, ``protocol``, ...) directly.
"""
