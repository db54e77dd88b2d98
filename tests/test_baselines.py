"""Baseline MIL models behind create_model (GMMAMBA.md §13): contract, shapes, gradients, attention."""

from __future__ import annotations

import pytest
import torch

from wsi_pipeline.errors import UserError
from wsi_pipeline.models.mil import create_model
from wsi_pipeline.models.mil.transmil import NystromAttention

BASELINES = ["abmil", "transmil", "mambamil", "mean", "max"]
WITH_ATTENTION = {"abmil", "transmil", "mambamil"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _bag(n: int, dim: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g), torch.randint(0, 50_000, (n, 2), generator=g)


@pytest.mark.parametrize("name", BASELINES)
@pytest.mark.parametrize("n", [1, pytest.param(5000, marks=pytest.mark.slow)])  # a large bag: tens of seconds
def test_forward_backward_and_attention(name: str, n: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, in_dim=512, n_classes=3)
    features, coords = _bag(n)
    logits, attn = model(features, coords)
    assert logits.shape == (1, 3) and torch.isfinite(logits).all()
    if name in WITH_ATTENTION:
        assert attn.shape == (n,)
        assert (attn >= 0).all()
        torch.testing.assert_close(attn.sum(), torch.tensor(1.0))
    else:
        assert attn is None
    torch.nn.functional.cross_entropy(logits, torch.tensor([2])).backward()
    missing = [p_name for p_name, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", BASELINES)
def test_baselines_need_no_groups(name: str) -> None:
    model = create_model(name, in_dim=64, n_classes=2)
    features, coords = _bag(10, dim=64)
    assert model.make_groups(features.numpy(), coords.numpy()) is None
    assert model.group_cache_key is None
    with pytest.raises(ValueError, match=r"shaped \(N, D\)"):
        model(features[None], coords)


@pytest.mark.parametrize("name", ["abmil", "mean", "max"])
def test_set_pooling_models_are_permutation_invariant(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, in_dim=64, n_classes=2).eval()
    features, coords = _bag(50, dim=64)
    perm = torch.randperm(50)
    logits, attn = model(features, coords)
    logits_p, attn_p = model(features[perm], coords[perm])
    torch.testing.assert_close(logits_p, logits)
    if attn is not None:
        torch.testing.assert_close(attn_p, attn[perm])


def test_abmil_attention_is_gated() -> None:
    torch.manual_seed(0)
    model = create_model("abmil", in_dim=16, n_classes=2).eval()
    att = model.attention
    assert [tuple(m.weight.shape) for m in (att.V, att.U, att.w)] == [(128, 512), (128, 512), (1, 128)]
    with torch.no_grad():  # score_i = tanh(h_i0) * sigmoid(gate * h_i0), with h_i0 = relu(feature_i0)
        for p in model.parameters():
            p.zero_()
        model.embed[0].weight[0, 0] = att.V.weight[0, 0] = att.w.weight[0, 0] = 1.0
    features = torch.zeros(20, 16)
    features[7, 0] = 5.0
    _, attn = model(features, None)
    assert int(attn.argmax()) == 7 and attn[7] > 1.5 * attn[0]
    with torch.no_grad():
        att.U.weight[0, 0] = -10.0  # close the gate on instance 7
    _, attn = model(features, None)
    torch.testing.assert_close(attn, torch.full((20,), 0.05), atol=1e-3, rtol=0)


def test_mambamil_reads_the_sequence_in_order_and_uses_xavier_init() -> None:
    torch.manual_seed(0)
    model = create_model("mambamil", in_dim=32, n_classes=2, d_model=64).eval()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert all(m.bias is None or not m.bias.any() for m in linears)  # §7: biases zeroed (dt bias too)
    features, coords = _bag(40, dim=32)
    logits, _ = model(features, coords)
    logits_rev, _ = model(features.flip(0), coords)
    assert not torch.allclose(logits, logits_rev, atol=1e-6), "a sequence model must see instance order"


def test_transmil_attention_folds_padding_copies() -> None:
    torch.manual_seed(0)
    model = create_model("transmil", in_dim=32, n_classes=2).eval()
    features, coords = _bag(5, dim=32)  # padded to a 3×3 grid with copies of instances 0..3
    logits, attn = model(features, coords)
    assert logits.shape == (1, 2) and attn.shape == (5,)
    torch.testing.assert_close(attn.sum(), torch.tensor(1.0))


def test_nystrom_attention_is_exact_when_every_token_is_a_landmark() -> None:
    torch.manual_seed(0)
    layer = NystromAttention(64, heads=4, landmarks=16, pinv_iters=40, dropout=0.0).eval()
    x = torch.randn(16, 64)
    out, row = layer(x, cls_row=True)
    q, k, v = layer.to_qkv(x).view(16, 3, 4, 16).permute(1, 2, 0, 3)
    attn = torch.softmax(q @ k.transpose(-1, -2) * 16**-0.5, dim=-1)
    exact = attn @ v + layer.res_conv(v[None])[0]
    expected = layer.to_out(exact.transpose(0, 1).reshape(16, 64))
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(row, attn[:, 0].mean(0), atol=1e-4, rtol=1e-4)


def test_unknown_option_is_rejected() -> None:
    with pytest.raises(UserError, match="no option.*mask_ratio.*hidden_dim"):
        create_model("abmil", in_dim=512, n_classes=2, mask_ratio=0.2)
