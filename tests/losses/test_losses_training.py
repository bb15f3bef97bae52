"""Each loss trains a tiny MLP on sklearn digits, centrally, in a few hundred steps.

Classification losses are judged by the test accuracy of the argmax of the logits, binary
losses (digit < 5) by the accuracy of the sign of the score (the AUC loss by the AUC, since
its scores are not calibrated at 0), embedding losses by cosine 5-NN accuracy of the test
features against the training features. HarmonicLoss is a classification loss whose
prediction is its nearest-centre ``predict``. Every loss value must also go down (except
EnsLoss, whose value is not a loss). PaLM's z-loss, an auxiliary term, is trained beside
cross-entropy.
"""

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

from fedsim.losses import build
from fedsim.losses._common import binary_scores

STEPS, BATCH = 250, 128


class TinyNet(nn.Module):
    """64 -> 128 -> feature_dim features, then a linear head."""

    def __init__(self, num_outputs, feature_dim=32, head_bias=True, relu_features=False):
        super().__init__()
        layers = [nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, feature_dim)]
        self.features = nn.Sequential(*layers, *([nn.ReLU()] if relu_features else []))
        self.head = nn.Linear(feature_dim, num_outputs, bias=head_bias)


def _augment(x, generator):
    """A view for the self-supervised losses: pixel noise and 20% of the pixels dropped."""
    noise = 0.2 * torch.randn(x.shape, generator=generator)
    keep = torch.rand(x.shape, generator=generator) > 0.2
    return (x + noise) * keep


def _train(loss, net, x_train, y_train, lr):
    generator = torch.Generator().manual_seed(1)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    history = []
    for _ in range(STEPS):
        indices = torch.randint(0, len(y_train), (BATCH,), generator=generator)
        x = x_train[indices]
        available = {"targets": y_train[indices], "indices": indices, "classifier": net.head.weight}
        if "embeddings2" in loss.inputs:
            available["embeddings"] = net.features(_augment(x, generator))
            available["embeddings2"] = net.features(_augment(x, generator))
        else:
            available["embeddings"] = net.features(x)
            available["logits"] = net.head(available["embeddings"])
        value = loss(**{key: available[key] for key in loss.inputs})
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        history.append(value.item())
    return history


def _knn_accuracy(train_features, train_labels, test_features, test_labels, k=5):
    similarity = F.normalize(test_features, dim=1) @ F.normalize(train_features, dim=1).T
    votes = train_labels[similarity.topk(k, dim=1).indices]
    return (votes.mode(dim=1).values == test_labels).float().mean().item()


def _build(name, kwargs, num_samples):
    if name in ("aldr_kl", "sogclr", "isogclr"):
        kwargs = {"num_samples": num_samples, **kwargs}
    return build(name, **kwargs)


def _assert_loss_went_down(name, history):
    if name != "ensloss":
        assert sum(history[-20:]) < sum(history[:20]), f"{name}: loss did not decrease"


CLASSIFICATION = [
    ("cross_entropy", {}),
    ("spherical_z_loss", {}),
    ("compsum", {"tau": 0.5}),
    ("compsum", {"tau": 2.0}),
    ("ldr_kl", {}),
    ("aldr_kl", {}),
    ("linear_cross_entropy", {}),
    ("harmonic", {}),
    ("dice", {}),
]


@pytest.mark.parametrize("name, kwargs", CLASSIFICATION, ids=lambda v: str(v))
def test_classification_loss_trains_digits(digits, name, kwargs):
    torch.manual_seed(0)
    loss = _build(name, kwargs, len(digits.y_train))
    assert loss.task == "classification"
    net = TinyNet(10, head_bias=name not in ("linear_cross_entropy", "harmonic"))
    history = _train(loss, net, digits.x_train, digits.y_train, lr=3e-3)
    with torch.no_grad():
        features = net.features(digits.x_test)
        if hasattr(loss, "predict"):
            predicted = loss.predict(features, net.head.weight)
        else:
            predicted = net.head(features).argmax(1)
    accuracy = (predicted == digits.y_test).float().mean().item()
    assert accuracy >= 0.9, f"{name}: test accuracy {accuracy:.3f}"
    _assert_loss_went_down(name, history)


