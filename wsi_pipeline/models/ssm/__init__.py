"""State-space pieces every Mamba-based model shares: the selective scan (mamba-ssm's signature; numba on
CPU, mamba-ssm's kernels on CUDA) and the bidirectional Mamba blocks built on it."""
