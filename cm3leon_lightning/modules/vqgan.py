"""VQGANModule: trains the image tokenizer (Esser et al. 2021; the paper's tokenizer, section 2.1, is of this family).

Loss of the autoencoder step::

    L = |x - x_rec|_1 (or squared) + perceptual_weight * LPIPS(x, x_rec)   (nll)
        + codebook_weight * (codebook + commitment)                   (quantizer)
        + [step >= disc_start] * disc_weight * lambda * (-mean D(x_rec))   (lambda: adaptive weight, eq. 7)

and, when the discriminator is on, a hinge-loss discriminator step with its own optimizer (manual optimization).
Steps are counted in ``train_steps`` (one per batch; Lightning's ``global_step`` counts optimizer steps, two per batch
once the discriminator runs, so ``trainer.max_steps`` counts those).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import lightning as L
import torch

from cm3leon_lightning.modules.vqgan_losses import LPIPS, NLayerDiscriminator, adaptive_weight, hinge_d_loss
from cm3leon_lightning.tokenization.quantize import code_statistics
from cm3leon_lightning.tokenization.vqgan import VQGAN, config_from_overrides

_FROM_CHECKPOINT: ContextVar[bool] = ContextVar("vqgan_module_from_checkpoint", default=False)
"""True inside :meth:`VQGANModule.load_from_checkpoint`: LPIPS is built without reading its weights file."""


def batch_images(batch: Any) -> torch.Tensor:
    """The image tensor of a batch: the batch itself, ``batch["image"]`` or ``batch[0]``."""
    if isinstance(batch, dict):
        return batch["image"]
    if isinstance(batch, (list, tuple)):
        return batch[0]
    return batch


class VQGANModule(L.LightningModule):
    """Trains a :class:`~cm3leon_lightning.tokenization.vqgan.VQGAN` on image batches ``(B, 3, S, S)``.

    Args:
        preset: architecture preset (``tiny``, ``micro``, ``f8_8192``, ``f16_16384``, ``chameleon``).
        resolution: override of the preset's image size (None keeps the preset's value; same for the next fields).
        ch: override of the base channel count.
        ch_mult: override of the channel multipliers.
        num_res_blocks: override of residual blocks per level.
        attn_resolutions: override of the attention resolutions.
        z_channels: override of the latent channels.
        embed_dim: override of the code dimension.
        n_embed: override of the number of codes.
        quantizer: override of the quantizer, ``vq`` or ``gumbel``.
        beta: override of the commitment weight.
        l2_normalize: override of l2-normalised codes.
        ema_decay: override of EMA codebook updates (a decay in (0, 1)).
        dead_code_after: override of the dead-code restart patience (0 = off).
        legacy_beta: override of where ``beta`` goes: ``True`` weights the codebook term (taming's default
            ``legacy=True``, which trained its published VQ checkpoints; for fine-tuning one of them).
        gumbel_kl_weight: override of the Gumbel quantizer's KL-to-uniform weight.
        gumbel_temperature: override of the Gumbel-softmax temperature (the start of the annealing, if any).
        gumbel_temperature_end: anneal the Gumbel-softmax temperature with a cosine from ``gumbel_temperature`` to
            this value over the run's batches, as taming's ``vqgan_gumbel_f8`` did (0.9 -> 1e-6 over 1M steps;
            DALL-E's dVAE annealed towards 1/16); None keeps it constant. Only with ``quantizer="gumbel"``.
        init_from: start from these weights (anything ``VQGAN.from_pretrained`` reads, with this architecture).
        lr: Adam learning rate of the autoencoder.
        betas: Adam betas (taming: 0.5, 0.9).
        codebook_weight: weight of the quantizer losses.
        perceptual_weight: LPIPS weight; > 0 needs ``lpips_weights``.
        lpips_weights: local LPIPS weights file (see :class:`~cm3leon_lightning.modules.vqgan_losses.LPIPS`).
        disc_weight: PatchGAN weight; 0 builds no discriminator.
        disc_start: training step (batch) from which the discriminator is trained and used.
        disc_lr: discriminator learning rate (None: ``lr``).
        disc_ndf: discriminator base channels.
        disc_layers: discriminator stride-2 layers (>= 1; images need ``3 * 2**disc_layers`` pixels per side).
        gradient_clip_val: clip gradient norms of both optimizers, after AMP unscaling (Trainer clipping does not
            apply to manual optimization).
        num_logged_images: originals / reconstructions in the image grid logged at the first validation batch.
        rec_loss: ``"l1"`` (taming) or ``"l2"`` (squared error). On images that are mostly flat background (the
            demo's shapes cover ~10% of the pixels) L1 sits at "background everywhere", the per-pixel median, for
            hundreds of steps; squared error learns the colours within a few hundred.
        lr_decay: ``"constant"`` (taming) or ``"cosine"``: both learning rates follow a cosine from ``lr`` to
            ``min_lr_ratio * lr`` over the batches of the run (``trainer.max_steps`` optimizer steps, two per batch
            once the discriminator runs; see :meth:`total_batches`), sharper codes at the end of a short run.
        min_lr_ratio: the final learning rate of the cosine decay, as a fraction of ``lr``.
    """

    def __init__(
        self,
        preset: str = "tiny",
        resolution: int | None = None,
        ch: int | None = None,
        ch_mult: list[int] | None = None,
        num_res_blocks: int | None = None,
        attn_resolutions: list[int] | None = None,
        z_channels: int | None = None,
        embed_dim: int | None = None,
        n_embed: int | None = None,
        quantizer: str | None = None,
        beta: float | None = None,
        l2_normalize: bool | None = None,
        ema_decay: float | None = None,
        dead_code_after: int | None = None,
        legacy_beta: bool | None = None,
        gumbel_kl_weight: float | None = None,
        gumbel_temperature: float | None = None,
        gumbel_temperature_end: float | None = None,
        init_from: str | None = None,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.5, 0.9),
        codebook_weight: float = 1.0,
        perceptual_weight: float = 0.0,
        lpips_weights: str | None = None,
        disc_weight: float = 0.0,
        disc_start: int = 0,
        disc_lr: float | None = None,
        disc_ndf: int = 64,
        disc_layers: int = 3,
        gradient_clip_val: float | None = None,
        num_logged_images: int = 8,
        rec_loss: str = "l1",
        lr_decay: str = "constant",
        min_lr_ratio: float = 0.1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self._decay_batches: int | None = None  # the cosine decay's length, fixed at the start of training
        self.automatic_optimization = False
        if perceptual_weight > 0 and lpips_weights is None:
            raise ValueError(
                "perceptual_weight > 0 needs lpips_weights=<local file> (VGG16 + LPIPS lin layers; nothing is "
                "downloaded). Set perceptual_weight: 0 to train without the perceptual loss."
            )
        if lpips_weights is not None and perceptual_weight <= 0:
            warnings.warn("lpips_weights is set but perceptual_weight is 0: the perceptual loss is off", stacklevel=2)
        if rec_loss not in ("l1", "l2"):
            raise ValueError(f"rec_loss must be 'l1' or 'l2', got {rec_loss!r}")
        if lr_decay not in ("constant", "cosine"):
            raise ValueError(f"lr_decay must be 'constant' or 'cosine', got {lr_decay!r}")
        if not 0 <= min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must lie in [0, 1], got {min_lr_ratio}")
        weights = {"disc_weight": disc_weight, "disc_start": disc_start, "codebook_weight": codebook_weight,
                   "perceptual_weight": perceptual_weight, "gradient_clip_val": gradient_clip_val or 0}  # fmt: skip
        for name, value in weights.items():  # a negative perceptual weight or clip value was ignored without a word
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        disc_set = {"disc_start": (disc_start, 0), "disc_lr": (disc_lr, None), "disc_ndf": (disc_ndf, 64),
                    "disc_layers": (disc_layers, 3)}  # fmt: skip
        unused = [f"{k}={v}" for k, (v, default) in disc_set.items() if v != default]
        if disc_weight == 0 and unused:
            warnings.warn(f"{', '.join(unused)} set but disc_weight is 0: no discriminator is built", stacklevel=2)
        self.config = config_from_overrides(preset, self.hparams)  # validates early, before the network is built
        side = self.config.resolution
        if disc_weight > 0 and side < NLayerDiscriminator.min_input_size(disc_layers):
            raise ValueError(  # else it failed at disc_start, maybe hours in, with torch's "Kernel size can't be ..."
                f"disc_layers={disc_layers} needs images of at least {NLayerDiscriminator.min_input_size(disc_layers)} "
                f"pixels per side, but the VQGAN's resolution is {side}: lower disc_layers"
            )
        if perceptual_weight > 0 and side < LPIPS.min_input_size:
            raise ValueError(
                f"the perceptual loss (LPIPS, VGG16) needs images of at least {LPIPS.min_input_size} pixels per side, "
                f"but the VQGAN's resolution is {side}: set perceptual_weight: 0"
            )
        vq_only = {"l2_normalize": False, "ema_decay": None, "dead_code_after": 0}  # passed here, not the preset's
        ignored = [f"{k}={self.hparams[k]}" for k, off in vq_only.items() if self.hparams[k] not in (None, off)]
        if self.config.quantizer == "gumbel" and ignored:
            raise ValueError(
                f"{', '.join(ignored)} set the nearest-neighbour quantizer (quantizer: vq); the Gumbel quantizer "
                "has no codebook lookup, EMA updates or dead-code restarts and would ignore them: drop them, or use "
                "quantizer: vq"
            )
        other = {"vq": ("gumbel_kl_weight", "gumbel_temperature"), "gumbel": ("beta",)}[self.config.quantizer]
        unused = [f"{k}={self.hparams[k]}" for k in other if self.hparams[k] is not None]
        if unused:  # harmless, but the run differs from what the config reads as
            msg = f"{', '.join(unused)} set but quantizer is {self.config.quantizer!r}, which does not use it"
            warnings.warn(msg, stacklevel=2)
        if gumbel_temperature_end is not None:
            if self.config.quantizer != "gumbel":
                raise ValueError(
                    f"gumbel_temperature_end anneals the Gumbel-softmax quantizer, but quantizer is "
                    f"{self.config.quantizer!r}: set quantizer: gumbel, or gumbel_temperature_end: null"
                )
            if not (0 < gumbel_temperature_end < math.inf):
                raise ValueError(f"gumbel_temperature_end must be a finite number > 0, got {gumbel_temperature_end}")
        self.vqgan: VQGAN | None = None
        self.discriminator: NLayerDiscriminator | None = None
        self.lpips: LPIPS | None = None
        self.register_buffer("train_steps", torch.zeros((), dtype=torch.long))
        self._val_counts: torch.Tensor | None = None
        self._resume_state: dict[str, Any] | None = None  # from on_load_checkpoint, for the first batch after it
        self._rng: dict[str, torch.Tensor] | None = None  # the training steps' RNG stream (see _rng_stream)
        self.last_image_grid: torch.Tensor | None = None

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> VQGANModule:
        """Lightning's ``load_from_checkpoint``, without reading the ``init_from`` saved in the checkpoint's
        hyper-parameters (its weights are replaced at once, and the file may be gone), unless ``init_from`` is passed,
        nor the ``lpips_weights`` file (the checkpoint holds the LPIPS weights too).
        """
        kwargs.setdefault("init_from", None)
        loading = _FROM_CHECKPOINT.set(True)  # LPIPS: its weights come from the checkpoint, not lpips_weights' file
        try:
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
        finally:
            _FROM_CHECKPOINT.reset(loading)

    def configure_model(self) -> None:
        """Build the VQGAN (from ``init_from`` if given), the discriminator and LPIPS; idempotent."""
        if self.vqgan is not None:
            return
        hp = self.hparams
        if hp.init_from is not None:
            self.vqgan = VQGAN.from_pretrained(hp.init_from, preset=self.config).train()
        else:
            self.vqgan = VQGAN(self.config)
        if hp.disc_weight > 0:
            self.discriminator = NLayerDiscriminator(self.config.out_ch, hp.disc_ndf, hp.disc_layers)
        if hp.perceptual_weight > 0:  # in load_from_checkpoint the file may be gone: the checkpoint holds the weights
            self.lpips = LPIPS(None if _FROM_CHECKPOINT.get() else hp.lpips_weights)

    def configure_optimizers(self) -> Any:
        """Adam for the autoencoder, and a second Adam for the discriminator when it exists."""
        hp = self.hparams
        params = [p for p in self.vqgan.parameters() if p.requires_grad]
        opt_g = torch.optim.Adam(params, lr=hp.lr, betas=tuple(hp.betas))
        if self.discriminator is None:
            return opt_g
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=self.disc_lr, betas=tuple(hp.betas))
        return [opt_g, opt_d]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> codes ``(B, h * w)`` (see :meth:`VQGAN.encode`)."""
        return self.vqgan.encode(images)

    def reconstruction_loss(self, x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
        """Mean absolute (``rec_loss="l1"``) or squared (``"l2"``) error of ``x_rec`` against ``x``."""
        diff = x - x_rec
        return diff.abs().mean() if self.hparams.rec_loss == "l1" else diff.pow(2).mean()

    def total_batches(self, max_steps: int) -> int:
        """Batches a run of ``max_steps`` optimizer steps trains (two optimizer steps per batch from ``disc_start``)."""
        hp = self.hparams
        if hp.disc_weight <= 0 or max_steps <= hp.disc_start:
            return max_steps
        return hp.disc_start + math.ceil((max_steps - hp.disc_start) / 2)

    @property
    def disc_lr(self) -> float:
        """The discriminator's base learning rate: ``disc_lr``, or ``lr`` when it is None (0 is a rate, not unset)."""
        return self.hparams.lr if self.hparams.disc_lr is None else self.hparams.disc_lr

    def run_batches(self) -> int | None:
        """Batches the run trains: the fewer of those of ``trainer.max_steps`` (optimizer steps,
        :meth:`total_batches`) and of ``max_epochs`` over data of known length (the trainer's estimate, which is
        never below the batches of ``max_steps``); None when neither is known. (``max_steps`` alone set the length
        when both were given, so a run that ``max_epochs`` ended first stopped high on its cosine decay.)"""
        if self._trainer is None:
            return None
        max_steps = self.trainer.max_steps
        bounds = [self.total_batches(max_steps)] if max_steps is not None and max_steps > 0 else []
        try:
            estimated = float(self.trainer.estimated_stepping_batches)  # min(epochs x batches, max_steps)
        except (RuntimeError, AttributeError):
            estimated = math.inf
        if math.isfinite(estimated) and estimated > 0:
            bounds.append(int(estimated))
        return min(bounds) if bounds else None

    def on_train_start(self) -> None:
        """Fix the length the cosine decay spans (it fell back to a constant rate when training was bounded by
        ``max_epochs`` rather than ``max_steps``), and count a run from step 0 (a ``fit`` without ``ckpt_path``, as
        after :meth:`load_from_checkpoint`) from batch 0, for the decay, the annealing and ``disc_start``.

        Raises:
            ValueError: ``lr_decay="cosine"`` or ``gumbel_temperature_end`` when the length of training is not known
                (data of unknown length and no ``max_steps``).
        """
        if self.trainer.global_step == 0:
            # A run from step 0 counts its batches from 0, as trainer.max_steps counts its steps: after
            # load_from_checkpoint, the checkpoint's count put the cosine decay at its floor and disc_start behind.
            self.train_steps.zero_()
        self._decay_batches = self.run_batches()
        self._rng = None  # a new fit starts the stream from the process's (seeded) RNG; a resume restores it
        if self._decay_batches is not None:
            return
        if self.hparams.lr_decay != "constant":
            raise ValueError(
                f"lr_decay={self.hparams.lr_decay!r} needs the length of training, which the trainer does not know "
                "(data of unknown length): set trainer.max_steps, or lr_decay: constant"
            )
        if self.hparams.gumbel_temperature_end is not None:
            raise ValueError(
                "gumbel_temperature_end anneals over the length of training, which the trainer does not know "
                "(data of unknown length): set trainer.max_steps, or gumbel_temperature_end: null"
            )

    def learning_rate(self) -> float:
        """The autoencoder's learning rate at the current batch (``lr``, or its cosine decay over the run's batches)."""
        return self.hparams.lr * self.lr_scale()

    def lr_scale(self) -> float:
        """The factor of both base learning rates at the current batch: 1, or the cosine decay's."""
        hp = self.hparams
        total = self._decay_batches or self.run_batches()
        if hp.lr_decay == "constant" or not total:
            return 1.0
        progress = min(1.0, int(self.train_steps) / total)
        return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def gumbel_temperature(self) -> float | None:
        """The Gumbel-softmax temperature at the current batch (None for the ``vq`` quantizer): the configured one,
        or its cosine annealing to ``gumbel_temperature_end`` over the run's batches (taming's
        ``LambdaWarmUpCosineScheduler`` without warm-up)."""
        if self.config.quantizer != "gumbel":
            return None
        start, end = self.config.gumbel_temperature, self.hparams.gumbel_temperature_end
        total = self._decay_batches or self.run_batches()
        if end is None or not total:
            return start
        progress = min(1.0, int(self.train_steps) / total)
        return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))

    def _reconstruct(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, Any]:
        x = self.vqgan.preprocess(batch_images(batch))  # (B, C, S, S) in [-1, 1]
        q = self.vqgan.quantize(self.vqgan.encode_latent(x))
        return x, self.vqgan.decode_latent(q.z_q), q

    def _rng_devices(self) -> list[torch.device]:
        """The CUDA device whose RNG the training steps draw from (none on the CPU)."""
        return [self.device] if self.device.type == "cuda" else []

    def _rng_now(self) -> dict[str, torch.Tensor]:
        """The process's RNG states now: ``cpu``, and ``cuda`` of this module's device."""
        rng = {"cpu": torch.get_rng_state()}
        if self._rng_devices():
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    @contextmanager
    def _rng_stream(self) -> Iterator[None]:
        """Run the block on the training steps' own RNG stream (Gumbel noise, dead-code restarts), apart from the
        process's: the draws made between two batches (a DataLoader iterator's seed at each epoch's start, callbacks)
        do not shift it, so the stream a checkpoint saves resumes exactly, wherever it was saved. It starts from the
        process's RNG (seeded by ``seed_everything``) at the first batch of a fit."""
        with torch.random.fork_rng(devices=self._rng_devices()):  # the process's RNG is put back afterwards
            if self._rng is not None:
                torch.set_rng_state(self._rng["cpu"])
                if self._rng_devices() and "cuda" in self._rng:
                    torch.cuda.set_rng_state(self._rng["cuda"], self.device)
            yield
            self._rng = self._rng_now()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """One autoencoder step, then one discriminator step once it is active (on :meth:`_rng_stream`)."""
        with self._rng_stream():
            return self._train_batch(batch)

    def _train_batch(self, batch: Any) -> torch.Tensor:
        hp = self.hparams
        opts = self.optimizers()
        opt_g, opt_d = (opts[0], opts[1]) if isinstance(opts, (list, tuple)) else (opts, None)
        if hp.lr_decay != "constant":
            scale = self.lr_scale()  # not learning_rate() / lr: lr 0 (a frozen autoencoder) divided by zero
            for opt, base in ((opt_g, hp.lr), (opt_d, self.disc_lr)):
                for group in opt.param_groups if opt is not None else ():
                    group["lr"] = base * scale
        logs: dict[str, torch.Tensor | float] = {}
        temperature = self.gumbel_temperature()
        if temperature is not None:
            self.vqgan.quantize.temperature = temperature
            logs["train/gumbel_temperature"] = temperature
        x, x_rec, q = self._reconstruct(batch)
        rec_loss = self.reconstruction_loss(x, x_rec)
        nll = rec_loss
        logs["train/rec_loss"] = rec_loss
        if self.lpips is not None:
            p_loss = self.lpips(x, x_rec).mean()
            nll = nll + hp.perceptual_weight * p_loss
            logs["train/p_loss"] = p_loss
        loss = nll + hp.codebook_weight * (q.codebook_loss + q.commitment_loss)
        use_disc = self.discriminator is not None and int(self.train_steps) >= hp.disc_start
        if use_disc:
            g_loss = -self.discriminator(x_rec).mean()
            d_weight = adaptive_weight(nll, g_loss, self.vqgan.decoder.conv_out.weight) * hp.disc_weight
            loss = loss + d_weight * g_loss
            logs.update({"train/g_loss": g_loss, "train/d_weight": d_weight})
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        opt_g.step()  # clips in on_before_optimizer_step
        if use_disc:
            d_loss = hinge_d_loss(self.discriminator(x.detach()), self.discriminator(x_rec.detach()))
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            opt_d.step()
            logs["train/d_loss"] = d_loss
        self.train_steps += 1
        usage, perplexity = code_statistics(q.codes, self.config.n_embed)
        logs.update(
            {
                "train/loss": loss.detach(),
                "train/codebook_loss": q.codebook_loss.detach(),
                "train/commit_loss": q.commitment_loss.detach(),
                "train/usage": usage,
                "train/perplexity": perplexity,
            }
        )
        self.log_dict(logs, prog_bar=False, batch_size=x.shape[0])
        self.log("rec_loss", rec_loss, prog_bar=True, logger=False, batch_size=x.shape[0])
        return loss.detach()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Clip the gradient norm to ``gradient_clip_val``: here, inside ``step()``, the gradients are unscaled
        (``16-mixed``'s grad scaler multiplies them by 2^16 until then, so clipping before ``step()`` clipped the
        scaled gradients to ``gradient_clip_val``, i.e. the real ones to ``gradient_clip_val / 2^16``)."""
        if self.hparams.gradient_clip_val:
            clip = self.hparams.gradient_clip_val
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Also save what an exact resumption needs beyond the state dict: the quantizer's dead-code counters (a
        non-persistent buffer, so the VQGAN's keys stay taming's) and the RNG stream that Gumbel noise and dead-code
        restarts draw from (:meth:`_rng_stream`; Lightning saves no RNG state)."""
        state: dict[str, Any] = {"rng": self._rng if self._rng is not None else self._rng_now()}
        steps_unused = getattr(self.vqgan.quantize, "steps_unused", None) if self.vqgan is not None else None
        if steps_unused is not None:
            state["steps_unused"] = steps_unused.detach().cpu().clone()
        checkpoint["vqgan_module_resume"] = state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the resumption state :meth:`on_save_checkpoint` saved, for :meth:`on_train_batch_start`."""
        self._resume_state = checkpoint.get("vqgan_module_resume")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """At the first batch after resuming, restore the dead-code counters and the RNG stream of the checkpoint."""
        state, self._resume_state = self._resume_state, None
        if state is None or self.trainer.ckpt_path is None:  # load_from_checkpoint then a fresh fit: keep its seed
            return
        steps_unused = getattr(self.vqgan.quantize, "steps_unused", None)
        if steps_unused is not None and state.get("steps_unused") is not None:
            steps_unused.copy_(state["steps_unused"])
        self._rng = dict(state["rng"])

    def on_validation_epoch_start(self) -> None:
        """Reset the code histogram of the epoch."""
        self._val_counts = torch.zeros(self.config.n_embed, dtype=torch.long, device=self.device)

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Reconstruction loss (``rec_loss``: L1 or squared), the code histogram; the image grid at the first batch."""
        x, x_rec, q = self._reconstruct(batch)
        rec_loss = self.reconstruction_loss(x, x_rec)
        self.log("val/rec_loss", rec_loss, prog_bar=True, sync_dist=True, batch_size=x.shape[0])
        if self._val_counts is not None:
            self._val_counts += torch.bincount(q.codes.flatten(), minlength=self.config.n_embed)
        if batch_idx == 0 and self.hparams.num_logged_images > 0:
            self._log_image_grid(x, x_rec)
        return rec_loss

    def on_validation_epoch_end(self) -> None:
        """Log codebook usage and perplexity over the whole validation set."""
        counts = self._val_counts
        if counts is None or counts.sum() == 0:
            return
        counts = self.all_gather(counts).reshape(-1, self.config.n_embed).sum(0)
        codes = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
        usage, perplexity = code_statistics(codes, self.config.n_embed)
        self.log_dict({"val/usage": usage, "val/perplexity": perplexity}, rank_zero_only=True)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Codes ``(B, h * w)`` of a batch of images."""
        return self.vqgan.encode(batch_images(batch))

    @torch.no_grad()
    def _log_image_grid(self, x: torch.Tensor, x_rec: torch.Tensor) -> None:
        from torchvision.utils import make_grid

        n = min(self.hparams.num_logged_images, x.shape[0])
        pair = torch.cat([x[:n], x_rec[:n]]).float().clamp(-1, 1)  # originals (top row), reconstructions (bottom)
        grid = make_grid((pair + 1) / 2, nrow=n, padding=1)  # (3, H', W') in [0, 1]
        self.last_image_grid = grid.cpu()
        # the step Lightning logs the scalars at (batches; global_step counts two optimizer steps per GAN batch)
        loop = self._trainer.fit_loop.epoch_loop if self._trainer is not None else None
        step = getattr(loop, "_batches_that_stepped", self.global_step) if loop is not None else 0
        for logger in self.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):  # TensorBoard
                experiment.add_image("val/reconstructions", grid, step)
            elif hasattr(logger, "log_image"):  # Weights & Biases
                logger.log_image(key="val/reconstructions", images=[grid], step=step)
            # other loggers (CSV) have no image support: the grid stays in ``last_image_grid``
