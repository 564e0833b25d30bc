"""CM3LeonModule: the LightningModule that pretrains and fine-tunes a CM3Leon (paper sections 2.2-2.4 and 4).

The module is thin on purpose. The network is :class:`~cm3leon_lightning.model.CM3Leon`; the data pipeline already
applied CM3 masking (:func:`~cm3leon_lightning.objective.cm3_infill`), so the objective here is plain next-token
cross-entropy over every non-pad target. A new task subclasses the module and overrides :meth:`build_sequence`
(how a batch becomes inputs and targets) or :meth:`compute_loss` (how logits become a loss).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import lightning as L
import torch
from torch import Tensor

from cm3leon_lightning.config import CM3LeonConfig
from cm3leon_lightning.generation.generate import GenerationSettings, generate_image, unread_settings
from cm3leon_lightning.model import CM3Leon
from cm3leon_lightning.model.weights import check_same_architecture, check_same_vocab, load_weights
from cm3leon_lightning.modules import optim
from cm3leon_lightning.modules.losses import EVAL_PARTS, epoch_losses, eval_sums, next_token_losses, step_parts
from cm3leon_lightning.modules.network import (
    check_data_vocab,
    check_vocab_size,
    data_source,
    data_vocab,
    load_init_from,
    read_described_weights,
    resolve_architecture,
)
from cm3leon_lightning.modules.schedule import WarmupDecay
from cm3leon_lightning.tokenization.vocab import PAD_ID, MultimodalVocab

__all__ = ["CM3LeonModule", "WarmupDecay", "batch_rows", "batch_tokens", "check_vocab_size"]


def batch_rows(batch: dict[str, Tensor]) -> int:
    """Sequences in a batch: the ``batch_size_fn`` of Lightning's ``ThroughputMonitor`` (``configs/trainer/*.yaml``)."""
    return int(batch["input_ids"].shape[0])


def batch_tokens(batch: dict[str, Tensor]) -> int:
    """Token positions in a batch (padding included): the monitor's ``length_fn``, logged as ``items_per_sec``."""
    return int(batch["input_ids"].numel())


