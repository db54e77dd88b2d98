"""The workspace: its layout (the one owner of every path), atomic files, the run store, locks, manifests and
shards. Importing it is cheap (no h5py/torch): `wsip status` reads it at start-up."""

from wsi_pipeline.workspace.layout import FeatureSet, Layout, PatchSet, RunDir, workspace_root

__all__ = ["FeatureSet", "Layout", "PatchSet", "RunDir", "workspace_root"]
