"""`preset: released` is today's GMMamba, bit for bit (docs/gmmamba.md §14).

`tests/data/gmmamba_released.pt` holds what the implementation before the learning options (commit 5b041a3)
computed for `_case()`: the initial parameters' digest, eval logits and attention, and the training-mode loss
and gradients of one step, per group-execution mode. The released preset must give exactly the same numbers:
the options added since may not change its construction (parameters, RNG use) or its forward pass.
Regenerate only on purpose: `WSIP_WRITE_GOLDEN=1 pytest tests/test_gmmamba_released.py`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from wsi_pipeline.models.mil import create_model

GOLDEN = Path(__file__).parent / "data" / "gmmamba_released.pt"


def _case(batch_groups: bool, **options: object) -> dict[str, object]:
    """A small GMMamba on a fixed bag: init digest, eval outputs, one training step's loss and gradients."""
    torch.manual_seed(0)
    model = create_model("gmmamba", in_dim=48, n_classes=2, d_model=32, n_groups=4, batch_groups=batch_groups,
                         **options)
    rng = np.random.default_rng(0)
    features = torch.from_numpy(rng.random((70, 48), dtype=np.float32))
    coords = torch.from_numpy(np.stack(np.divmod(np.arange(70), 10), 1)[:, ::-1].copy() * 256)
    digest = hashlib.sha256(b"".join(_digest(p).encode() for p in model.parameters())).hexdigest()
    model.eval()
    with torch.no_grad():
        logits, attention = model(features, coords)
    model.train()
    torch.manual_seed(1)
    train_logits, _ = model(features, coords)
    loss = torch.nn.functional.cross_entropy(train_logits, torch.tensor([1]))
    loss.backward()
    grads = {name: _digest(p.grad) for name, p in model.named_parameters() if p.grad is not None}
    return {"digest": digest, "logits": logits, "attention": attention, "loss": loss.detach(), "grads": grads}


@pytest.mark.parametrize("batch_groups", [False, True])
def test_released_preset_reproduces_the_original_implementation(batch_groups):
    key = f"batch_groups={batch_groups}"
    if os.environ.get("WSIP_WRITE_GOLDEN"):
        golden = torch.load(GOLDEN) if GOLDEN.is_file() else {}
        golden[key] = _case(batch_groups)
        torch.save(golden, GOLDEN)
    expected = torch.load(GOLDEN)[key]
    got = _case(batch_groups, preset="released")
    assert got["digest"] == expected["digest"]
    for name in ("logits", "attention", "loss"):
        assert torch.equal(got[name], expected[name]), name
    assert got["grads"].keys() == expected["grads"].keys()
    assert [n for n, g in expected["grads"].items() if got["grads"][n] != g] == []


def _digest(tensor: torch.Tensor) -> str:
    """Exact: the sha256 of the tensor's bytes (the golden file stays small)."""
    return hashlib.sha256(tensor.detach().contiguous().numpy().tobytes()).hexdigest()
