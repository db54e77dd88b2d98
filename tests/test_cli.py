"""The CLI answers `--help`, `info`, `status`, `doctor` and `encoders` without importing torch or timm (start-up
matters)."""

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


@pytest.mark.parametrize("args", [["--help"], ["status"], ["info", "SLIDE"], ["doctor"], ["encoders"],
                                  ["encoders", "virchow2"]])
def test_light_commands_do_not_import_torch(args, tmp_path):
    args = [str(sample_slide("CMU-1-Small-Region.svs")) if a == "SLIDE" else a for a in args]
    if args[0] == "status":
        args += ["--out", str(tmp_path)]
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=60)
    assert "HEAVY: []" in proc.stdout, proc.stdout + proc.stderr


def test_encoders_lists_cards_and_weights_found_locally(tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "uni.safetensors").write_bytes(b"x")
    env_code = f"import os; os.environ['WSIP_WEIGHTS'] = {str(weights)!r}; os.environ['COLUMNS'] = '250'\n"
    proc = subprocess.run([sys.executable, "-c", env_code + PROBE, "encoders"], capture_output=True, text=True,
                          timeout=60)
    rows = {line.split("│")[1].strip(): line for line in proc.stdout.splitlines() if line.count("│") > 5}
    assert set(rows) >= {"resnet18", "vit_s16_ssl", "uni", "uni2_h", "conch_v15", "virchow2", "hoptimus0",
                         "hoptimus1", "gigapath", "phikon_v2"}
    assert "2560" in rows["virchow2"] and "631 M" in rows["virchow2"] and "1.13 B" in rows["gigapath"]
    assert f"yes ($WSIP_WEIGHTS: {weights / 'uni.safetensors'})" in rows["uni"]
    assert rows["uni2_h"].rstrip(" │").endswith("no")
    card = subprocess.run([sys.executable, "-c", env_code + PROBE, "encoders", "gigapath"], capture_output=True,
                          text=True, timeout=60).stdout
    assert "resize to 256 px, centre crop 224 px" in card and "prov-gigapath/prov-gigapath" in card
    unknown = subprocess.run([sys.executable, "-m", "wsi_pipeline.cli", "encoders", "gigapth"], capture_output=True,
                             text=True, timeout=60)
    assert unknown.returncode == 2 and "unknown encoder" in unknown.stderr and "Traceback" not in unknown.stderr
