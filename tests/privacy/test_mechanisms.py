"""The mechanisms' math: clipping bounds every update, the noise has the calibrated std, the
central aggregate is DP-FedAvg's, adaptive clipping tracks its quantile."""

import hashlib
import math
import struct

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from scipy import stats

from fedsim.config import validate_config
from fedsim.preflight import preflight
from fedsim.privacy.mechanisms import (
    adaptive_clip_norm,
    aggregate_noise_std,
    clip_rows,
    update_noise_multiplier,
)
from fedsim.privacy.noise import gaussian_noise, gaussian_noise_rows
from fedsim.privacy.server import ServerPrivacy
from fedsim.privacy.settings import delta_warning
from fedsim.strategies.replies import ClientUpdate


def test_clipped_rows_never_exceed_the_clip_norm_and_short_rows_stay():
    rows = torch.randn(200, 50, generator=torch.Generator().manual_seed(0)) * torch.logspace(-2, 2, 200)[:, None]
    clipped, norms = clip_rows(rows, 1.5)
    assert (clipped.norm(dim=1) <= 1.5 * (1 + 1e-6)).all()
    short = norms <= 1.5
    assert torch.equal(clipped[short], rows[short])
    assert torch.allclose(clipped[~short].norm(dim=1), torch.full(((~short).sum(),), 1.5))


def test_noise_has_the_calibrated_std_and_is_normal():
    draws = gaussian_noise(200_000, 0.7, "test", 0).numpy()
    se = 0.7 / math.sqrt(2 * len(draws))  # the standard error of a sample std
    assert abs(draws.std() - 0.7) < 4 * se
    assert abs(draws.mean()) < 4 * 0.7 / math.sqrt(len(draws))
    assert stats.kstest(draws / 0.7, "norm").pvalue > 1e-3


def test_noise_is_reproducible_under_its_key_and_differs_between_keys():
    assert torch.equal(gaussian_noise(101, 1.0, 7, "central", 3), gaussian_noise(101, 1.0, 7, "central", 3))
    assert not torch.equal(gaussian_noise(101, 1.0, 7, "central", 3), gaussian_noise(101, 1.0, 8, "central", 3))


def _reference_noise(numel, std, *key):
    """The module docstring's formula, one draw at a time: AES-256-CTR under SHA-256 of the key,
    Box-Muller of a 52-bit u1 (the pairs' first words) and a 23-bit angle (their second words)."""
    pairs = (numel + 1) // 2
    digest = hashlib.sha256("/".join(str(part) for part in key).encode()).digest()
    stream = Cipher(algorithms.AES(digest), modes.CTR(bytes(16))).encryptor().update(bytes(16 * pairs))
    words = struct.unpack(f"<{2 * pairs}Q", stream)
    radius = [math.sqrt(-2 * math.log(1 - (w >> 12) / 2**52)) for w in words[:pairs]]
    angle = [2 * math.pi * ((w & 0xFFFFFFFF) >> 9) / 2**23 for w in words[pairs:]]
    return [std * v for v in [r * math.cos(a) for r, a in zip(radius, angle)] +
            [r * math.sin(a) for r, a in zip(radius, angle)]][:numel]


def test_noise_is_the_documented_keystream_transform_row_by_row():
    keys = [("privacy", 3, "dp-sgd", 1, client, 0) for client in (4, 17, 2)]
    rows = gaussian_noise_rows(7, 0.5, keys)
    for key, row in zip(keys, rows, strict=True):
        assert row.tolist() == pytest.approx(_reference_noise(7, 0.5, *key), rel=1e-5, abs=1e-6)
        assert torch.equal(row, gaussian_noise(7, 0.5, *key))  # a row does not depend on the other rows


def test_aggregate_noise_std_by_hand():
    assert aggregate_noise_std(0.5, 1.2, 10) == pytest.approx(1.2 * 0.5 / 10)
    assert aggregate_noise_std(0.5, 1.2, 10, replace_one=True) == pytest.approx(2 * 1.2 * 0.5 / 10)


def _privacy(**privacy):
    cfg = validate_config({"partition": {"num_clients": 40}, "participation": {"model": "bernoulli", "p_low": 0.25,
                                                                                  "p_high": 0.25},
                           "privacy": {"mechanism": "central", **privacy}})
    return ServerPrivacy(cfg, [10] * 40)


def test_central_aggregate_is_the_clipped_sum_over_expected_clients_plus_the_calibrated_noise():
    privacy = _privacy(noise_multiplier=1.3, clip_norm=0.5)
    updates = [ClientUpdate(i, 5, torch.full((20_000,), float(i + 1)), 0) for i in range(4)]
    noisy = privacy.aggregate(1, updates).double()
    clipped = sum(torch.full((20_000,), 0.5 / math.sqrt(20_000)) for _ in range(4))
    residual = (noisy - clipped / 10).numpy()  # m = 0.25 * 40
    assert privacy.noise_std() == pytest.approx(1.3 * 0.5 / 10)
    assert privacy.sum_noise_std() == pytest.approx(1.3 * 0.5)
    assert abs(residual.std() - privacy.noise_std()) < 4 * privacy.noise_std() / math.sqrt(2 * len(residual))
    assert torch.equal(privacy.aggregate(1, updates), privacy.aggregate(1, updates))  # same round, same noise


def test_adaptive_split_keeps_the_accounted_noise_multiplier():
    z, sigma_b = 1.0, 2.0
    z_updates = update_noise_multiplier(z, sigma_b)
    assert (z_updates**-2 + (2 * sigma_b) ** -2) ** -0.5 == pytest.approx(z)
    with pytest.raises(ValueError, match="must exceed"):
        update_noise_multiplier(1.0, 0.4)


def test_adaptive_clipping_tracks_its_quantile():
    norms = np.random.default_rng(0).lognormal(0.0, 0.5, size=2000)
    for quantile in (0.3, 0.5, 0.8):
        clip = 0.1
        for _ in range(400):
            clip = adaptive_clip_norm(clip, float((norms <= clip).mean()), quantile, 0.2)
        assert float((norms <= clip).mean()) == pytest.approx(quantile, abs=0.03)


def test_adaptive_clipping_of_the_central_mechanism_tracks_the_median_through_its_noisy_count():
    privacy = _privacy(noise_multiplier=1.0, clipping="adaptive", clip_norm=0.05, count_noise_multiplier=1.0)
    generator = torch.Generator().manual_seed(1)
    for rnd in range(1, 300):
        updates = [ClientUpdate(i, 1, torch.randn(8, generator=generator) * (0.5 + i / 10), 0) for i in range(10)]
        privacy.aggregate(rnd, updates)
    norms = torch.stack([torch.randn(8, generator=generator) * (0.5 + i / 10) for i in range(10) for _ in range(50)])
    assert float((norms.norm(dim=1) <= privacy.clip_norm).double().mean()) == pytest.approx(0.5, abs=0.1)


def test_a_delta_not_below_one_over_the_clients_is_one_warning_line_at_validate(caplog, tmp_path):
    cfg = validate_config({"partition": {"num_clients": 10}, "output": {"dir": str(tmp_path)},
                           "privacy": {"mechanism": "central", "noise_multiplier": 1.0, "delta": 0.2}})
    with caplog.at_level("WARNING"):
        preflight(cfg)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "privacy.delta" in warnings[0] and "10 clients" in warnings[0]
    assert delta_warning(cfg.model_copy(update={"privacy": cfg.privacy.model_copy(update={"delta": 0.05})}),
                         [5] * 10) is None
