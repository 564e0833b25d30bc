"""Vector quantizers of the VQGAN image tokenizer (taming-transformers parameter layout).

* :class:`VectorQuantizer`: nearest neighbour in a codebook with straight-through gradients, codebook and commitment
  losses (van den Oord et al. 2017), optional l2-normalised codes (cosine distance, Yu et al. 2021 "ViT-VQGAN"),
  optional EMA codebook updates, and restart of dead codes. Parameter: ``embedding.weight`` (taming's
  ``VectorQuantizer2``).
* :class:`GumbelQuantizer`: logits over the codebook from a 1x1 conv; Gumbel-softmax while training, plain argmax of
  the logits in eval mode (no noise, so encoding is deterministic). Parameters: ``proj.*`` and ``embed.weight``
  (taming's ``GumbelQuantize``).

Both take latents ``(B, D, h, w)`` and return a :class:`QuantizerOutput` with codes ``(B, h, w)`` in row-major order.
Only persistent buffers appear in the state dict, so the presets' keys equal the published checkpoints' keys.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _distributed() -> bool:
    """Whether a ``torch.distributed`` group of more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@dataclass
class QuantizerOutput:
    """What a quantizer returns.

    Attributes:
        z_q: quantized latents ``(B, D, h, w)``; gradients flow to the encoder (straight-through or Gumbel-softmax).
        codes: code indices ``(B, h, w)``, long.
        codebook_loss: moves codes towards encoder outputs (weighted by beta with ``legacy_beta``; 0 with EMA
            updates or Gumbel).
        commitment_loss: beta-weighted pull of encoder outputs towards their codes (weight 1 with ``legacy_beta``;
            Gumbel: the KL to the uniform prior, weighted by ``kl_weight``).
    """

    z_q: torch.Tensor
    codes: torch.Tensor
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """A context with autocast disabled on ``device_type`` (a no-op where autocast does not exist, e.g. ``meta``)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _nearest(flat: torch.Tensor, emb: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Index of the nearest row of ``emb`` ``(K, D)`` for each row of ``flat`` ``(N, D)`` (l2-normalised first if
    ``normalize``), in float32.

    Autocast is off here: under ``bf16-mixed`` the ``z.e`` products would be rounded to 8 significant bits, often
    coarser than the gap between the two nearest codes, and the argmin would then not be the nearest code.
    """
    f, e = flat.float(), emb.float()
    with autocast_off(f.device.type):
        if normalize:
            f = F.normalize(f, dim=1)
        # squared distance ||z||^2 + ||e||^2 - 2 z.e; argmin takes the first index on ties
        dist = f.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2.0 * f @ e.t()  # (N, K)
    return dist.argmin(dim=1)


