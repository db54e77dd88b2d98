"""OpenSeadragon, the viewer `wsip view` pages run on: installed by npm on first use, never copied into this repo.

`npm pack openseadragon@<VERSION>` fetches the release from the npm registry; its sha512 must equal the pinned
npm integrity before its `build/openseadragon/` folder (script, button images, licence) is unpacked into the
user's cache (`$XDG_CACHE_HOME/wsip/`, default `~/.cache/wsip/`). Offline machines point
`$WSIP_OPENSEADRAGON` at such a folder instead. See docs/report.md.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from wsi_pipeline.errors import UserError, one_line
from wsi_pipeline.workspace.files import temp_name

VERSION = "6.1.1"
INTEGRITY = "sha512-g4iKe2q8B642SaBT3+x4ZF3/8b1TxPPydyjmtrOLgDrlYWMKd9ZXM+1Cb/xa9DVySkvs/7l6HR1nHKfD5F3Tsw=="
ENV = "WSIP_OPENSEADRAGON"
SCRIPT = "openseadragon.min.js"
_BUILD = "package/build/openseadragon/"


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "wsip" / f"openseadragon-{VERSION}"


def openseadragon_dir() -> Path:
    """A folder holding `openseadragon.min.js` and `images/`: `$WSIP_OPENSEADRAGON`, else the cache (filled by
    npm now if empty)."""
    if given := os.environ.get(ENV):
        folder = Path(given).expanduser()
        if not (folder / SCRIPT).is_file():
            raise UserError(f"${ENV}={given}: no {SCRIPT} there; point it at an unpacked openseadragon "
                            "build/openseadragon folder, or unset it to let wsip install it with npm")
        return folder
    folder = cache_dir()
    if not (folder / SCRIPT).is_file():
        install(folder)
    return folder


def install(folder: Path) -> None:
    """npm pack → integrity check → unpack into `folder` (atomically: a half-copied cache is never used)."""
    npm = shutil.which("npm")
    if npm is None:
        raise UserError(f"wsip view needs OpenSeadragon, which it installs with npm on first use: install Node.js "
                        f"and npm (Debian: apt-get install npm), or set ${ENV} to an unpacked openseadragon folder")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            proc = subprocess.run([npm, "pack", f"openseadragon@{VERSION}", "--pack-destination", tmp, "--silent"],
                                  cwd=tmp, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            proc = subprocess.CompletedProcess([], 1, "", "timed out after 300 s")
        tarball = Path(tmp) / f"openseadragon-{VERSION}.tgz"
        if proc.returncode != 0 or not tarball.is_file():
            raise UserError(f"npm pack openseadragon@{VERSION} failed ({one_line(Exception(proc.stderr))}); check "
                            f"that npm reaches its registry, or set ${ENV} to an unpacked openseadragon folder")
        digest = "sha512-" + base64.b64encode(hashlib.sha512(tarball.read_bytes()).digest()).decode()
        if digest != INTEGRITY:
            raise UserError(f"{tarball.name} from npm has integrity {digest[:24]}..., not the pinned one; refusing "
                            "to use it (a registry mirror serving other bytes?)")
        staging = temp_name(folder)
        try:
            _unpack(tarball, staging)
            if not (folder / SCRIPT).is_file():  # another process may have finished first
                shutil.rmtree(folder, ignore_errors=True)
                os.replace(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _unpack(tarball: Path, dest: Path) -> None:
    """The minified script, its button images and the licence; names are checked, nothing escapes `dest`."""
    with tarfile.open(tarball) as tar:
        for member in tar.getmembers():
            relative = _wanted(member.name)
            if relative is None or not member.isfile() or ".." in Path(relative).parts:
                continue
            source = tar.extractfile(member)
            if source is not None:
                target = dest / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(source.read())


def _wanted(name: str) -> str | None:
    """Where a tarball member goes in the cache folder, or None to leave it out."""
    if name == "package/LICENSE.txt":
        return "LICENSE.txt"
    relative = name[len(_BUILD):] if name.startswith(_BUILD) else ""
    return relative if relative == SCRIPT or relative.startswith("images/") else None
