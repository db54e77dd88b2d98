"""wsi_pipeline.models.bimamba: GMMAMBA.md §3 block structure, init, and MambaMIL's SRMamba reordering."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wsi_pipeline.models.ssm.bimamba import BiMamba, SRMamba, stride_order, stride_restore, xavier_reinit_


def small(reverse: str = "flip", rate: int = 10, seed: int = 0) -> BiMamba:
    torch.manual_seed(seed)
    return BiMamba(24, d_state=4, reverse=reverse, rate=rate)


def test_default_block_is_gmmamba_sized():
    m = BiMamba()
    assert sum(p.numel() for p in m.parameters()) == 1_816_576
    assert m.in_proj.weight.shape == (2048, 512) and m.in_proj.bias is None
    assert m.out_proj.weight.shape == (512, 1024) and m.out_proj.bias is None
    for direction in (m.fwd, m.bwd):
        assert direction.conv1d.weight.shape == (1024, 1, 4) and direction.conv1d.bias is not None
        assert direction.x_proj.weight.shape == (32 + 2 * 16, 1024) and direction.x_proj.bias is None
        assert direction.dt_proj.weight.shape == (1024, 32) and direction.dt_proj.bias.shape == (1024,)


def test_mamba_native_init():
    m = BiMamba()
    for direction in (m.fwd, m.bwd):
        assert torch.equal(direction.A_log, torch.log(torch.arange(1.0, 17.0)).expand(1024, 16))
        assert torch.equal(direction.D, torch.ones(1024))
        assert direction.dt_proj.weight.abs().max() <= 32**-0.5
        dt = F.softplus(direction.dt_proj.bias)
        assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
        assert dt.log().std() > 0.5  # log-uniform over [log 1e-3, log 0.1] has std ~1.3
    assert not torch.equal(m.fwd.dt_proj.bias, m.bwd.dt_proj.bias)  # each direction draws its own


def test_shape_batch_independence_and_gradients_reach_both_directions():
    m = small()
    x = torch.randn(2, 13, 24)
    y = m(x)
    assert y.shape == (2, 13, 24) and y.is_contiguous()
    torch.testing.assert_close(y[1:], m(x[1:]), rtol=1e-5, atol=1e-6)
    y.square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_backward_direction_is_the_time_flip():
    """out(x) = P(F(x) + flip(G(flip x))), so swapping the two directions' parameters must give
    out_swapped(x) = flip(out(flip x)); neither half being a flip, or z not flipped, breaks this."""
    m = small()
    swapped = copy.deepcopy(m)
    swapped.fwd, swapped.bwd = swapped.bwd, swapped.fwd
    x = torch.randn(1, 11, 24)
    torch.testing.assert_close(swapped(x), m(x.flip(1)).flip(1), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(m(x), m(x.flip(1)).flip(1), atol=1e-3)  # the block itself is not symmetric


def test_directions_are_summed_through_shared_projections():
    m = small()
    x = torch.randn(1, 9, 24)
    xz = m.in_proj(x).transpose(1, 2)
    x_in, z = xz.chunk(2, dim=1)
    y_f = m.fwd(x_in, z)
    y_b = m.bwd(x_in.flip(-1), z.flip(-1)).flip(-1)
    torch.testing.assert_close(m(x), m.out_proj((y_f + y_b).transpose(1, 2)), rtol=1e-5, atol=1e-6)


def test_stride_order_reads_every_rate_th_step_with_zero_padding():
    x = torch.arange(1.0, 8.0).view(1, 1, 7)  # steps 1..7, L = 7, R = 3 -> padded to 9
    assert stride_order(x, 3).flatten().tolist() == [1, 4, 7, 2, 5, 0, 3, 6, 0]
    assert torch.equal(stride_restore(stride_order(x, 3), 3, 7), x)


@pytest.mark.parametrize("length", [23, 25, 3])
def test_srmamba_second_direction_scans_the_strided_sequence(length):
    """SRMamba with L not a multiple of R: the second branch scans x and z in the order
    x0, x5, x10, ..., x1, x6, ... (zero-padded to a multiple of 5), and its outputs go back to their steps."""
    torch.manual_seed(0)
    m = SRMamba(24, d_state=4, rate=5)
    x = torch.randn(1, length, 24)
    xz = m.in_proj(x).transpose(1, 2)
    padded = math.ceil(length / 5) * 5
    order = [i for r in range(5) for i in range(r, padded, 5)]  # original step read at each scan position
    xz_pad = F.pad(xz, (0, padded - length))
    y_scan = m.bwd(*xz_pad[..., order].chunk(2, dim=1))
    y_b = torch.zeros_like(y_scan)
    y_b[..., order] = y_scan
    expected = m.out_proj((m.fwd(*xz.chunk(2, dim=1)) + y_b[..., :length]).transpose(1, 2))
    torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-6)


def test_stride_with_rate_one_is_a_second_forward_scan():
    m = small(reverse="stride", rate=1)
    x = torch.randn(1, 6, 24)
    xz = m.in_proj(x).transpose(1, 2)
    y = m.fwd(*xz.chunk(2, dim=1)) + m.bwd(*xz.chunk(2, dim=1))
    torch.testing.assert_close(m(x), m.out_proj(y.transpose(1, 2)), rtol=1e-5, atol=1e-6)


def test_rejects_unknown_reverse_mode():
    with pytest.raises(ValueError, match="reverse"):
        BiMamba(24, reverse="shuffle")


def test_xavier_reinit_touches_linears_and_norms_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(512), BiMamba())
    with torch.no_grad():
        model[0].weight.fill_(3.0)
        model[0].bias.fill_(2.0)
    block = model[1]
    conv, a_log, d = (t.clone() for t in (block.fwd.conv1d.weight, block.bwd.A_log, block.bwd.D))
    assert xavier_reinit_(model) is model
    assert torch.equal(model[0].weight, torch.ones(512)) and torch.equal(model[0].bias, torch.zeros(512))
    for direction in (block.fwd, block.bwd):
        assert torch.equal(direction.dt_proj.bias, torch.zeros(1024))  # the Mamba dt init is gone (§7)
    w = block.in_proj.weight  # xavier-normal std = sqrt(2 / (fan_in + fan_out))
    assert abs(w.std().item() - math.sqrt(2 / (512 + 2048))) < 2e-3
    assert torch.equal(block.fwd.conv1d.weight, conv) and torch.equal(block.bwd.A_log, a_log)
    assert torch.equal(block.bwd.D, d)