class VectorQuantizer(nn.Module):
    """Nearest-neighbour vector quantizer with straight-through gradients.

    Args:
        n_embed: number of codes.
        embed_dim: code dimension (channels of the latents).
        beta: commitment loss weight (van den Oord et al.: ``codebook_loss + beta * commitment``; this is taming's
            ``legacy=False``, whereas its default ``legacy=True``, which trained the published checkpoints, weighted
            the codebook term by ``beta`` instead: see ``legacy_beta``).
        l2_normalize: compare and return l2-normalised latents and codes (cosine similarity lookup).
        ema_decay: if set, the codebook follows exponential moving averages of the assigned latents instead of
            gradients (its weight then has ``requires_grad=False``); adds buffers ``ema_cluster_size`` and
            ``ema_embed_sum`` to the state dict.
        dead_code_after: in training, a code unused for this many consecutive forward passes is restarted at a random
            latent of the current batch; 0 disables restarts.
        legacy_beta: weight the codebook term by ``beta`` and the commitment term by 1, as taming's default
            ``legacy=True`` did (``beta * codebook + commitment``): to fine-tune a published taming VQ checkpoint with
            the balance it was trained with.

    The nearest code and the EMA statistics are computed in float32 with autocast off, whatever the latents' dtype
    (``bf16-mixed`` training, a bf16 model).

    Under ``torch.distributed`` (initialised, world size > 1) every replica must run the same training forwards:
    the EMA update all-reduces the per-code counts and latent sums, and the restarts count a code as used if any
    replica used it and take rank 0's latents, so the codebooks stay equal across replicas.
    """

    def __init__(
        self,
        n_embed: int,
        embed_dim: int,
        beta: float = 0.25,
        l2_normalize: bool = False,
        ema_decay: float | None = None,
        dead_code_after: int = 0,
        legacy_beta: bool = False,
    ) -> None:
        super().__init__()
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or None, got {ema_decay}")
        if dead_code_after < 0:
            raise ValueError(f"dead_code_after must be >= 0, got {dead_code_after}")
        if legacy_beta and ema_decay is not None:
            raise ValueError("legacy_beta weights the codebook term, which EMA updates replace: use one of them")
        self.n_embed, self.embed_dim, self.beta = n_embed, embed_dim, beta
        self.l2_normalize, self.ema_decay, self.dead_code_after = l2_normalize, ema_decay, dead_code_after
        self.legacy_beta = legacy_beta
        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)  # as taming
        if ema_decay is not None:
            self.embedding.weight.requires_grad_(False)
            self.register_buffer("ema_cluster_size", torch.ones(n_embed))
            self.register_buffer("ema_embed_sum", self.embedding.weight.detach().clone())
        # Consecutive training forwards without use, per code; not saved so the key layout stays taming's.
        self.register_buffer("steps_unused", torch.zeros(n_embed, dtype=torch.long), persistent=False)
        # Restarts chosen in one forward are written at the start of the next one: the codebook must stay unchanged
        # until the backward pass has used it (and the optimizer has stepped). Every other read of the codebook
        # (lookup / decode, state_dict / save_pretrained / checkpoints) writes them first, so that what is decoded
        # or saved is the codebook the next encode uses; loading a state dict drops them (chosen for the old codebook).
        self._pending_restart: tuple[torch.Tensor, torch.Tensor] | None = None
        self.register_state_dict_pre_hook(_write_pending_restart)
        self.register_load_state_dict_pre_hook(_drop_pending_restart)

    def codebook(self) -> torch.Tensor:
        """The codebook as used for lookup, ``(n_embed, embed_dim)`` (l2-normalised if configured)."""
        w = self.embedding.weight
        return F.normalize(w, dim=1) if self.l2_normalize else w

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``(B, h, w)`` -> latents ``(B, D, h, w)``."""
        self._apply_restart()
        return F.embedding(codes, self.codebook()).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize latents ``z`` of shape ``(B, D, h, w)``."""
        B, D, h, w = z.shape
        self._apply_restart()
        z = z.permute(0, 2, 3, 1)  # (B, h, w, D)
        emb = self.codebook()  # (K, D)
        codes = _nearest(z.reshape(-1, D).detach(), emb.detach(), self.l2_normalize)  # (N,), in float32
        if self.l2_normalize:
            z = F.normalize(z, dim=-1)
        flat = z.reshape(-1, D)  # (N, D)
        z_q = F.embedding(codes, emb).view(B, h, w, D)
        if self.training and self.ema_decay is not None:
            self._ema_update(flat.detach().float(), codes)
            z_q = F.embedding(codes, self.codebook()).view(B, h, w, D)
        # taming's legacy=True (its default, which trained the published checkpoints) puts beta on the codebook term
        codebook_weight, commitment_weight = (self.beta, 1.0) if self.legacy_beta else (1.0, self.beta)
        if self.ema_decay is None:
            codebook_loss = codebook_weight * F.mse_loss(z_q, z.detach())
        else:
            codebook_loss = z.new_zeros(())
        commitment_loss = commitment_weight * F.mse_loss(z, z_q.detach())
        if self.training and self.dead_code_after > 0:
            self._restart_dead_codes(flat.detach(), codes)
        z_q = z + (z_q - z).detach()  # straight-through estimator
        return QuantizerOutput(
            z_q=z_q.permute(0, 3, 1, 2).contiguous(),
            codes=codes.view(B, h, w),
            codebook_loss=codebook_loss,
            commitment_loss=commitment_loss,
        )

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, codes: torch.Tensor) -> None:
        one_hot = F.one_hot(codes, self.n_embed).type(flat.dtype)  # (N, K)
        with autocast_off(flat.device.type):  # float32 counts and sums (bf16 would round counts above 256)
            counts, sums = one_hot.sum(0), one_hot.t() @ flat  # (K,), (K, D)
        if _distributed():  # every replica updates from the global batch, so the codebooks stay equal
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        decay = self.ema_decay
        self.ema_cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
        self.ema_embed_sum.mul_(decay).add_(sums, alpha=1 - decay)
        # Laplace smoothing keeps rarely used codes from dividing by ~0
        n = self.ema_cluster_size.sum()
        size = (self.ema_cluster_size + 1e-5) / (n + self.n_embed * 1e-5) * n
        self.embedding.weight.copy_(self.ema_embed_sum / size.unsqueeze(1))

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor, codes: torch.Tensor) -> None:
        used = torch.zeros(self.n_embed, dtype=torch.bool, device=codes.device)
        used[codes] = True
        if _distributed():  # used on any replica; every replica then finds the same dead codes
            used_any = used.to(torch.int32)
            dist.all_reduce(used_any, op=dist.ReduceOp.MAX)
            used = used_any.bool()
        self.steps_unused.add_(1).masked_fill_(used, 0)
        dead = (self.steps_unused >= self.dead_code_after).nonzero().squeeze(1)
        if dead.numel() == 0:
            return
        picks = flat[torch.randint(0, flat.shape[0], (dead.numel(),), device=flat.device)].contiguous()
        if _distributed():  # rank 0's latents restart the codes on every replica
            dist.broadcast(picks, src=0)
        self._pending_restart = (dead, picks.clone())
        self.steps_unused[dead] = 0

    @torch.no_grad()
    def _apply_restart(self) -> None:
        """Write the restarts chosen by the last training forward, if any, into the codebook."""
        if self._pending_restart is None:
            return
        dead, picks = self._pending_restart
        self._pending_restart = None
        w = self.embedding.weight  # the module may have moved since (trained on a GPU, then .cpu() and saved)
        dead = dead.to(w.device)
        w[dead] = picks.to(device=w.device, dtype=w.dtype)
        if self.ema_decay is not None:
            self.ema_cluster_size[dead] = 1.0
            self.ema_embed_sum[dead] = picks.to(device=w.device, dtype=self.ema_embed_sum.dtype)


