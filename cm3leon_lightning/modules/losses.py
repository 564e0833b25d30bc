"""The loss figures of :class:`~cm3leon_lightning.modules.cm3leon.CM3LeonModule`: next-token cross-entropy over the
non-pad targets, split into text and image targets, and the sums that make validation and test figures per scored
token of the epoch. Pure tensor functions; the module's ``compute_loss`` and logging call them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from cm3leon_lightning.tokenization.vocab import PAD_ID

__all__ = ["EVAL_PARTS", "epoch_losses", "eval_sums", "next_token_losses", "step_parts"]

# Each logged loss with the count of targets it averages over.
EVAL_PARTS = (("loss", "tokens"), ("loss_text", "tokens_text"), ("loss_image", "tokens_image"))


def next_token_losses(logits: Tensor, targets: Tensor, n_text: int | None) -> dict[str, Tensor]:
    """Cross-entropy of ``logits`` ``(B, T, V)`` against ``targets`` ``(B, T)``, ``PAD_ID`` targets ignored.

    Returns:
        ``loss`` (mean over the non-pad targets) and ``tokens`` (their count); with ``n_text`` (the vocabulary's
        text ids are ``< n_text``, image ids above) also ``loss_text``, ``loss_image`` (0 without such targets) and
        their counts ``tokens_text``, ``tokens_image``.
    """
    per_token = F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=PAD_ID, reduction="none"
    ).view_as(targets)  # (B, T-1)
    valid = targets != PAD_ID
    n_valid = valid.sum()
    out = {"loss": per_token.sum() / n_valid.clamp(min=1), "tokens": n_valid}
    if n_text is not None:
        is_image = valid & (targets >= n_text)
        is_text = valid & (targets < n_text)
        out["loss_text"] = (per_token * is_text).sum() / is_text.sum().clamp(min=1)
        out["loss_image"] = (per_token * is_image).sum() / is_image.sum().clamp(min=1)
        out["tokens_text"], out["tokens_image"] = is_text.sum(), is_image.sum()
    return out


def step_parts(losses: dict[str, Tensor], parts: Sequence[tuple[str, str]], device: torch.device) -> dict[str, Tensor]:
    """Each ``(loss, count)`` of ``parts`` given in ``losses``, as a float on ``device``: NaN where the batch had no
    such targets (the loss is then 0, and a key not logged at a step is written again, stale, by Lightning)."""
    out = {}
    for key, count in parts:
        if key in losses and count in losses:
            value = torch.as_tensor(losses[key], device=device).detach().float()
            out[key] = torch.where(torch.as_tensor(losses[count], device=value.device) > 0, value, torch.nan)
    return out


def eval_sums(losses: dict[str, Tensor], parts: Sequence[tuple[str, str]], device: torch.device) -> Tensor:
    """A validation/test batch's loss sums and target counts, ``(2 * len(parts),)`` (no host sync); zeros for a part
    that ``losses`` lacks (a ``compute_loss`` override may give fewer)."""
    out = []
    for loss, count in parts:
        if loss in losses and count in losses:
            n = losses[count].detach().float()
            out += [losses[loss].detach().float() * n, n]
        else:
            out += [torch.zeros((), device=device), torch.zeros((), device=device)]
    return torch.stack(out)


def epoch_losses(sums: Tensor, parts: Sequence[tuple[str, str]]) -> dict[str, Tensor]:
    """Each part's mean loss over the epoch's scored targets, from the summed :func:`eval_sums`; parts without
    targets are left out."""
    return {name: total / count for (name, _), total, count in zip(parts, sums[0::2], sums[1::2]) if count > 0}
