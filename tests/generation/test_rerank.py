"""CLIP re-ranking (paper section 3.1): the best of N candidates by cosine similarity with the prompt."""

import numpy as np
import pytest
import torch
from torch import nn

from cm3leon_lightning.generation import clip_scores, rerank

COLORS = {"red": 0, "green": 1, "blue": 2}


class ColorScorer(nn.Module):
    """A real, exact scorer with the ClipEncoder interface: a text is the one-hot of its color word, an image is its
    mean RGB; both L2-normalised (float64 numpy, as ClipEncoder returns numpy)."""

    def embed_texts(self, texts):
        z = np.zeros((len(texts), 3))
        for i, t in enumerate(texts):
            z[i, COLORS[t.split()[-1]]] = 1.0
        return z

    def embed_images(self, images: torch.Tensor):
        assert images.min() >= 0 and images.max() <= 1  # rerank hands over [0, 1] pixels
        z = images.mean(dim=(2, 3)).double()
        return (z / z.norm(dim=-1, keepdim=True)).numpy()


def solid(rgb: tuple[float, float, float], size: int = 4) -> torch.Tensor:
    """A ``(3, size, size)`` image in [-1, 1] (VQGAN.decode's range) of one colour given in [0, 1]."""
    return (torch.tensor(rgb)[:, None, None].expand(3, size, size) * 2 - 1).float()


def candidates() -> torch.Tensor:
    red, green, blue, grey = (0.9, 0.1, 0.1), (0.1, 0.8, 0.2), (0.1, 0.2, 0.9), (0.5, 0.5, 0.5)
    return torch.stack(
        [
            torch.stack([solid(c) for c in (grey, blue, red, green)]),
            torch.stack([solid(c) for c in (red, grey, blue, blue)]),
        ]
    )  # (P=2, N=4, 3, 4, 4)


def test_scores_are_cosines_of_mean_colour_with_the_prompt_colour():
    scores = clip_scores(ColorScorer(), ["a red", "a blue"], candidates())
    assert scores.shape == (2, 4)
    grey = 1 / np.sqrt(3)
    red = 0.9 / np.linalg.norm([0.9, 0.1, 0.1])
    torch.testing.assert_close(scores[0, [0, 2]], torch.tensor([grey, red], dtype=torch.float32))


def test_rerank_keeps_the_best_of_n_with_their_codes():
    images = candidates()
    codes = torch.arange(2 * 4 * 6).view(2, 4, 6)
    best = rerank(ColorScorer(), ["a red", "a blue"], images, codes, keep=1)
    assert best.order.tolist() == [[2], [2]]  # prompt 1: two equal blues, the earlier one wins
    assert torch.equal(best.images[:, 0], images[[0, 1], [2, 2]])
    assert torch.equal(best.codes[:, 0], codes[[0, 1], [2, 2]])
    two = rerank(ColorScorer(), ["a green", "a blue"], images, keep=2)
    assert two.order.tolist() == [[3, 0], [2, 3]]
    assert (two.scores[:, 0] >= two.scores[:, 1]).all() and two.codes is None
    assert torch.equal(two.all_scores, clip_scores(ColorScorer(), ["a green", "a blue"], images))


def test_rerank_errors():
    with pytest.raises(ValueError, match="keep"):
        rerank(ColorScorer(), ["a red", "a blue"], candidates(), keep=5)
    with pytest.raises(ValueError, match="one text per prompt"):
        clip_scores(ColorScorer(), ["a red"], candidates())
    with pytest.raises(ValueError, match="codes shape"):
        rerank(ColorScorer(), ["a red", "a blue"], candidates(), torch.zeros(2, 3, 6))
    # one string for P=2 prompts of 2 characters: its characters were taken for the prompts
    with pytest.raises(ValueError, match="texts must be a list of P=2 prompts, got one string 'rb'"):
        rerank(ColorScorer(), "rb", candidates())


def test_a_nan_score_ranks_last_and_a_4d_batch_is_named():
    """A descending sort puts NaN first: a candidate decoded to NaN pixels (embedded to NaN) was kept as the best.
    Images without the prompt axis were refused as 'keep must lie in [1, N=0]'."""

    class NanScorer(ColorScorer):
        def embed_images(self, images):
            z = super().embed_images(images.nan_to_num(0.5))
            z[torch.isnan(images).flatten(1).any(1).numpy()] = np.nan  # as a real CLIP embeds a NaN image
            return z

    images = candidates()
    images[0, 2] = float("nan")  # prompt 0's red candidate
    best = rerank(NanScorer(), ["a red", "a blue"], images, keep=4)
    assert best.order.tolist() == [[0, 3, 1, 2], [2, 3, 1, 0]]  # grey beats green and blue for "red"; NaN last
    assert best.all_scores[0, 2].isnan() and best.scores[0, 3].isnan()  # the score itself is reported as is
    with pytest.raises(ValueError, match=r"images must be \(P, N, C, H, W\), got shape \(4, 3, 4, 4\)"):
        rerank(ColorScorer(), ["a red"], candidates()[0])


def test_rerank_with_a_tiny_clip_encoder():
    retrieval = pytest.importorskip("cm3leon_lightning.retrieval")
    clip = retrieval.ClipEncoder("cm3leon-clip-tiny", pretrained=None)  # random weights, offline
    images = torch.rand(2, 3, 3, 32, 32) * 2 - 1
    texts = ["a red square", "two blue circles"]
    got = rerank(clip, texts, images, keep=1)
    t = clip.embed_texts(texts)
    i = clip.embed_images((images.flatten(0, 1) + 1) / 2).reshape(2, 3, -1)
    want = np.einsum("pnd,pd->pn", i, t)
    np.testing.assert_allclose(got.all_scores.numpy(), want, atol=1e-5)
    assert got.order[:, 0].tolist() == want.argmax(1).tolist()
