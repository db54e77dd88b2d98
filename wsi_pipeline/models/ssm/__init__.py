"""Selective state-space scans and their kernels."""
