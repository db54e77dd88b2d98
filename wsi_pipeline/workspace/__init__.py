"""The workspace: its layout (the one owner of every path), atomic files, cache keys, locks, manifests and
shards. Importing it is cheap (no h5py/torch): `wsip status` reads it at start-up."""

from wsi_pipeline.workspace.files import workspace_root
from wsi_pipeline.workspace.layout import FeatureSet, Layout, PatchSet, RunDir

__all__ = ["FeatureSet", "Layout", "PatchSet", "RunDir", "workspace_root"]
