"""Generators for tests, benchmarks and the demo (procedural slides, synthetic cohorts)."""
