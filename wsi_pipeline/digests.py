"""Cache-key hashing (docs/design.md §10): parameter hashes, digests of the code that makes an output, file
fingerprints and content hashes. A leaf module (stdlib only), so models and stages share it without either
importing the workspace package.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def code_digest(*files: str | os.PathLike[str]) -> str:
    """sha256 of source files: part of a stage's cache key, so changing the algorithm invalidates outputs."""
    h = hashlib.sha256()
    for f in files:
        h.update(Path(f).read_bytes())
    return h.hexdigest()[:16]


def params_hash(params: Mapping[str, Any]) -> str:
    """A short, stable hash of JSON-able parameters (key order does not matter)."""
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_fingerprint(path: str | os.PathLike[str]) -> str:
    """Size + mtime: cheap, and changes whenever the file is replaced or rewritten. A folder (a DICOM WSI
    series) gets a digest of its files' names and fingerprints, so adding, removing or rewriting any changes it."""
    path = Path(path)
    if path.is_dir():
        parts = [f"{p.name}:{file_fingerprint(p)}" for p in sorted(path.iterdir()) if p.is_file()]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    st = path.stat()
    return f"{st.st_size}-{st.st_mtime_ns}"


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """The content hash of a file (encoder weights: features from different weights never mix)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
