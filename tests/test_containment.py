"""Names that cannot leave the workspace, `--mpp` as a fallback only, finished coords kept when a new request
fails, and staging folders of dead writers removed (docs/reliability.md)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
from conftest import sample_slide
from support.launch import cli_env

from wsi_pipeline.errors import InputError, UserError
from wsi_pipeline.slide import FALLBACK, OVERRIDE
from wsi_pipeline.stages.inputs import resolve_inputs
from wsi_pipeline.stages.patch import patch
from wsi_pipeline.workspace.layout import Layout
from wsi_pipeline.workspace.manifest import manifest_rows
from wsi_pipeline.workspace.slide_id import check_slide_id, shown


@pytest.mark.parametrize("name", ["demo_00", "TCGA-AB-1234-01Z-00-DX1.abc", "café slide", "慢性胃炎", "x" * 200])
def test_ordinary_slide_ids_pass(name):
    assert check_slide_id(name) == name


@pytest.mark.parametrize("name, why", [
    ("", "empty"), ("..", "starts with '.'"), (".hidden", "starts with '.'"), ("../../x", "path separator"),
    ("/elsewhere/evil2", "path separator"), ("a\\b", "path separator"), ("a\x00b", "control character"),
    ("a\nb", "control character"), ("x" * 201, "201 bytes"), ("é" * 101, "202 bytes"),
    ("caf\udce9", "not valid UTF-8"),
])
def test_unsafe_slide_ids_are_one_line_errors(name, why):
    with pytest.raises(InputError, match=why) as caught:
        check_slide_id(name, where="labels.csv:3: ")
    message = str(caught.value)
    assert message.startswith("labels.csv:3: slide id") and "\n" not in message
    message.encode("utf-8")  # printable: no lone surrogate reaches a terminal or a manifest


def test_shown_names_are_printable_text():
    assert shown("caf\udce9\n") == "caf\\xe9\\n"
    assert shown("s" * 300).endswith("… (300 bytes)")


def test_layout_builds_no_path_outside_its_root(tmp_path):
    layout = Layout(tmp_path / "ws")
    hostile = [
        lambda: layout.patch_set("20x_256px_0px").coords("../../../x"),
        lambda: layout.feature_set("..", "resnet18"),
        lambda: layout.feature_set("20x", "resnet18").h5("/etc/passwd"),
        lambda: layout.run("../elsewhere"),
        lambda: layout.predictions("/tmp"),
        lambda: layout.predictions("r").viewer("../../../../x/victim"),
        lambda: layout.prediction_slides().patch_set("p").mask("a/b"),
    ]
    for build in hostile:
        with pytest.raises(UserError):
            build()
    made = [layout.patch_set("p").coords("s"), layout.feature_set("p", "f").partial("s"), layout.run("r").dir,
            layout.predictions("r").viewer("s"), layout.prediction_slides().patch_set("p").qc("s")]
    assert all(p.is_relative_to(layout.root) for p in made)


def test_mpp_fills_in_only_and_the_override_is_recorded(tmp_path, make_slide):
    """`--mpp` never touches a slide that records its MPP (nothing re-patched); `--mpp-override` does, and the
    manifest says so; a failing override leaves the last good coords as they were."""
    slide = make_slide()  # records 0.25 µm/px
    first = patch(resolve_inputs([slide]), out=tmp_path)
    coords, manifest = first.patch_set.coords("gen"), first.patch_set.manifest
    original = coords.read_bytes()
    again = patch(resolve_inputs([slide], mpp=0.5), out=tmp_path)
    assert again.outcomes[0].status == "cached" and coords.read_bytes() == original
    assert manifest_rows(manifest)["gen"]["mpp"] == "0.2500"
    overridden = patch(resolve_inputs([slide], mpp_override=0.5), out=tmp_path)
    row = manifest_rows(manifest)["gen"]
    assert overridden.outcomes[0].status == "done" and (row["mpp"], row["mpp_source"]) == ("0.5000", OVERRIDE)
    kept = coords.read_bytes()
    failed = patch(resolve_inputs([slide], mpp_override=40.0), out=tmp_path)  # 20x from 40 µm/px: impossible
    assert failed.outcomes[0].status == "failed" and "allow-upsample" in failed.outcomes[0].error
    assert coords.read_bytes() == kept and first.patch_set.mask("gen").is_file()
    assert manifest_rows(manifest)["gen"] == row  # the row still describes the coords on disk
    assert patch(resolve_inputs([slide], mpp_override=0.5), out=tmp_path).outcomes[0].status == "cached"
    for bad in (0.0, -1.0, math.nan, math.inf, 1e9):
        for flag in ("mpp", "mpp_override"):
            with pytest.raises(InputError, match="plausible"):
                resolve_inputs([slide], **{flag: bad})


def test_mpp_fallback_is_part_of_what_makes_coords_current(tmp_path):
    path = sample_slide("TCGA-CR-7395-01A-01-TS1.svs")  # records no MPP
    first = patch(resolve_inputs([path], mpp=0.25), out=tmp_path)
    assert first.outcomes[0].status == "done"
    assert manifest_rows(first.patch_set.manifest)[path.stem]["mpp_source"] == FALLBACK
    assert patch(resolve_inputs([path], mpp=0.25), out=tmp_path).outcomes[0].status == "cached"
    redone = patch(resolve_inputs([path], mpp=0.5), out=tmp_path)
    assert redone.outcomes[0].status == "done"
    assert manifest_rows(first.patch_set.manifest)[path.stem]["mpp"] == "0.5000"


def test_staging_folders_of_dead_writers_are_removed_by_the_next_stage(tmp_path, make_slide):
    """A killed `wsip view` leaves `viewer/.<id>.tmp-<host>-<pid>-…/`; any later stage in that workspace
    removes it once its writer is dead, and leaves a live writer's alone."""
    layout = Layout(tmp_path / "ws")
    viewer = layout.predictions("r").viewer("s").parent
    make = ("import sys; from pathlib import Path; from wsi_pipeline.workspace.files import temp_name; "
            "p = temp_name(Path(sys.argv[1])); p.mkdir(parents=True); (p / 'index.html').write_text('x')")
    for target in (viewer / "s", layout.root / "report.html"):
        subprocess.run([sys.executable, "-c", make, str(target)], check=True, env=cli_env())
    from wsi_pipeline.workspace.files import temp_name

    live = temp_name(viewer / "t")
    live.mkdir()
    assert len(list(viewer.glob(".*"))) == 2 and len(list(layout.root.glob(".report.html*"))) == 1
    patch(resolve_inputs([make_slide()]), out=layout)
    assert list(viewer.glob(".*")) == [live] and not list(layout.root.glob(".report.html*"))
