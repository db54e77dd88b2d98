"""The CLI answers `--help`, `info`, `status` and `doctor` without importing torch or timm (start-up matters)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import sample_slide

PROBE = """
import sys
from wsi_pipeline.cli import app
try:
    app(sys.argv[1:], standalone_mode=False)
except SystemExit:
    pass
print("HEAVY:", sorted(m for m in ("torch", "timm", "numba") if m in sys.modules))
"""


@pytest.mark.parametrize("args", [["--help"], ["status"], ["info", "SLIDE"], ["doctor"]])
def test_light_commands_do_not_import_torch(args, tmp_path):
    args = [str(sample_slide("CMU-1-Small-Region.svs")) if a == "SLIDE" else a for a in args]
    if args[0] == "status":
        args += ["--out", str(tmp_path)]
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=60)
    assert "HEAVY: []" in proc.stdout, proc.stdout + proc.stderr
