"""The synthetic MIL cohorts and the train-and-score loop shared by the learning tests (test_mil_*.py).

Each bag is a slide of 200–400 patches on a 256 px grid (h5 in raster order, as CLAM writes it) with N(0, I)
features; a positive bag's few signal instances are shifted along one direction. Training: Adam, one bag per
step, the model's own training loss (`bag_loss`, the trainer's path); the score is the held-out ROC-AUC.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from wsi_pipeline.models.mil import bag_loss, create_model

DIM, GRID, SHIFT = 32, 48, 5.0
N_TRAIN, N_TEST, EPOCHS, LR = 200, 60, 2, 1e-3


class Bag(NamedTuple):
    features: torch.Tensor
    coords: torch.Tensor
    label: int
    n_shifted: int


def _lattice_bag(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(features (n, DIM), coords (n, 2)) of one bag: n in [200, 400] cells of the grid, raster order."""
    n = int(rng.integers(200, 401))
    cells = np.sort(rng.choice(GRID * GRID, size=n, replace=False))
    coords = np.stack([cells % GRID, cells // GRID], axis=1) * 256
    return rng.normal(size=(n, DIM)).astype(np.float32), coords


def _direction(rng: np.random.Generator) -> np.ndarray:
    direction = rng.normal(size=DIM).astype(np.float32)
    return direction / np.linalg.norm(direction)


def clustered_cohort(seed: int = 0) -> tuple[list[Bag], list[Bag]]:
    """(train, test): a positive bag hides one small spatial cluster (1.2–2% of the bag, 3–8 patches)."""
    rng = np.random.default_rng(seed)
    direction = _direction(rng)
    bags = []
    for i in range(N_TRAIN + N_TEST):
        features, coords = _lattice_bag(rng)
        n_shifted = int(rng.uniform(0.012, 0.02) * len(features)) if i % 2 else 0
        centre = coords[rng.integers(len(coords))]
        cluster = np.argsort(((coords - centre) ** 2).sum(axis=1), kind="stable")[:n_shifted]
        features[cluster] += SHIFT * direction
        bags.append(Bag(torch.from_numpy(features), torch.from_numpy(coords), i % 2, n_shifted))
    return bags[:N_TRAIN], bags[N_TRAIN:]


def dispersed_cohort(n_train: int, positives: int, seed: int = 0) -> tuple[list[Bag], list[Bag]]:
    """(train, test): `positives` signal instances scattered at random over each positive bag (no cluster)."""
    rng = np.random.default_rng(seed)
    direction = _direction(rng)
    bags = []
    for i in range(n_train + N_TEST):
        features, coords = _lattice_bag(rng)
        count = positives if i % 2 else 0
        features[rng.choice(len(features), count, replace=False)] += SHIFT * direction
        bags.append(Bag(torch.from_numpy(features), torch.from_numpy(coords), i % 2, count))
    return bags[:n_train], bags[n_train:]


def train_and_auc(name: str, cohort: tuple[list[Bag], list[Bag]], *, epochs: int = EPOCHS, **opts: object) -> float:
    """Adam, one bag per step, the model's training loss; held-out ROC-AUC. Groups are computed once per
    bag, as the trainer caches."""
    train, test = cohort
    torch.manual_seed(0)
    model = create_model(name, in_dim=DIM, n_classes=2, **opts)
    groups = [model.make_groups(None, bag.coords.numpy()) for bag in train + test]
    optimiser = torch.optim.Adam(model.parameters(), lr=LR)
    order = np.random.default_rng(1)
    model.train()
    for _ in range(epochs):
        for i in order.permutation(len(train)):
            logits, _ = model(train[i].features, train[i].coords, groups[i])
            loss = bag_loss(model, logits, torch.tensor([train[i].label]))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()
    with torch.no_grad():
        scores = [
            torch.softmax(model(bag.features, bag.coords, groups[len(train) + j])[0], dim=-1)[0, 1].item()
            for j, bag in enumerate(test)
        ]
    return float(roc_auc_score([bag.label for bag in test], scores))