class CM3LeonModule(L.LightningModule):
    """Pretraining / SFT LightningModule around :class:`CM3Leon`.

    Args:
        preset: architecture preset (``tiny``, ``350m``, ``760m``, ``7b``; ``tiny`` when neither it nor ``config`` is
            given). Checkpoints record it only when no ``config`` was given (their ``config`` is the resolved one).
        config: a full architecture, used instead of ``preset`` (a preset given beside a config of another
            architecture is warned about: the config's missing fields are CM3LeonConfig's defaults, not the preset's).
        vocab: the data's vocabulary (``MultimodalVocab.to_dict()``), normally linked from the data module's
            manifest by the CLI, or taken from ``trainer.datamodule.vocab`` in :meth:`setup`. It sets the model's
            vocabulary size (the padded size) and splits the logged loss into text and image targets. A checkpoint
            whose vocabulary differs from the data's fails before training, printing both.
        max_seq_len: context length; overrides the preset/config when given (the paper uses 4096).
        lr: peak learning rate (paper table 3: 6e-4 for 350M, 5e-4 for 760M, 1.2e-4 for 7B).
        betas: AdamW betas.
        eps: AdamW epsilon.
        weight_decay: applied to weights of two or more dimensions only.
        warmup_steps: linear warm-up steps (paper table 3: 1500).
        lr_decay: ``linear``, ``cosine`` or ``constant`` after warm-up.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        decay_steps: the step at which the decay reaches ``min_lr_ratio``, counted from step 0 with the warm-up
            included (so more than ``warmup_steps``); defaults to the trainer's estimated total steps.
        activation_checkpointing: recompute each block in the backward pass to save memory.
        compile: run the network through ``torch.compile``.
        generation: text-to-image sampling settings of :meth:`predict_step` (``cm3leon predict``); defaults when
            not given. Kept out of the checkpoint's hyper-parameters: LightningCLI applies those over the command
            line when ``--ckpt_path`` is given, which would silence ``--model.init_args.generation.*``.
        init_from: weights to start from, as supervised fine-tuning starts from the pretrained model (paper
            section 4) with a fresh optimizer, step 0 and a new schedule (``--ckpt_path`` resumes all three): a
            ``.ckpt`` of this module (or FSDP's sharded directory), a model directory of ``cm3leon export``, or a
            ``.safetensors`` file or ``torch.save``'d state dict of the bare :class:`CM3Leon`. Loaded once, when
            :meth:`configure_model` builds the network, so a ``--ckpt_path`` restore still replaces them. A
            checkpoint's architecture and vocabulary must equal this module's and the data's (``init_std`` and
            ``pos_init_std``, which only set the random initialisation, may differ); a module without a vocabulary
            adopts the checkpoint's. Not read by :meth:`load_from_checkpoint`, whose checkpoint holds the weights.
        allow_tokenizer_change: train on data prepared with another text tokenizer or VQGAN than the checkpoint's
            (``init_from``, ``from_pretrained``, ``--ckpt_path``) was trained with. The vocabulary records the
            tokenizers' hashes, and by default data whose manifest records other ones is refused, naming both: the
            same ids would mean other words or image codes. The model then records the data's tokenizers.
    """

    def __init__(
        self,
        preset: str | None = None,
        config: CM3LeonConfig | None = None,
        vocab: dict[str, str | int] | None = None,
        max_seq_len: int | None = None,
        lr: float = 6e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        warmup_steps: int = 1500,
        lr_decay: str = "linear",
        min_lr_ratio: float = 0.1,
        decay_steps: int | None = None,
        activation_checkpointing: bool = False,
        compile: bool = False,
        generation: GenerationSettings | None = None,
        init_from: str | None = None,
        allow_tokenizer_change: bool = False,
    ) -> None:
        super().__init__()
        given_config = config is not None
        if isinstance(config, dict):  # as restored from a checkpoint's hyper-parameters
            config = CM3LeonConfig.from_dict(config)
        if isinstance(generation, dict):
            generation = GenerationSettings.from_dict(generation)
        unread = unread_settings(generation) if generation is not None else []
        if unread:
            raise ValueError(
                f"generation.method={generation.method!r} does not read {'; '.join(unread)}: drop them or choose a "
                "method that reads them"
            )
        config, vocab = resolve_architecture(preset, config, vocab, max_seq_len)  # vocab: complete, or None
        optim.check_optimizer_args(lr, warmup_steps, lr_decay, min_lr_ratio, decay_steps, betas, eps, weight_decay)
        self.config = config
        # Primitives only, so checkpoints load with torch.load(weights_only=True); `config` is stored resolved.
        self.save_hyperparameters(ignore=["config", "generation"])
        self.hparams["config"] = config.to_dict()
        if given_config:  # the resolved config describes the network; a preset beside it would only disagree
            self.hparams["preset"] = None
        self.hparams["vocab"] = vocab
        self.generation = generation if generation is not None else GenerationSettings()
        self.model: CM3Leon | None = None
        self._last_step_time: float | None = None
        self._batch_start_time = time.perf_counter()
        self._eval_sums: Tensor | None = None  # validation/test loss sums and target counts of the epoch
        self._optimizer_settings: tuple[int, list[dict[str, Any]]] | None = None  # see configure_optimizers
        # Matrix-multiply FLOPs of the last batch on this device (CM3LeonConfig.forward_flops; 3x in training).
        self.flops_per_batch: int | None = None

    def save_hyperparameters(
        self, *args: Any, ignore: Sequence[str] | str | None = None, frame: Any = None, logger: bool = True
    ) -> None:
        """Lightning's ``save_hyperparameters``, keeping what checkpoints need whoever calls it: ``config`` and
        ``vocab`` stay the resolved primitives and ``generation`` stays out (see the class docstring).

        A subclass may call it again for its own arguments, as Lightning's documentation does; that used to store
        the ``config`` argument as given (``None`` under the CLI: checkpoints that ``from_pretrained``, ``cm3leon
        export`` and ``cm3leon info`` could not read) and ``generation`` as an object.
        """
        names = [ignore] if isinstance(ignore, str) else list(ignore or [])
        kept = {key: self.hparams[key] for key in ("config", "vocab") if key in self.hparams}
        frame = frame or inspect.currentframe().f_back  # the caller's __init__, as Lightning finds it
        super().save_hyperparameters(*args, ignore=[*names, "config", "generation"], frame=frame, logger=logger)
        self.hparams.update(kept)

    @property
    def vocab(self) -> MultimodalVocab | None:
        """The vocabulary the model was built for, when known."""
        return None if self.hparams.vocab is None else MultimodalVocab(**self.hparams.vocab)

    def setup(self, stage: str) -> None:
        """Adopt the data module's vocabulary when none was given, and refuse a mismatching one or rows longer than
        the model's context (which would otherwise fail at the first forward, after the data has loaded)."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_desc = data_vocab(datamodule, self.config.max_seq_len)  # refuses rows longer than the context
        if data_desc is None:
            return
        if self.hparams.vocab is None:
            if self.model is not None:  # built before fit (a forward, configure_model): its size must fit
                check_vocab_size(self.config.vocab_size, MultimodalVocab(**data_desc).padded_size, "the model")
            else:
                self.config = CM3LeonConfig.from_dict(
                    {**self.config.to_dict(), "vocab_size": MultimodalVocab(**data_desc).padded_size}
                )
                self.hparams["config"] = self.config.to_dict()
            # Adopted in both cases: without it the text/image split went unlogged and the checkpoints recorded no
            # vocabulary (from_pretrained, export and generate refused them).
            self.hparams["vocab"] = data_desc
        else:
            allow = bool(self.hparams.get("allow_tokenizer_change", False))
            self.hparams["vocab"] = check_data_vocab(self.hparams.vocab, data_desc, data_source(datamodule), allow)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Fail before training when the checkpoint's vocabulary or architecture differs from this module's."""
        saved = checkpoint.get("hyper_parameters", {})
        allow = bool(self.hparams.get("allow_tokenizer_change", False))
        check_same_vocab(saved.get("vocab"), self.hparams.vocab, "the checkpoint", "the data", allow)
        check_same_architecture(saved.get("config"), self.config.to_dict(), "checkpoint")

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> CM3LeonModule:
        """Lightning's ``load_from_checkpoint``, without reading the ``init_from`` saved in the checkpoint's
        hyper-parameters (its weights are replaced at once, and the file may be gone), unless ``init_from`` is passed.
        """
        kwargs.setdefault("init_from", None)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str, **kwargs: Any) -> CM3LeonModule:
        """A module holding the network of a checkpoint (``.ckpt``, FSDP's sharded directory) or a model directory of
        ``cm3leon export``, built, for ``Trainer.validate``/``test``/``predict`` with the evaluation callbacks, or for
        ``fit`` as fine-tuning starts (fresh optimizer, step 0). The architecture and vocabulary come from the file;
        ``kwargs`` are the other arguments (``lr``, ``generation``, ...). The weights are read once, and the saved
        hyper-parameters do not name the file.

        Raises:
            FileNotFoundError, ValueError: as :func:`~cm3leon_lightning.model.weights.read_weights`, or a file that
                records no architecture and vocabulary (bare weights: ``CM3LeonModule(config=..., vocab=...,
                init_from=path)``).
        """
        weights = read_described_weights(path)
        module = cls(config=CM3LeonConfig.from_dict(weights.config), vocab=dict(weights.vocab), **kwargs)
        with torch.device("meta"):  # the file supplies every weight (see configure_model)
            model = CM3Leon(module.config)
        load_weights(model, weights.state_dict, f"path {str(path)!r}", weights.fetch)
        module._adopt(model)
        return module

    # --------------------------------------------------------------------------------------------- building
    def configure_model(self) -> None:
        """Build the network once (idempotent, so FSDP/meta-device strategies can call it)."""
        if self.model is not None:
            return
        if self.hparams.init_from is not None:
            # On the meta device: the file replaces every weight, so the random initialisation (minutes at 7B on a
            # CPU) is skipped; load_weights assigns the loaded tensors in the dtype the context asks for.
            with torch.device("meta"):
                model = CM3Leon(self.config)
            # Before self.model is set: a file that does not fit leaves the module unbuilt, not half-initialized.
            self._load_init_from(model, self.hparams.init_from)
        else:
            model = CM3Leon(self.config)
        self._adopt(model)

    def _adopt(self, model: CM3Leon) -> None:
        """Make ``model`` this module's network: shapes recorded for weight decay, checkpointing and compile set."""
        self.model = model
        # Shapes as built: FSDP later turns the parameters into flat 1-D shards (see configure_optimizers).
        self._param_ndims = {name: p.ndim for name, p in self.model.named_parameters()}
        self.model.gradient_checkpointing = bool(self.hparams.activation_checkpointing)
        if self.hparams.compile:
            # Kept outside the module registry so state-dict keys stay those of the plain model.
            self.__dict__["_compiled"] = torch.compile(self.model)

    def _load_init_from(self, model: CM3Leon, path: str) -> None:
        """Check the weights of ``init_from`` against this module's architecture and vocabulary, then load them.

        Under a trainer this runs after :meth:`setup`, so the data's vocabulary is known by then.
        """
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        allow = bool(self.hparams.get("allow_tokenizer_change", False))
        saved_vocab = load_init_from(model, path, self.config, self.hparams.vocab, data_source(datamodule), allow)
        if self.hparams.vocab is None and saved_vocab is not None:
            # The architectures matched, so the vocabulary fits; setup() then refuses data with another one.
            self.hparams["vocab"] = saved_vocab

    def forward(self, idx: Tensor) -> Tensor:
        """Logits ``(B, T, V)`` for token ids ``(B, T)`` (full causal sequence, no cache)."""
        if self.model is None:
            self.configure_model()
        net = self.__dict__.get("_compiled", self.model)
        return net(idx)

    # ------------------------------------------------------------------------------------------------ hooks
    def build_sequence(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Turn a batch into model inputs and next-token targets, both ``(B, T-1)``.

        The default reads ``batch["input_ids"]`` (already CM3-masked by the data pipeline). Override for tasks that
        assemble the sequence on the fly.
        """
        ids = batch["input_ids"]  # (B, T)
        if ids.dim() != 2:
            raise ValueError(f"batch['input_ids'] must have shape (B, T), got {tuple(ids.shape)}")
        return ids[:, :-1], ids[:, 1:]

    def compute_loss(self, logits: Tensor, targets: Tensor, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Next-token cross-entropy over all non-pad targets (the paper removed RA-CM3's query up-weighting).

        Returns a dict with ``loss`` (the optimised value), ``tokens`` (number of scored targets), and, when
        the vocabulary is known, ``loss_text`` and ``loss_image`` (mean loss over text and image targets) with their
        target counts ``tokens_text`` and ``tokens_image`` (validation and test weigh each batch by these). An
        override must return ``loss``; without ``tokens`` every non-pad target counts, and the text and image parts
        are logged only when given with their counts (in training, NaN for a batch without such targets: the
        value here is then 0). To score fewer targets (e.g. only an instruction's output),
        set the others to ``PAD_ID`` and call ``super().compute_loss``: the logged parts then follow.
        """
        vocab = self.hparams.vocab
        return next_token_losses(logits, targets, None if vocab is None else vocab["n_text"])

    def _shared_step(self, batch: dict[str, Tensor], stage: str) -> dict[str, Tensor]:
        inputs, targets = self.build_sequence(batch)
        # For Lightning's ThroughputMonitor (FLOP/s, MFU): forward, plus a backward of twice that when training.
        self.flops_per_batch = (
            inputs.shape[0] * self.config.forward_flops(inputs.shape[1]) * (3 if stage == "train" else 1)
        )
        logits = self(inputs)  # (B, T-1, V)
        losses = self.compute_loss(logits, targets, batch)
        if not isinstance(losses, dict) or "loss" not in losses:
            got = f"a dict with keys {sorted(losses)}" if isinstance(losses, dict) else type(losses).__name__
            raise TypeError(
                f"{type(self).__name__}.compute_loss must return a dict with 'loss' (and optionally 'tokens', "
                f"'loss_text', ...), got {got}"
            )
        if "tokens" not in losses:  # an override that gives only `loss`: every non-pad target counts
            losses["tokens"] = (targets != PAD_ID).sum()
        if stage != "train":  # epoch figures per scored token, logged at the epoch's end (_log_eval_epoch)
            self._accumulate(losses)
            return losses
        bs = inputs.shape[0]
        self.log(f"{stage}/loss", losses["loss"], prog_bar=True, batch_size=bs, on_step=True)
        self.log(f"{stage}/ppl", torch.exp(losses["loss"].detach().clamp(max=30)), batch_size=bs)
        for key, value in step_parts(losses, self._EVAL_PARTS[1:], self.device).items():  # NaN: no such targets
            self.log(f"{stage}/{key}", value, batch_size=bs, on_step=True)
        return losses

    _EVAL_PARTS = EVAL_PARTS

    def _accumulate(self, losses: dict[str, Tensor]) -> None:
        """Add a validation/test batch's loss sums and target counts (no host sync)."""
        sums = eval_sums(losses, self._EVAL_PARTS, self.device)  # (6,)
        self._eval_sums = sums if self._eval_sums is None else self._eval_sums + sums

    def _log_eval_epoch(self, stage: str) -> None:
        """Log ``{stage}/loss``, ``/ppl``, ``/loss_text``, ``/loss_image`` over every scored token of the epoch (all
        ranks): a batch counts by its targets, so text-only batches do not pull the image loss toward 0, padding rows
        weigh nothing, and the perplexity is exp of the epoch's loss."""
        sums = self._eval_sums if self._eval_sums is not None else torch.zeros(6, device=self.device)
        self._eval_sums = None
        if self._trainer is not None:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        for name, value in epoch_losses(sums, self._EVAL_PARTS).items():  # the same on every rank after the reduction
            self.log(f"{stage}/{name}", value, prog_bar=name == "loss", batch_size=1)
            if name == "loss":
                self.log(f"{stage}/ppl", torch.exp(value.clamp(max=30)), batch_size=1)

    def on_validation_epoch_start(self) -> None:
        """Start the epoch's loss sums afresh: those of an epoch that raised counted in the next one."""
        self._eval_sums = None

    def on_test_epoch_start(self) -> None:
        """Start the epoch's loss sums afresh (see :meth:`on_validation_epoch_start`)."""
        self._eval_sums = None

    def on_validation_epoch_end(self) -> None:
        self._log_eval_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval_epoch("test")

    # ------------------------------------------------------------------------------------------------ steps
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """One optimisation step's loss; also logs tokens per second (non-pad targets over the wall time since the
        previous step ended, or, for the first step of an epoch or after a validation, since this batch started)."""
        losses = self._shared_step(batch, "train")
        now = time.perf_counter()
        start = self._last_step_time if self._last_step_time is not None else self._batch_start_time
        rate = losses["tokens"].float() / max(now - start, 1e-9)
        # logged at every step: a value skipped at one step would be written again, stale, by Lightning
        self.log("train/tokens_per_sec", rate, on_step=True, on_epoch=False, batch_size=1)
        self._last_step_time = now
        return losses["loss"]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Note when the batch started (the rate's start when no previous step ended in this stretch of training)."""
        self._batch_start_time = time.perf_counter()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """Validation loss, perplexity, and text/image losses (averaged over the epoch)."""
        return self._shared_step(batch, "val")["loss"]

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """Test loss, perplexity, and text/image losses."""
        return self._shared_step(batch, "test")["loss"]

    def predict_step(self, batch: dict[str, list], batch_idx: int) -> dict[str, Any]:
        """Text-to-image for a batch of prompts (``cm3leon predict``), with the ``generation`` settings.

        Each prompt decodes as its own batch of guidance streams x candidates, seeded by its ``seed`` (or the
        settings' seed plus its global index), so its samples do not depend on the device or batch it landed in.

        Args:
            batch: lists ``index`` (global prompt index), ``prompt`` (text), ``ids`` (text-tokenizer ids) and
                ``seed`` (int or None), as :class:`~cm3leon_lightning.generation.predict.PromptDataModule` yields.

        Returns:
            ``index``, ``prompt``, ``seed`` (lists) and ``codes``: ``(B, N, grid_h * grid_w)`` long image codes.
        """
        vocab = self.vocab
        if vocab is None:
            raise ValueError("predict needs the model's vocabulary: give model vocab or a data module with `vocab`")
        if self.model is None:
            self.configure_model()
        settings = self.generation
        seeds = [settings.seed + i if s is None else int(s) for i, s in zip(batch["index"], batch["seed"])]
        codes = []
        for index, prompt, ids, seed in zip(batch["index"], batch["prompt"], batch["ids"], seeds):
            try:
                out = generate_image(self.model, vocab, [ids], seed=seed, **settings.image_kwargs())
            except ValueError as e:
                raise ValueError(f"prompt {index} ({prompt[:60]!r}): {e}") from e
            codes.append(out.codes[0])  # (N, h*w)
        return {
            "index": list(batch["index"]),
            "prompt": list(batch["prompt"]),
            "seed": seeds,
            "codes": torch.stack(codes),
        }

    def on_train_start(self) -> None:
        """Set each learning rate from this run's schedule at the restored step: a resumed optimizer holds the rate
        its old schedule gave, which differs when the schedule's length changed (a larger ``max_steps``).

        The optimizer this module made also takes back this run's ``lr``, ``betas``, ``eps`` and ``weight_decay``:
        a restored optimizer and scheduler hold the checkpoint's, so ``CM3LeonModule(lr=...)`` given with
        ``ckpt_path`` was silently ignored. (LightningCLI passes the checkpoint's hyper-parameters on resume anyway.)
        """
        made, self._optimizer_settings = getattr(self, "_optimizer_settings", None), None
        optim.reapply_optimizer_settings(self.trainer.lr_scheduler_configs, made)

    def on_train_epoch_start(self) -> None:
        self._last_step_time = None

    def on_validation_end(self) -> None:
        self._last_step_time = None  # the next training step's tokens/s must not include the validation

    # ------------------------------------------------------------------------------------------- optimizers
    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW with decay on >=2-D weights only (judged by the shapes the model was built with, so sharded FSDP
        parameters keep their decay), and a per-step warm-up/decay schedule."""
        if self.model is None:
            self.configure_model()
        hp = self.hparams
        fused = self.device.type == "cuda"
        ndims = getattr(self, "_param_ndims", None)
        optimizer = optim.adamw(self.model, hp.lr, hp.betas, hp.eps, hp.weight_decay, ndims, fused)
        total = optim.schedule_length(
            hp.decay_steps, hp.warmup_steps, hp.lr_decay, hp.lr, lambda: float(self.trainer.estimated_stepping_batches)
        )
        scheduler = optim.warmup_decay_scheduler(optimizer, hp.warmup_steps, total, hp.lr_decay, hp.min_lr_ratio)
        self._optimizer_settings = optim.optimizer_settings(optimizer)  # this run's, reapplied in on_train_start
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def config_dict(self) -> dict[str, Any]:
        """The resolved architecture as primitives."""
        return asdict(self.config)