def test_palm_z_loss_auxiliary_keeps_the_log_normaliser_small_beside_cross_entropy(digits):
    log_normalizers = {}
    for weight in (0.0, 0.1):
        torch.manual_seed(0)
        cross_entropy, auxiliary = build("cross_entropy"), build("palm_z_loss", weight=weight)
        net = TinyNet(10)
        optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
        generator = torch.Generator().manual_seed(1)
        for _ in range(STEPS):
            indices = torch.randint(0, len(digits.y_train), (BATCH,), generator=generator)
            logits = net.head(net.features(digits.x_train[indices]))
            value = cross_entropy(logits, digits.y_train[indices]) + auxiliary(logits)
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
        with torch.no_grad():
            logits = net.head(net.features(digits.x_test))
        assert (logits.argmax(1) == digits.y_test).float().mean().item() >= 0.9
        log_normalizers[weight] = torch.logsumexp(logits, dim=1).abs().mean().item()
    assert log_normalizers[0.1] < 0.5 * log_normalizers[0.0]


EMBEDDING = [
    ("multi_similarity", {}),
    ("multi_similarity", {"epsilon": 0.1}),
    ("orthogonal_projection", {}),
    ("centroid_triplet", {}),
    ("infonce", {}),
    ("sogclr", {}),
    ("isogclr", {}),
]


@pytest.mark.parametrize("name, kwargs", EMBEDDING, ids=lambda v: str(v))
def test_embedding_loss_trains_digits_features(digits, name, kwargs):
    torch.manual_seed(0)
    loss = _build(name, kwargs, len(digits.y_train))
    assert loss.task == "embedding"
    if name == "orthogonal_projection":
        # OPL is defined on non-negative (post-ReLU) features: its |mean cosine| term can be
        # cancelled by signed features; 128 dimensions leave room for 10 orthogonal classes.
        net = TinyNet(10, feature_dim=128, relu_features=True)
        lr = 1e-3
    else:
        net, lr = TinyNet(10), 3e-3
    history = _train(loss, net, digits.x_train, digits.y_train, lr=lr)
    with torch.no_grad():
        train_features, test_features = net.features(digits.x_train), net.features(digits.x_test)
    accuracy = _knn_accuracy(train_features, digits.y_train, test_features, digits.y_test)
    assert accuracy >= 0.9, f"{name}: 5-NN test accuracy {accuracy:.3f}"
    _assert_loss_went_down(name, history)


BINARY = [
    ("ensloss", {}, 3e-3),
    ("auc_mw", {}, 3e-3),
    ("dice", {}, 3e-3),
    # F1 has a trivial optimum (everything positive) that a large step size falls into.
    ("anyloss", {}, 1e-3),
    ("anyloss", {"metric": "accuracy"}, 3e-3),
    ("anyloss", {"metric": "balanced_accuracy"}, 3e-3),
]


@pytest.mark.parametrize("name, kwargs, lr", BINARY, ids=lambda v: str(v))
def test_binary_loss_trains_digit_below_five(digits, name, kwargs, lr):
    torch.manual_seed(0)
    loss = _build(name, kwargs, len(digits.y_train))
    binary_train, binary_test = (digits.y_train < 5).long(), (digits.y_test < 5).long()
    net = TinyNet(1)
    history = _train(loss, net, digits.x_train, binary_train, lr=lr)
    with torch.no_grad():
        scores = binary_scores(net.head(net.features(digits.x_test)), "test")
    if name == "auc_mw":
        auc = roc_auc_score(binary_test.numpy(), scores.numpy())
        assert auc >= 0.95, f"{name}: test AUC {auc:.3f}"
    else:
        accuracy = ((scores > 0).long() == binary_test).float().mean().item()
        assert accuracy >= 0.9, f"{name}: test accuracy {accuracy:.3f}"
    _assert_loss_went_down(name, history)
