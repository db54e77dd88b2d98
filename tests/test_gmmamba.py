"""GMMamba (GMMAMBA.md §1–§7): parameter count, masking, CSS, class token, options and edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from torch import nn

from wsi_pipeline.models.mil import bag_loss, create_model
from wsi_pipeline.models.mil.css import CrossGroupSampling
from wsi_pipeline.models.mil.gmmamba import GMMamba, mask_count

SMALL = {"d_model": 64}  # same architecture, narrower: keeps CPU tests fast


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _bag(n: int, dim: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    cells = rng.choice(40 * 40, size=n, replace=False)
    coords = np.stack([cells % 40, cells // 40], axis=1) * 256
    return torch.from_numpy(rng.normal(size=(n, dim)).astype(np.float32)), torch.from_numpy(coords)


def _model(**opts: object) -> GMMamba:
    torch.manual_seed(0)
    return create_model("gmmamba", in_dim=opts.pop("in_dim", 64), n_classes=2, **{**SMALL, **opts})


def test_parameter_count_matches_the_reference() -> None:
    torch.manual_seed(0)
    model = create_model("gmmamba", in_dim=512, n_classes=2, preset="released")
    # §10 per-part counts of the released code, minus its unused _fc1 (Linear(512, 512) = 262,656)
    imm, css, cls_and_head = 4_030_466 - 262_656, 1_048_576, 1_050_626
    assert _count(model) == imm + css + cls_and_head == 5_867_012
    assert isinstance(model.proj, nn.Identity)  # D == 512: no projection (§1)
    # the recommended preset (§14): 128-d after a Linear(512, 128) + GELU + Dropout projection
    recommended = create_model("gmmamba", in_dim=512, n_classes=2)
    assert recommended.proj[0].out_features == 128 and _count(recommended.proj) == 512 * 128 + 128
    # its own 512-d embedding, gated scorer and head (§16)
    instance_path = (512 * 512 + 512) + 2 * (512 * 128 + 128) + (128 + 1) + (512 * 2 + 2)
    # + the CSS attention scorer and the instance path
    assert _count(recommended) == 500_612 + (128 * 128 + 128) + (128 + 1) + instance_path
    assert _count(model.imm) == imm
    assert _count(model.css) == css
    assert _count(model.aggregator) + _count(model.head) == cls_and_head
    # ... and from the submodules themselves
    bimamba = 1_816_576  # §3
    layernorm = 2 * 512
    attention_mlp = (512 * 128 + 128) + (128 + 1)  # W1, b1, w2, b2
    assert _count(model.imm.mamba1) == _count(model.imm.mamba2) == bimamba
    assert _count(model.imm.mask_scorer) == _count(model.imm.pool_scorer) == attention_mlp
    assert imm == 2 * bimamba + 3 * layernorm + 2 * attention_mlp
    assert css == 4 * 512 * 512  # bias-free in/out projections
    assert cls_and_head == 512 + (512 * 1536) + (512 * 512 + 512) + (512 * 2 + 2)  # token, qkv, proj, head


@pytest.mark.parametrize(
    ("m", "ratio", "min_one", "k"),
    [
        (1, 0.2, True, 0),
        (2, 0.2, True, 1),
        (4, 0.2, True, 1),
        (5, 0.2, True, 1),
        (10, 0.2, True, 2),
        (14, 0.2, True, 2),
        (15, 0.2, True, 3),
        (10, 0.0, True, 1),
        (10, 0.0, False, 0),
        (4, 0.2, False, 0),
        (3, 0.9, True, 2),
        (100, 0.3, True, 30),
    ],
)
def test_mask_count(m: int, ratio: float, min_one: bool, k: int) -> None:
    assert mask_count(m, ratio, min_one_masked=min_one) == k


def test_masking_drops_the_k_lowest_and_keeps_original_order() -> None:
    model = _model(batch_groups=False, instance_path=False).eval()  # per-group calls, so the hooks see one group each
    features, coords = _bag(157)
    groups = model.make_groups(None, coords.numpy())
    calls: list[dict[str, torch.Tensor]] = []
    model.imm.ln_a.register_forward_hook(lambda mod, args, out: calls.append({"x": args[0][0]}))
    model.imm.mamba1.register_forward_hook(lambda mod, args, out: calls[-1].update(r1=calls[-1]["x"] + out[0]))
    model.imm.ln_b.register_forward_pre_hook(lambda mod, args: calls[-1].update(kept=args[0][0]))
    with torch.no_grad():
        _, attn = model(features, coords, groups)
    assert len(calls) == len(groups)
    for g, call in zip(groups, calls, strict=True):
        m, k = len(g), mask_count(len(g), 0.2)
        assert k == max(1, int(0.2 * m)) and m - k >= 1
        scores = model.imm.mask_scorer(model.imm.ln_s(call["r1"]))
        dropped = torch.sort(scores, stable=True).indices[:k]
        keep = np.setdiff1d(np.arange(m), dropped.numpy())  # ascending = original order
        torch.testing.assert_close(call["kept"], call["r1"][keep])  # un-normalised r1, in order
        assert (attn[g] == 0).sum() == k and (attn[g[keep]] > 0).all()


@pytest.mark.parametrize("learnable_mask", [False, True])
def test_batched_groups_equal_the_per_group_loop(learnable_mask: bool) -> None:
    """Padding all groups into one batch (each reversed within its own length for the backward scan) must
    give the released per-group computation: logits, attention and every gradient."""
    features, coords = _bag(157)
    results = []
    for batch in (False, True):
        model = _model(batch_groups=batch, learnable_mask=learnable_mask)
        groups = model.make_groups(None, coords.numpy())
        assert len({len(g) for g in groups}) > 1  # groups of different lengths: padding happens
        logits, attn = model(features, coords, groups)
        (logits[0, 1] + (attn * torch.arange(len(attn))).sum()).backward()
        results.append((logits.detach(), attn.detach(), {k: p.grad for k, p in model.named_parameters()
                                                         if p.grad is not None}))
    (l0, a0, g0), (l1, a1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a1, a0, rtol=1e-5, atol=1e-7)
    assert g0.keys() == g1.keys()
    scale = max(float(g.abs().max()) for g in g0.values())
    for name in g0:  # float rounding only
        if name.endswith("scorer.net.2.bias"):  # softmax-invariant: a true gradient of 0, noise alone
            assert (g1[name] - g0[name]).abs().max() <= 1e-5 * scale, name
        else:
            assert (g1[name] - g0[name]).abs().max() <= 1e-5 * float(g0[name].abs().max()) + 1e-6 * scale, name


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_tiny_bags_keep_at_least_one_instance_per_group(n: int) -> None:
    model = _model().eval()
    features, coords = _bag(n)
    logits, attn = model(features, coords)
    assert logits.shape == (1, 2) and torch.isfinite(logits).all()
    assert len(model.make_groups(None, coords.numpy())) == n  # N < G: one group per instance, M = 1
    assert (attn > 0).all()  # M = 1: k ≤ M − 1 = 0, nothing dropped
    torch.testing.assert_close(attn.sum(), torch.tensor(1.0))


def test_two_instance_group_drops_exactly_one() -> None:
    model = _model(instance_path=False).eval()
    features, coords = _bag(2)
    logits, attn = model(features, coords, groups=[np.array([0, 1])])
    assert sorted((attn == 0).tolist()) == [False, True]
    torch.testing.assert_close(attn.sum(), torch.tensor(1.0))


def test_attention_sums_to_one_and_is_zero_exactly_on_masked() -> None:
    model = _model(instance_path=False).eval()
    features, coords = _bag(300)
    groups = model.make_groups(None, coords.numpy())
    _, attn = model(features, coords, groups)
    assert attn.shape == (300,)
    torch.testing.assert_close(attn.sum(), torch.tensor(1.0))
    assert int((attn == 0).sum()) == sum(mask_count(len(g), 0.2) for g in groups)


def test_instance_path_attention_is_the_mean_of_both_paths() -> None:
    """With the instance path (recommended, docs/gmmamba.md §16) a masked instance keeps its instance-path
    weight, and the map still sums to 1."""
    model = _model(instance_path=True).eval()
    features, coords = _bag(300)
    _, attn = model(features, coords)
    _, group_attn = _model(instance_path=False).eval()(features, coords)
    beta = torch.softmax(model.instance_path.scorer(model.instance_path.embed(features)), dim=0)
    torch.testing.assert_close(attn, (group_attn + beta) / 2)
    torch.testing.assert_close(attn.sum(), torch.tensor(1.0))


def test_instance_loss_is_added_in_training_only_and_absent_in_released() -> None:
    """Deep supervision (`instance_loss_weight`, docs/gmmamba.md §16): the train-mode loss is CE(output) +
    w·CE(instance path's own logits); eval-mode forwards keep nothing; released and recommended (no weight)
    train with plain cross-entropy."""
    features, coords = _bag(300)
    target = torch.tensor([1])
    model = _model(instance_loss_weight=2.0).train()
    torch.manual_seed(1)  # the same dropout masks in both forwards, so the instance logits can be recomputed here
    logits, _ = model(features, coords)
    torch.manual_seed(1)
    own = F.cross_entropy(model.instance_path(features)[0], target)
    torch.testing.assert_close(bag_loss(model, logits, target), F.cross_entropy(logits, target) + 2.0 * own)
    assert own.item() > 0.1  # the added term is not negligible at init
    model.eval()(features, coords)
    assert model._forward_state is None
    recommended = _model().train()
    logits, _ = recommended(features, coords)
    assert recommended.options["instance_loss_weight"] == 0.0 and recommended._forward_state is None
    assert torch.equal(bag_loss(recommended, logits, target), F.cross_entropy(logits, target))
    released = _model(preset="released", in_dim=512, d_model=None).train()
    assert released.options["instance_loss_weight"] == 0.0 and released.instance_path is None
    features512 = torch.randn(300, 512)
    logits, _ = released(features512, coords)
    assert released._forward_state is None
    assert torch.equal(bag_loss(released, logits, target), F.cross_entropy(logits, target))


def test_instance_fusion_mean_halves_the_summed_logits() -> None:
    features, coords = _bag(200)
    summed, _ = _model().eval()(features, coords)
    mean, _ = _model(instance_fusion="mean").eval()(features, coords)
    torch.testing.assert_close(mean, summed / 2)
    assert _model(instance_path=False).options["instance_loss_weight"] == 0.0  # nothing to supervise


def test_min_one_masked_flag() -> None:
    features, coords = _bag(120)
    _, attn_quirk = _model(mask_ratio=0.0, instance_path=False).eval()(features, coords)
    _, attn_none = _model(mask_ratio=0.0, min_one_masked=False, instance_path=False).eval()(features, coords)
    assert int((attn_quirk == 0).sum()) == 10  # one per group even at M_r = 0 (§12.2)
    assert int((attn_none == 0).sum()) == 0


def test_mask_scorer_gets_no_gradient_by_default() -> None:
    model = _model().train()
    features, coords = _bag(200)
    logits, _ = model(features, coords)
    torch.nn.functional.cross_entropy(logits, torch.tensor([1])).backward()
    assert all(p.grad is None for p in model.imm.mask_scorer.parameters())
    trained = [n for n, p in model.named_parameters() if not n.startswith("imm.mask_scorer")]
    assert all(dict(model.named_parameters())[n].grad is not None for n in trained)


def test_learnable_mask_gets_gradient_without_changing_the_forward() -> None:
    features, coords = _bag(200)
    fixed, learnable = _model().eval(), _model(learnable_mask=True).eval()
    learnable.load_state_dict(fixed.state_dict())
    logits_fixed, attn_fixed = fixed(features, coords)
    logits, attn = learnable(features, coords)
    torch.testing.assert_close(logits, logits_fixed, rtol=0, atol=0)
    torch.testing.assert_close(attn, attn_fixed, rtol=0, atol=0)
    torch.nn.functional.cross_entropy(logits, torch.tensor([1])).backward()
    grads = [p.grad for p in learnable.imm.mask_scorer.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_group_order_does_not_change_logits() -> None:
    model = _model().eval()
    features, coords = _bag(250)
    groups = model.make_groups(None, coords.numpy())
    logits, attn = model(features, coords, groups)
    shuffled = [groups[i] for i in np.random.default_rng(0).permutation(len(groups))]
    logits_p, attn_p = model(features, coords, shuffled)
    torch.testing.assert_close(logits_p, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn_p, attn, atol=1e-6, rtol=1e-5)


def test_groups_default_to_coordinate_kmeans() -> None:
    model = _model().eval()
    features, coords = _bag(180)
    assert model.group_cache_key == "kmeans_G10"
    labels = KMeans(n_clusters=10, random_state=0, n_init=1).fit_predict(coords.numpy())
    reference = [np.flatnonzero(labels == g) for g in range(10)]
    torch.testing.assert_close(model(features, coords)[0], model(features, coords, reference)[0])
    grouped = _model(grouping="random", grouping_seed=3)
    assert grouped.group_cache_key == "random_G10_s3_unsorted"


def test_css_follows_equations_8_to_12() -> None:
    model = _model(preset="released").eval()
    groups = 0.2 * torch.randn(6, 64)
    sampled, q = model.css(groups)
    f_max = groups.max(0).values  # Eq 8
    torch.testing.assert_close(q, torch.softmax(groups @ f_max, 0))  # Eq 11: unscaled, no projections
    f_ca = q @ groups  # Eq 9: parameter-free, reuses Q
    mha = model.css.mha
    f_mha = mha(f_ca[None, None], groups[None], groups[None])[0][0, 0]  # Eq 10
    torch.testing.assert_close(sampled, f_ca + q[:, None] * f_mha)  # Eq 12
    assert mha.in_proj_bias is None and mha.out_proj.bias is None and mha.num_heads == 8


@pytest.mark.parametrize("layers", [1, 2])
def test_class_token_layers(layers: int) -> None:
    model = _model(cls_layers=layers).train()
    features, coords = _bag(90)
    logits, _ = model(features, coords)
    logits.sum().backward()
    assert len(model.aggregator.layers) == layers
    assert model.aggregator.layers[-1].qkv.weight.grad is not None
    assert model.aggregator.layers[0].qkv.bias is None and model.aggregator.layers[0].proj.bias is not None


def test_input_projection_for_non_512_features() -> None:
    torch.manual_seed(0)
    model = create_model("gmmamba", in_dim=384, n_classes=3)
    assert [type(m) for m in model.proj] == [nn.Linear, nn.GELU, nn.Dropout]
    assert model.proj[0].in_features == 384 and model.proj[2].p == 0.25
    features, coords = _bag(40, dim=384)
    logits, attn = model.eval()(features, coords)
    assert logits.shape == (1, 3) and attn.shape == (40,)


def test_xavier_reinit_zeroes_dt_bias_unless_native_init() -> None:
    default, native = _model(), _model(mamba_native_init=True)
    dt_biases = [m.bias for n, m in default.imm.named_modules() if "dt_proj" in n]
    native_dt = [m.bias for n, m in native.imm.named_modules() if "dt_proj" in n]
    assert len(dt_biases) == 4  # forward and backward branch of both BiMambas
    assert all(not b.any() for b in dt_biases)
    assert all((b < 0).all() for b in native_dt)  # Mamba's init: inverse softplus of dt in [1e-3, 0.1]
    assert all(not lin.bias.any() for lin in default.imm.pool_scorer.net if isinstance(lin, nn.Linear))


def test_association_options() -> None:
    """§14: released Q = softmax(F·f_max) is peaked on LayerNorm-scale vectors; scaled_dot divides by √d;
    attention (the recommended preset's) is a learned scorer over the group vectors."""
    groups = torch.nn.functional.layer_norm(torch.randn(10, 64), (64,))
    released = _model(preset="released").eval().css(groups)[1]
    scaled = _model(css_association="scaled_dot").eval().css(groups)[1]
    torch.testing.assert_close(scaled, torch.softmax(groups @ groups.max(0).values / 8.0, 0))
    assert released.max() > 0.5 > scaled.max()
    model = _model().eval()
    assert model.options["css_association"] == "attention"
    torch.testing.assert_close(model.css(groups)[1], torch.softmax(model.css.scorer(groups), 0))


@pytest.mark.parametrize("options", [{"use_imm": False}, {"use_css": False}, {"css_variant": "cmax"},
                                     {"css_variant": "q"}, {"css_variant": "cca"}, {"css_variant": "cca_q"},
                                     {"css_variant": "cmha"}, {"css_variant": "cmha_q", "preset": "released"}])
def test_ablations_give_slide_logits_and_attention(options: dict[str, object]) -> None:
    """§15: every ablation is a working model whose attention is a distribution over the bag."""
    model = _model(**options).train()
    features, coords = _bag(90)
    logits, attention = model(features, coords)
    logits.sum().backward()
    assert logits.shape == (1, 2) and attention.shape == (90,)
    attention = attention.detach()
    assert attention.min() >= 0 and float(attention.sum()) == pytest.approx(1.0, abs=1e-5)
    assert all(p.grad is not None for p in model.head.parameters())


def test_ablation_parameter_counts() -> None:
    """BMP is one residual BiMamba + LayerNorm per group (no masking, no attention pooling); CSS without
    CMHA loses exactly the bias-free MHA (4 d²); CMax alone, or no CSS, also the association scorer."""
    full = _n_params(_model())
    d = SMALL["d_model"]
    mha, scorer = 4 * d * d, _n_params(_model().css.scorer)
    for variant in ("q", "cca", "cca_q"):
        assert _n_params(_model(css_variant=variant)) == full - mha
    for variant in ("cmha", "cmha_q"):
        assert _n_params(_model(css_variant=variant)) == full
    assert _n_params(_model(css_variant="cmax")) == _n_params(_model(use_css=False)) == full - mha - scorer
    bimamba = _n_params(_model().imm.mamba1)
    scorers = _n_params(_model().imm.mask_scorer) + _n_params(_model().imm.pool_scorer)
    assert _n_params(_model(use_imm=False)) == full - bimamba - scorers - 2 * 2 * d


def test_css_variants_are_the_parts_of_eq_12() -> None:
    """§15: the CSS table's rows, each a part of F_sgr = f_ca + Q_g·f_mha (Eq 8–12, released association);
    "×Q" weights a part by each group's Q_g (G tokens), a part without it is one token."""
    f = torch.nn.functional.layer_norm(torch.randn(10, 64, generator=torch.Generator().manual_seed(0)), (64,))
    f_max = f.max(0).values
    q = torch.softmax(f @ f_max, 0)  # Eq 11, unscaled
    f_ca = q @ f  # Eq 9
    torch.manual_seed(0)
    full = CrossGroupSampling(64, association="dot")
    f_mha = full.mha(f_ca[None, None], f[None], f[None])[0][0, 0]  # Eq 10
    expected = {"cmax": f_max[None], "q": q[:, None] * f, "cca": f_ca[None], "cca_q": q[:, None] * f_ca,
                "cmha": f_mha[None], "cmha_q": q[:, None] * f_mha, "full": f_ca + q[:, None] * f_mha}
    for variant, tokens in expected.items():
        torch.manual_seed(0)  # the same MHA weights as `full` for the variants that have one
        got, weights = CrossGroupSampling(64, association="dot", variant=variant)(f)
        torch.testing.assert_close(got, tokens, msg=variant)
        if variant != "cmax":
            torch.testing.assert_close(weights, q, msg=variant)


def test_random_grouping_keeps_the_random_order_inside_groups() -> None:
    """§15: as released, a random group lists its instances in the permutation's order, not sorted."""
    groups = _model(grouping="random").make_groups(None, np.zeros((200, 2)))
    assert sorted(np.concatenate(groups).tolist()) == list(range(200))
    assert any((np.diff(g) < 0).any() for g in groups)


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
