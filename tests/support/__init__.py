"""Test machinery (launching the real CLI, the kill sweep, workspace checks, headless Chromium): used by tests and
benchmarks/bench_faults.py, never shipped in the package."""
