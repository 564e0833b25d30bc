"""FID helpers: ~0 for equal sets, larger for shifted sets, cached statistics give torchmetrics' own value."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support.eval_setup import TinyFeatures, shape_samples
from torchmetrics.image.fid import FrechetInceptionDistance

from cm3leon_lightning.metrics.fid import (
    fid_resize,
    load_real_stats,
    make_fid,
    real_stats,
    reference_cache_path,
    save_real_stats,
    to_uint8_images,
)


def images(n: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.stack([s.image for s in shape_samples(n, seed=seed)])  # (n, 3, 16, 16) uint8


def test_equal_sets_give_zero_and_shifted_sets_more() -> None:
    real = images(64)
    metric = make_fid(TinyFeatures())
    metric.update(real, real=True)
    metric.update(real, real=False)
    same = float(metric.compute())
    assert abs(same) < 1e-6
    metric.reset()  # keeps the real statistics
    metric.update(255 - real, real=False)  # inverted colours
    shifted = float(metric.compute())
    metric.reset()
    metric.update(images(64, seed=1), real=False)  # other shapes, same distribution
    other = float(metric.compute())
    assert shifted > 10 * other > 0


def test_cached_statistics_give_torchmetrics_own_value(tmp_path: Path) -> None:
    real, fake = images(), images(24, seed=3)
    reference = FrechetInceptionDistance(feature=TinyFeatures())
    reference.update(real, real=True)
    reference.update(fake, real=False)
    want = float(reference.compute())

    first = make_fid(TinyFeatures())
    first.update(real[:10], real=True)
    first.update(real[10:], real=True)
    path = save_real_stats(reference_cache_path(tmp_path, "refs", first), real_stats(first))
    second = make_fid(TinyFeatures())
    load_real_stats(path, second)
    second.update(fake, real=False)
    assert float(second.compute()) == pytest.approx(want, rel=1e-9)

    other_rank = make_fid(TinyFeatures())
    load_real_stats(path, other_rank, holds_totals=False)
    assert int(other_rank.real_features_num_samples) == 0 and float(other_rank.real_features_sum.abs().sum()) == 0


def test_cache_key_depends_on_references_and_extractor(tmp_path: Path) -> None:
    a, b = make_fid(TinyFeatures(0)), make_fid(TinyFeatures(1))
    assert reference_cache_path(tmp_path, "x", a) == reference_cache_path(tmp_path, "x", make_fid(TinyFeatures(0)))
    assert reference_cache_path(tmp_path, "x", a) != reference_cache_path(tmp_path, "x", b)
    assert reference_cache_path(tmp_path, "x", a) != reference_cache_path(tmp_path, "y", a)
    # one set of weights, features of another size (Inception's 768 and 2048): two callbacks overwrote one file
    assert reference_cache_path(tmp_path, "x", a) != reference_cache_path(tmp_path, "x", make_fid(TinyFeatures(0, 4)))


def test_resize_rule_is_shorter_side_then_centre_crop() -> None:
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :10] = (255, 0, 0)
    arr[:, 10:30] = (0, 255, 0)
    arr[:, 30:] = (0, 0, 255)
    out = fid_resize(Image.fromarray(arr), 20)  # no scaling (shorter side is 20): the centre 20 columns
    assert out.shape == (3, 20, 20) and out.dtype == torch.uint8
    assert (out[1] == 255).all() and (out[0] == 0).all() and (out[2] == 0).all()
    big = fid_resize(np.full((64, 32, 3), 7, np.uint8), 16)
    assert big.shape == (3, 16, 16) and (big == 7).all()
    assert to_uint8_images(torch.tensor([-1.0, 0.0, 1.0])).tolist() == [0, 128, 255]


def test_bad_arguments_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="feature_weights_path"):
        make_fid(feature_weights_path=tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="feature_dim"):
        make_fid(feature_dim=100)
    with pytest.raises(ValueError, match="image_size"):
        fid_resize(np.zeros((4, 4, 3), np.uint8), 0)


def test_missing_torch_fidelity_is_named_not_blamed_on_the_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchmetrics' Inception needs torch-fidelity: its absence was reported as weights that could not be loaded."""
    import cm3leon_lightning.metrics.fid as fid

    def without_fidelity(**kwargs):
        raise ModuleNotFoundError("No module named 'torch_fidelity'")

    monkeypatch.setattr(fid, "FrechetInceptionDistance", without_fidelity)
    with pytest.raises(RuntimeError, match=r"needs the torch-fidelity package .*pip install torch-fidelity"):
        fid.make_fid()


