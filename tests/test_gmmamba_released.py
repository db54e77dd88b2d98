"""`preset: released` is the GMMamba that was released, at a small size (docs/gmmamba.md §14).

`tests/data/gmmamba_released.pt` holds what the code computed for `_case()` per group-execution mode (recorded at
commit 8f0e792 with `preset: released`, whose outputs had been checked bit for bit against the implementation
before the learning options, commit 5b041a3): the initial parameters' digest, eval logits and attention, one
training step's loss and every gradient's sketch (`support.golden`). The released preset must build the same
parameters exactly and compute the same numbers up to float rounding: the options added since may not change
its construction (parameters, RNG use) or its forward pass. `test_gmmamba_released_d512.py` checks the published
size. Regenerate only on purpose: `WSIP_WRITE_GOLDEN=1 pytest tests/test_gmmamba_released.py`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from support import golden

from wsi_pipeline.models.mil import create_model

GOLDEN = Path(__file__).parent / "data" / "gmmamba_released.pt"


def _case(batch_groups: bool) -> dict[str, object]:
    """A small released GMMamba (48-d input projected to 32-d) on a fixed bag."""
    torch.manual_seed(0)
    model = create_model("gmmamba", in_dim=48, n_classes=2, d_model=32, n_groups=4, batch_groups=batch_groups,
                         preset="released")
    rng = np.random.default_rng(0)
    features = torch.from_numpy(rng.random((70, 48), dtype=np.float32))
    coords = torch.from_numpy(np.stack(np.divmod(np.arange(70), 10), 1)[:, ::-1].copy() * 256)
    return golden.record(model, features, coords)


@pytest.mark.parametrize("batch_groups", [False, True])
def test_released_preset_reproduces_the_recording(batch_groups: bool, one_torch_thread: None) -> None:
    key = f"batch_groups={batch_groups}"
    if os.environ.get("WSIP_WRITE_GOLDEN"):
        recorded = torch.load(GOLDEN) if GOLDEN.is_file() else {}
        torch.save({**recorded, key: _case(batch_groups)}, GOLDEN)
    golden.assert_matches(_case(batch_groups), torch.load(GOLDEN)[key])
