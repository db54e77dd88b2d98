"""Recorded model outputs compared across machines (docs/gmmamba.md §14).

A recording holds the exact digest of a model's initial parameters, its eval logits and attention, and one
training step's loss plus a sketch of every parameter's gradient (sum, absolute sum, and the dot product with a
fixed random vector: small to store, and any change to a gradient moves it). Parameters are compared exactly;
outputs to float rounding, because CPUs with other vector units (and batched vs looped groups) round the same
arithmetic differently in the last bits — an exact comparison of floats fails on another machine, not on a
changed model.
"""

from __future__ import annotations

import hashlib

import torch


def record(model: torch.nn.Module, features: torch.Tensor, coords: torch.Tensor) -> dict[str, object]:
    """What a recording holds for `model` on one bag (the model is put in eval, then train mode)."""
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
    model.eval()
    with torch.no_grad():
        logits, attention = model(features, coords)
    model.train()
    torch.manual_seed(1)
    train_logits, _ = model(features, coords)
    loss = torch.nn.functional.cross_entropy(train_logits, torch.tensor([1]))
    loss.backward()
    probe = torch.Generator().manual_seed(0)
    sketches = {}
    for name, p in model.named_parameters():
        if p.grad is None:  # e.g. GMMamba's mask scorer: no gradient, as released (docs/gmmamba.md §4)
            continue
        g = p.grad.detach().double().flatten()
        sketches[name] = torch.stack([g.sum(), g.abs().sum(),
                                      g @ torch.randn(g.numel(), generator=probe, dtype=torch.float64)])
    return {"digest": digest, "logits": logits, "attention": attention, "loss": loss.detach(), "grads": sketches}


def assert_matches(got: dict[str, object], expected: dict[str, object]) -> None:
    """Same parameters exactly; the same outputs and gradients up to float rounding."""
    assert got["digest"] == expected["digest"]
    for name in ("logits", "attention", "loss"):
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    assert got["grads"].keys() == expected["grads"].keys()
    for name, sketch in expected["grads"].items():
        # rounding moves a sketch by ~2e-5 of the gradient's absolute sum; the floor covers gradients that are
        # rounding noise themselves (an attention scorer's last bias: softmax is shift-invariant, true gradient 0)
        tolerance = 1e-4 * float(sketch[1]) + 1e-7
        torch.testing.assert_close(got["grads"][name], sketch, rtol=0.0, atol=tolerance, msg=name)