def test_saved_statistics_leave_no_temporary_file(tmp_path: Path) -> None:
    path = save_real_stats(tmp_path / "ref.pt", {"real_features_sum": torch.ones(3)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.pt"] and path == tmp_path / "ref.pt"


@pytest.mark.parametrize(
    "image, shape",
    [
        (torch.zeros(1, 16, 16, dtype=torch.uint8), "(1, 16, 16)"),  # already the size: was returned as it was
        (torch.zeros(4, 20, 20, dtype=torch.uint8), "(4, 20, 20)"),
        (np.zeros((16, 16, 4), np.uint8), "(16, 16, 4)"),
        (np.zeros((20, 20), np.uint8), "(20, 20)"),
    ],
)
def test_fid_resize_needs_three_channels(image, shape: str) -> None:
    with pytest.raises(ValueError, match=re.escape(shape)):
        fid_resize(image, 16)


def test_fid_resize_converts_as_training_images_are() -> None:
    # A transparent PNG (hidden colour (10, 0, 0)) and 16-bit grey: convert("RGB") gave dark red and near-white.
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 10
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    assert (fid_resize(buf.getvalue(), 8) == 255).all()
    grey = np.full((8, 8), 1000, np.uint16)
    grey[0, 0] = 2000
    image = Image.fromarray(grey)
    assert image.mode == "I;16"
    out = fid_resize(image, 8)
    assert out[:, 0, 0].tolist() == [8] * 3 and out[:, 1, 1].tolist() == [4] * 3  # v / 257, as viewers show it


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """torch-fidelity's Inception architecture with seeded random weights, saved as a weights file (no download)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity

    with pytest.MonkeyPatch.context() as patch:  # no download, no weights: the seeded random init stays
        patch.setattr(fidelity, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *args, **kwargs: None)
        torch.manual_seed(0)
        net = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(net.state_dict(), path)
    return path


def test_inception_features_are_torch_fidelitys(random_inception: Path) -> None:
    """torchmetrics >= 1.8 resizes to 299 with antialiased PyTorch bilinear by default, not torch-fidelity's
    TF1-compatible bilinear: 256 px images got other features (a pixel differs by up to 30 of 255 after the resize),
    so the FID was not comparable with torch-fidelity's / pytorch-fid's."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    metric = make_fid(feature_weights_path=random_inception)
    batch = torch.randint(0, 256, (2, 3, 256, 256), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    ours = metric.inception(batch).reshape(2, -1)
    (fidelity,) = FeatureExtractorInceptionV3.forward(metric.inception, batch)  # torch-fidelity's own forward
    assert ours.shape == (2, 2048) and float(ours.abs().sum()) > 0
    assert torch.equal(ours, fidelity.reshape(2, -1))


def test_cache_key_depends_on_the_inception_resize(random_inception: Path, tmp_path: Path) -> None:
    """Statistics cached with the antialiased resize (before the fix) must not be reused with the TF1 resize."""
    metric = make_fid(feature_weights_path=random_inception)
    key = reference_cache_path(tmp_path, "x", metric)
    metric.inception.use_antialias = True
    assert reference_cache_path(tmp_path, "x", metric) != key


def test_weights_file_that_is_not_inception_is_named(tmp_path: Path) -> None:
    """A given weights file that does not load was reported as a download problem ("Without network access ...
    pass feature_weights_path"), not naming the file that was passed."""
    bad = tmp_path / "not-inception.pth"
    torch.save({"a": torch.zeros(1)}, bad)
    with pytest.raises(RuntimeError, match=rf"feature_weights_path: {re.escape(str(bad))} is not torch-fidelity's"):
        make_fid(feature_weights_path=bad)


@pytest.mark.parametrize("device, want", [("mps", "cpu"), ("cpu", "cpu"), ("cuda:1", "cuda:1")])
def test_fid_runs_on_the_cpu_for_apple_mps(device: str, want: str) -> None:
    """The metric's float64 sums cannot move to MPS: ``metric.to("mps")`` failed at the first evaluation."""
    from cm3leon_lightning.metrics.fid import fid_device

    assert fid_device(torch.device(device)) == torch.device(want)
    assert fid_device(device) == torch.device(want)
