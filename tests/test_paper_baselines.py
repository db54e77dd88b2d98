"""ACMIL, CLAM-SB and DSMIL (docs/baselines.md): sizes, forward contract, their training losses, the trainer hook.

Learning on a separable cohort is in tests/test_mil_learning.py (same cohort as the other models).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wsi_pipeline.models.mil import bag_loss, create_model
from wsi_pipeline.models.mil.acmil import mean_pairwise_cosine, top_k_mask
from wsi_pipeline.models.mil.clam import smooth_top1_svm
from wsi_pipeline.stages.train.bags import Bag
from wsi_pipeline.stages.train.folds import FoldData, train_epoch

MODELS = ["acmil", "clam_sb", "dsmil"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _bag(n: int, dim: int = 512, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_match_the_official_models() -> None:
    """D = 512, C = 2, default options; the official counts come from instantiating the released classes
    (ACMIL_GA(n_token=5) with D_feat 512 / D_inner 256, CLAM_SB(size "small", embed_dim=512), DSMIL's
    MILNet(FCLayer(512, 2), BClassifier(512, 2))) and agree with the layer arithmetic:

    ACMIL   512·256 (no bias) + 2·(256·128 + 128) + (128·5 + 5) + 5·(256·2 + 2) + (256·2 + 2)
          = 131072 + 65792 + 645 + 2570 + 514 = 200593
    CLAM-SB (512·512 + 512) + 2·(512·256 + 256) + (256 + 1) + (512·2 + 2) + 2·(512·2 + 2)
          = 262656 + 262656 + 257 + 1026 + 2052 = 528647
    DSMIL   (512·1 + 1) + (512·128 + 128) + (128·128 + 128) + (1·1·512 + 1)
          = 513 + 65664 + 16512 + 513 = 83202   (one binary output: MILNet(FCLayer(512, 1), BClassifier(512, 1)))
    DSMIL   (512·2 + 2) + (512·128 + 128) + (128·128 + 128) + (2·2·512 + 2)
          = 1026 + 65664 + 16512 + 2050 = 85252   (binary_single_output: false, two one-hot outputs)
    """
    counts = {name: _n_params(create_model(name, in_dim=512, n_classes=2)) for name in MODELS}
    assert counts == {"acmil": 200_593, "clam_sb": 528_647, "dsmil": 83_202}
    assert _n_params(create_model("dsmil", in_dim=512, n_classes=2, binary_single_output=False)) == 85_252


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("n", [1, 2, 3000])
def test_forward_contract_and_attention(name: str, n: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, in_dim=512, n_classes=3)
    for mode in (model.train, model.eval):
        mode()
        logits, attn = model(_bag(n), None)
        assert logits.shape == (1, 3) and torch.isfinite(logits).all()
        assert attn.shape == (n,) and (attn >= 0).all()
        torch.testing.assert_close(attn.sum(), torch.tensor(1.0))
    assert model.make_groups(None, None) is None and model.group_cache_key is None


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("n_classes", [2, 4])
def test_training_loss_is_finite_and_reaches_every_parameter(name: str, n_classes: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, in_dim=64, n_classes=n_classes).train()
    logits, _ = model(_bag(40, dim=64), None)
    loss = bag_loss(model, logits, torch.tensor([n_classes - 1]))
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert loss.item() != pytest.approx(F.cross_entropy(logits, torch.tensor([n_classes - 1])).item())
    loss.backward()
    missing = [p_name for p_name, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    # CLAM without subtyping (its default) trains only the bag class's instance classifier, as released
    others = [f"instance_classifiers.{c}.{w}" for c in range(n_classes - 1) for w in ("weight", "bias")]
    assert missing == (others if name == "clam_sb" else []), f"parameters without gradient: {missing}"


@pytest.mark.parametrize("name", MODELS)
def test_training_loss_needs_the_train_forward_of_the_bag(name: str) -> None:
    model = create_model(name, in_dim=16, n_classes=2)
    logits, _ = model.eval()(_bag(20, dim=16), None)
    with pytest.raises(RuntimeError, match="train-mode forward"):
        model.training_loss(logits, torch.tensor([0]))
    logits, _ = model.train()(_bag(20, dim=16), None)
    model.training_loss(logits, torch.tensor([0]))
    with pytest.raises(RuntimeError, match="train-mode forward"):  # used once: the graph is released
        model.training_loss(logits, torch.tensor([0]))


@pytest.mark.parametrize("name", MODELS)
def test_eval_is_deterministic_and_permutation_invariant(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, in_dim=32, n_classes=2).eval()
    features, perm = _bag(300, dim=32), torch.randperm(300)
    logits, attn = model(features, None)
    again, attn_again = model(features, None)
    assert torch.equal(logits, again) and torch.equal(attn, attn_again)
    logits_p, attn_p = model(features[perm], None)
    torch.testing.assert_close(logits_p, logits)
    torch.testing.assert_close(attn_p, attn[perm])


# ---------------------------------------------------------------- ACMIL


def test_stkim_masks_a_random_part_of_each_rows_top_k() -> None:
    scores = torch.randn(5, 200, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    masked = top_k_mask(scores, 10, 0.6)
    top10 = scores.topk(10, dim=1).indices
    hit = masked == -1e9
    assert hit.sum(1).tolist() == [6] * 5  # ⌊10 · 0.6⌋ per branch
    for row in range(5):
        assert set(hit[row].nonzero().flatten().tolist()) <= set(top10[row].tolist())
    assert torch.equal(masked[~hit], scores[~hit])
    assert not torch.equal(top_k_mask(scores, 10, 0.6), masked)  # a fresh random choice each call
    assert torch.equal(top_k_mask(scores[:, :1], 10, 0.6), scores[:, :1])  # ⌊1 · 0.6⌋ = 0: nothing masked
    assert top_k_mask(scores[:, :4], 10, 0.6).eq(-1e9).sum(1).tolist() == [2] * 5  # k = min(10, N)


def test_acmil_masks_only_in_training() -> None:
    torch.manual_seed(0)
    model = create_model("acmil", in_dim=32, n_classes=2)
    features = _bag(100, dim=32)
    model.eval()
    _, attn = model(features, None)
    model.train()
    _, attn_b = model(features, None)
    _, attn_a = model(features, None)
    branch_alpha = model._forward_state.attention  # (5, 100)
    assert not torch.allclose(attn_a, attn_b)  # STKIM draws new instances each step
    assert (branch_alpha < 1e-30).sum(1).tolist() == [6] * 5  # each branch's masked top instances get none
    assert (attn > 1e-6).all()


def test_acmil_diversity_is_the_mean_pairwise_cosine() -> None:
    maps = torch.softmax(torch.randn(4, 30, generator=torch.Generator().manual_seed(1)), dim=1)
    pairs = [F.cosine_similarity(maps[i], maps[j], dim=0) for i in range(4) for j in range(i + 1, 4)]
    torch.testing.assert_close(mean_pairwise_cosine(maps), torch.stack(pairs).mean())
    assert mean_pairwise_cosine(torch.eye(3)).item() == 0.0
    torch.testing.assert_close(mean_pairwise_cosine(maps[:1].expand(3, -1)), torch.tensor(1.0))


def test_acmil_loss_adds_branch_and_diversity_terms() -> None:
    torch.manual_seed(0)
    single = create_model("acmil", in_dim=32, n_classes=2, branches=1).train()
    logits, _ = single(_bag(50, dim=32), None)
    target = torch.tensor([1])
    torch.testing.assert_close(single.training_loss(logits, target), F.cross_entropy(logits, target))
    model = create_model("acmil", in_dim=32, n_classes=2).train()
    logits, _ = model(_bag(50, dim=32), None)
    branch_logits, alpha = model._forward_state
    expected = (F.cross_entropy(logits, target) + F.cross_entropy(branch_logits, target.expand(5))
                + mean_pairwise_cosine(alpha))
    torch.testing.assert_close(model.training_loss(logits, target), expected)


# ---------------------------------------------------------------- CLAM-SB


def test_clam_without_clustering_is_plain_cross_entropy() -> None:
    torch.manual_seed(0)
    for options in ({"inst_cluster": False}, {"bag_weight": 1.0}):
        model = create_model("clam_sb", in_dim=32, n_classes=2, **options).train()
        logits, _ = model(_bag(50, dim=32), None)
        loss = model.training_loss(logits, torch.tensor([0]))
        torch.testing.assert_close(loss, F.cross_entropy(logits, torch.tensor([0])))


@pytest.mark.parametrize("subtyping", [True, False])
def test_clam_instance_loss_uses_the_most_and_least_attended_instances(subtyping: bool) -> None:
    torch.manual_seed(0)
    model = create_model("clam_sb", in_dim=8, n_classes=3, k_sample=2, inst_loss="ce", subtyping=subtyping)
    h = torch.randn(10, 512)
    alpha = torch.softmax(torch.arange(10.0), dim=0)  # instance 9 most attended, 0 least
    loss = model.instance_loss((h, alpha), label=1)
    clf = model.instance_classifiers
    in_class = F.cross_entropy(clf[1](h[[9, 8, 0, 1]]), torch.tensor([1, 1, 0, 0]))
    if subtyping:  # the other classes learn that the top-2 are not theirs; the mean over the 3 classes
        out = [F.cross_entropy(clf[c](h[[9, 8]]), torch.tensor([0, 0])) for c in (0, 2)]
        torch.testing.assert_close(loss, (in_class + out[0] + out[1]) / 3)
    else:
        torch.testing.assert_close(loss, in_class)


def test_clam_small_bags() -> None:
    torch.manual_seed(0)
    model = create_model("clam_sb", in_dim=8, n_classes=2).train()
    logits, _ = model(_bag(1, dim=8), None)  # no pair of top/bottom instances: bag term only
    torch.testing.assert_close(model.training_loss(logits, torch.tensor([1])),
                               0.7 * F.cross_entropy(logits, torch.tensor([1])))
    logits, _ = model(_bag(5, dim=8), None)  # k = ⌊5 / 2⌋ = 2 instead of 8
    assert torch.isfinite(model.training_loss(logits, torch.tensor([1])))


def test_smooth_top1_svm_is_a_margin_log_sum_exp() -> None:
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    delta = 1.0 - F.one_hot(y, 2).float()
    reference = torch.logsumexp(x + delta - x.gather(1, y[:, None]), dim=1).mean()
    torch.testing.assert_close(smooth_top1_svm(x, y), reference)
    far = torch.tensor([[50.0, 0.0], [0.0, 50.0]])  # scores far apart: the hard hinge max(0, 1 + x_j - x_y)
    torch.testing.assert_close(smooth_top1_svm(far, torch.tensor([1, 1])), torch.tensor((51.0 + 0.0) / 2))


# ---------------------------------------------------------------- DSMIL


def test_dsmil_critical_instance_and_distance_attention() -> None:
    torch.manual_seed(0)
    model = create_model("dsmil", in_dim=16, n_classes=2, binary_single_output=False).eval()
    features = _bag(60, dim=16)
    logits, attn = model(features, None)
    instance_logits = model.instance_classifier(features)
    q = model.query(features)
    c = int(logits.argmax())
    critical = int(instance_logits[:, c].argmax())
    expected = torch.softmax(q @ q[critical] / 128**0.5, dim=0)
    torch.testing.assert_close(attn, expected)
    bag = torch.softmax(q @ q[instance_logits.argmax(0)].T / 128**0.5, dim=0).T @ features  # (C, D)
    torch.testing.assert_close(logits[0], (model.bag_classifier.weight * bag).sum((1, 2)) + model.bag_classifier.bias)


def test_dsmil_loss_is_half_bag_half_max_instance() -> None:
    torch.manual_seed(0)
    features, target = _bag(30, dim=16), torch.tensor([1])
    for loss_name in ("bce", "ce"):
        model = create_model("dsmil", in_dim=16, n_classes=2, loss=loss_name, binary_single_output=False).train()
        logits, _ = model(features, None)
        max_logits = model.instance_classifier(features).max(0).values[None]
        if loss_name == "bce":
            one_hot = torch.tensor([[0.0, 1.0]])
            bce = F.binary_cross_entropy_with_logits
            expected = 0.5 * bce(logits, one_hot) + 0.5 * bce(max_logits, one_hot)
        else:
            expected = 0.5 * F.cross_entropy(logits, target) + 0.5 * F.cross_entropy(max_logits, target)
        torch.testing.assert_close(model.training_loss(logits, target), expected)


def test_dsmil_binary_single_output() -> None:
    """Two classes, default: one output z for the second class (the release's `--num_classes=1`): one critical
    instance, logits [0, z] (softmax = [1 − σ(z), σ(z)]), loss 0.5·BCE(z, y) + 0.5·BCE(max instance score, y)."""
    torch.manual_seed(0)
    model = create_model("dsmil", in_dim=16, n_classes=2).train()
    features = _bag(40, dim=16)
    logits, attn = model(features, None)
    scores = model.instance_classifier(features)[:, 0]
    q = model.query(features)
    torch.testing.assert_close(attn, torch.softmax(q @ q[int(scores.argmax())] / 128**0.5, dim=0))
    z = (model.bag_classifier.weight[0, 0] * (attn @ features)).sum() + model.bag_classifier.bias[0]
    torch.testing.assert_close(logits, torch.stack([torch.zeros(()), z])[None])
    for label in (0, 1):
        y = torch.tensor([float(label)])
        bce = F.binary_cross_entropy_with_logits
        expected = 0.5 * bce(z[None], y) + 0.5 * bce(scores.max()[None], y)
        model(features, None)
        torch.testing.assert_close(model.training_loss(logits, torch.tensor([label])), expected)
    assert create_model("dsmil", in_dim=16, n_classes=3).instance_classifier.out_features == 3


def test_dsmil_weights_are_orthogonal_and_biases_zero() -> None:
    model = create_model("dsmil", in_dim=256, n_classes=2)
    w = model.query[0].weight  # (128, 256): orthonormal rows
    torch.testing.assert_close(w @ w.T, torch.eye(128), atol=1e-5, rtol=0)
    assert all(not m.bias.any() for m in model.modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv1d))


# ---------------------------------------------------------------- the trainer uses the model's loss


def test_train_epoch_minimises_the_models_training_loss() -> None:
    torch.manual_seed(0)
    model = create_model("dsmil", in_dim=16, n_classes=2)  # train mode is deterministic (no dropout)
    bags = {f"s{i}": Bag(f"s{i}", _bag(20 + i, dim=16, seed=i), torch.zeros(20 + i, 2, dtype=torch.long), None)
            for i in range(4)}
    labels = {sid: i % 2 for i, sid in enumerate(bags)}
    data = FoldData(train=list(bags), val=[], test=[], labels=labels, bags=bags)
    frozen = torch.optim.SGD(model.parameters(), lr=0.0)
    mean_loss = train_epoch(model, frozen, data, generator=torch.Generator().manual_seed(0),
                            device=torch.device("cpu"))
    own, ce = [], []
    for sid, bag in bags.items():
        logits, _ = model(bag.features, None)
        target = torch.tensor([labels[sid]])
        ce.append(F.cross_entropy(logits, target).item())
        own.append(model.training_loss(logits, target).item())
    assert mean_loss == pytest.approx(sum(own) / 4, rel=1e-6)
    assert mean_loss != pytest.approx(sum(ce) / 4, rel=1e-3)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("acmil", {"mask_drop": 1.0}, r"mask_drop must be in \[0, 1\)"),
        ("clam_sb", {"inst_loss": "hinge"}, "inst_loss must be 'svm' or 'ce'"),
        ("dsmil", {"loss": "mse"}, "loss must be 'bce' or 'ce'"),
    ],
)
def test_bad_options_are_rejected(name: str, options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_model(name, in_dim=16, n_classes=2, **options)


# ---------------------------------------------------------------- defaults = the official defaults
# The values below were read from the official repositories (file named in each comment); wsip's defaults
# must equal them, and our earlier choices stay available as the options named in docs/baselines.md.


def test_clam_defaults_are_the_official_ones() -> None:
    """mahmoodlab/CLAM main.py: `--subtyping` store_true (default False); `--inst_loss` default None, which
    utils/core_utils.py turns into nn.CrossEntropyLoss; `--B 8`; `--bag_weight 0.7`; `--drop_out 0.25`;
    `--model_size small` = embed 512, attention 256 (models/model_clam.py). models/model_clam.py keeps
    PyTorch's init since commit d613a3d (2024-04); before, utils/utils.py `initialize_weights`:
    `xavier_normal_` on every Linear weight, biases zero (our `init: xavier`)."""
    torch.manual_seed(0)
    model = create_model("clam_sb", in_dim=1024, n_classes=2)
    assert (model.subtyping, model.inst_loss, model.k_sample, model.bag_weight) == (False, "ce", 8, 0.7)
    assert (model.embed[0].out_features, model.attention.V.out_features, model.embed[2].p) == (512, 256, 0.25)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert all(m.bias.any() for m in linears)  # PyTorch's default init: uniform biases
    xavier = create_model("clam_sb", in_dim=1024, n_classes=2, init="xavier")
    assert all(not m.bias.any() for m in xavier.modules() if isinstance(m, torch.nn.Linear))
    assert float(xavier.embed[0].weight.detach().std()) == pytest.approx((2 / (1024 + 512)) ** 0.5, rel=0.02)
    assert float(model.embed[0].weight.detach().std()) == pytest.approx((1 / (3 * 1024)) ** 0.5, rel=0.02)


def test_dsmil_defaults_are_the_official_ones() -> None:
    """binli123/dsmil-wsi README.md runs the binary Camelyon16 task with `--num_classes=1` ("for a binary
    classification (positive/negative), this is set to 1"): train_tcga.py then builds FCLayer(feats, 1) and
    BClassifier(feats, 1) (one instance score, one critical instance) and trains BCE on the 0/1 label;
    dsmil.py's BClassifier: q = Linear(D, 128) + ReLU + Linear(128, 128) + Tanh, v = Identity
    (passing_v=False); train_tcga.py `apply_sparse_init`: orthogonal weights, zero biases."""
    model = create_model("dsmil", in_dim=512, n_classes=2)
    assert (model.instance_classifier.out_features, model.bag_classifier.in_channels) == (1, 1)
    assert [type(m).__name__ for m in model.query] == ["Linear", "ReLU", "Linear", "Tanh"]
    assert model.query[0].out_features == model.query[2].out_features == 128 and model.loss == "bce"
    previous = create_model("dsmil", in_dim=512, n_classes=2, binary_single_output=False)
    assert previous.instance_classifier.out_features == 2  # the two-class TCGA lung setting (--num_classes 2)


@pytest.mark.parametrize(("in_dim", "hidden"), [(384, 128), (512, 256), (768, 384), (1024, 512), (1536, 768)])
def test_acmil_defaults_are_the_official_ones(in_dim: int, hidden: int) -> None:
    """dazhangyu123/ACMIL Step3_WSI_classification_ACMIL.py sets D_inner from the features: medical_ssl (ViT-S,
    384) -> 128, natural_supervised (ResNet18, 512) -> 256, CLIP-B 512 -> 256, CLIP-L 768 -> 384, UNI 1024 ->
    512, GigaPath 1536 -> 768; README.md's ACMIL command: `--n_token 5 --n_masked_patch 10 --mask_drop 0.6`;
    architecture/transformer.py ACMIL_GA(D=128): gated attention hidden 128."""
    model = create_model("acmil", in_dim=in_dim, n_classes=2)
    assert model.embed[0].out_features == hidden and model.embed[0].bias is None
    assert (len(model.branch_classifiers), model.mask_top_k, model.mask_drop) == (5, 10, 0.6)
    assert model.attention.V.out_features == 128
    assert create_model("acmil", in_dim=384, n_classes=2, hidden_dim=192).embed[0].out_features == 192  # before
