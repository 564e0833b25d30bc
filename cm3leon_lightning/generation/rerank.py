"""CLIP re-ranking of generated candidates (paper section 3.1: "a re-ranking stage via CLIP"; figure 4, right).

The scorer is anything with ``embed_texts(list[str]) -> (N, D)`` and ``embed_images((N, 3, H, W) in [0, 1]) ->
(N, D)`` returning L2-normalised rows, e.g. :class:`~cm3leon_lightning.retrieval.ClipEncoder`. The score of a
candidate is the cosine similarity of its image embedding with its prompt's text embedding. This module imports no
Lightning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


class Scorer(Protocol):
    """What :func:`clip_scores` needs from a CLIP model."""

    def embed_texts(self, texts: Sequence[str]) -> object:  # (N, D) numpy array or tensor, unit rows
        """Embed captions."""

    def embed_images(self, images: Tensor) -> object:  # (N, D) numpy array or tensor, unit rows
        """Embed ``(N, 3, H, W)`` float images in ``[0, 1]``."""


@dataclass
class RerankResult:
    """The result of :func:`rerank`.

    Attributes:
        images: ``(P, keep, C, H, W)`` the best candidates per prompt, best first.
        scores: ``(P, keep)`` their CLIP scores.
        order: ``(P, keep)`` their indices among the N candidates.
        codes: ``(P, keep, h*w)`` their image codes, when codes were given.
        all_scores: ``(P, N)`` the scores of every candidate.
    """

    images: Tensor
    scores: Tensor
    order: Tensor
    codes: Tensor | None
    all_scores: Tensor


def _unit(x: object) -> Tensor:
    t = torch.as_tensor(x).float()
    return t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def clip_scores(scorer: Scorer, texts: Sequence[str], images: Tensor) -> Tensor:
    """Cosine similarity of every candidate image with its prompt.

    Args:
        scorer: a CLIP model (see module docstring).
        texts: P prompts.
        images: ``(P, N, C, H, W)`` float images in ``[-1, 1]`` (as ``VQGAN.decode`` returns them).

    Returns:
        ``(P, N)`` float32 scores in ``[-1, 1]``.
    """
    if images.ndim != 5:
        raise ValueError(f"images must be (P, N, C, H, W), got shape {tuple(images.shape)}")
    P, N = images.shape[:2]
    if isinstance(texts, str):  # its characters were taken for P prompts when the lengths happened to match
        raise ValueError(f"texts must be a list of P={P} prompts, got one string {texts[:40]!r}")
    if len(texts) != P:
        raise ValueError(f"{len(texts)} texts for {P} prompts' images; give one text per prompt")
    text = _unit(scorer.embed_texts(list(texts)))  # (P, D)
    pixels = ((images.flatten(0, 1).float() + 1) / 2).clamp(0, 1)  # (P*N, C, H, W) in [0, 1]
    image = _unit(scorer.embed_images(pixels)).view(P, N, -1)  # (P, N, D)
    return (image * text[:, None].to(image.device)).sum(-1).cpu()


def rerank(
    scorer: Scorer, texts: Sequence[str], images: Tensor, codes: Tensor | None = None, keep: int = 1
) -> RerankResult:
    """Keep the ``keep`` best of the N candidates of each prompt by CLIP score (ties: the earlier candidate; a NaN
    score, e.g. of an image decoded to NaN, ranks last).

    Args:
        scorer: a CLIP model.
        texts: P prompts.
        images: ``(P, N, C, H, W)`` candidates in ``[-1, 1]``.
        codes: optional ``(P, N, h*w)`` codes of the candidates, selected alongside.
        keep: how many to keep per prompt, ``1 <= keep <= N``.
    """
    if images.ndim != 5:
        raise ValueError(f"images must be (P, N, C, H, W), got shape {tuple(images.shape)}")
    N = images.shape[1]
    if not 1 <= keep <= max(N, 1) or N == 0:
        raise ValueError(f"keep must lie in [1, N={N}], got {keep}")
    if codes is not None and tuple(codes.shape[:2]) != tuple(images.shape[:2]):
        raise ValueError(f"codes shape {tuple(codes.shape)} does not match images' (P, N) {tuple(images.shape[:2])}")
    scores = clip_scores(scorer, texts, images)  # (P, N)
    ranked = scores.nan_to_num(nan=float("-inf"))  # a descending sort puts NaN first
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices[:, :keep]  # (P, keep)
    rows = torch.arange(scores.shape[0])[:, None]
    best_codes = None if codes is None else codes[rows.to(codes.device), order.to(codes.device)]
    return RerankResult(
        images=images[rows.to(images.device), order.to(images.device)],
        scores=scores[rows, order],
        order=order,
        codes=best_codes,
        all_scores=scores,
    )