def _write_pending_restart(module: VectorQuantizer, prefix: str, keep_vars: bool) -> None:
    """``state_dict`` pre-hook: the saved codebook includes the restarts the last training forward chose."""
    module._apply_restart()


def _drop_pending_restart(module: VectorQuantizer, state_dict: dict, prefix: str, *args: object) -> None:
    """``load_state_dict`` pre-hook: a loaded codebook replaces the one the pending restarts were chosen for, so they
    are dropped (written at the next forward, they overwrote rows of the loaded codebook)."""
    if prefix + "embedding.weight" in state_dict:
        module._pending_restart = None


class GumbelQuantizer(nn.Module):
    """Gumbel-softmax quantizer (taming's ``GumbelQuantize``, used by ``vqgan_gumbel_f8``).

    Args:
        in_channels: channels of the incoming latents (taming: ``z_channels``, equal to ``embed_dim`` in every
            published checkpoint).
        embed_dim: code dimension.
        n_embed: number of codes.
        kl_weight: weight of the KL divergence of the code distribution to the uniform prior.
        temperature: Gumbel-softmax temperature while training.
        straight_through: hard one-hot samples with soft gradients while training.

    The logits (and so the codes, the samples and the KL) are computed in float32 with autocast off, whatever the
    latents' dtype, as :class:`VectorQuantizer`'s nearest-code search is.
    """

    def __init__(
        self,
        in_channels: int,
        embed_dim: int,
        n_embed: int,
        kl_weight: float = 5e-4,
        temperature: float = 1.0,
        straight_through: bool = True,
    ) -> None:
        super().__init__()
        self.n_embed, self.embed_dim = n_embed, embed_dim
        self.kl_weight, self.temperature, self.straight_through = kl_weight, temperature, straight_through
        self.proj = nn.Conv2d(in_channels, n_embed, 1)
        self.embed = nn.Embedding(n_embed, embed_dim)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``(B, h, w)`` -> latents ``(B, D, h, w)``."""
        return self.embed(codes).permute(0, 3, 1, 2).contiguous()

    def _logits(self, z: torch.Tensor) -> torch.Tensor:
        """Code logits ``(B, K, h, w)`` in float32 with autocast off: bf16 logits (8 significant bits) tie or swap
        the top codes of a large codebook, so the argmax was not the most likely code for ~2% of latents."""
        with autocast_off(z.device.type):
            return F.conv2d(z.float(), self.proj.weight.float(), self.proj.bias.float())

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize latents ``z`` of shape ``(B, C, h, w)``; eval mode takes the argmax (no noise)."""
        logits = self._logits(z)  # (B, K, h, w), float32
        if self.training:
            one_hot = F.gumbel_softmax(logits, tau=self.temperature, dim=1, hard=self.straight_through)
            codes = one_hot.argmax(dim=1)
            z_q = torch.einsum("bkhw,kd->bdhw", one_hot.to(self.embed.weight.dtype), self.embed.weight)
        else:
            codes = logits.argmax(dim=1)  # (B, h, w)
            z_q = self.lookup(codes)
        qy = F.softmax(logits, dim=1)
        kl = self.kl_weight * torch.sum(qy * torch.log(qy * self.n_embed + 1e-10), dim=1).mean()
        return QuantizerOutput(z_q=z_q, codes=codes, codebook_loss=logits.new_zeros(()), commitment_loss=kl)


def code_statistics(codes: torch.Tensor, n_embed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codebook usage and perplexity of a set of codes.

    Args:
        codes: code indices, any shape.
        n_embed: codebook size.

    Returns:
        ``(usage, perplexity)``: the fraction of codes used at least once, and ``exp`` of the entropy of the code
        histogram (``n_embed`` for perfectly uniform use, 1 for a single code).
    """
    counts = torch.bincount(codes.flatten(), minlength=n_embed).float()
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p * torch.log(p.clamp_min(1e-10))).sum()
    return (counts > 0).float().mean(), entropy.exp()
