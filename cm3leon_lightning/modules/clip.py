"""ClipModule: train or fine-tune the CLIP retriever with open_clip's contrastive loss (paper section 2.1).

The paper's dense retriever is an off-the-shelf frozen CLIP. Where those weights cannot be downloaded, or the data is
far from web photos (synthetic shapes, a private domain), this module trains one on image-caption pairs, and
:meth:`ClipModule.export_weights` writes a file that ``ClipEncoder(model_name, pretrained=<file>)`` loads.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import open_clip
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch import Tensor

from cm3leon_lightning.modules import optim
from cm3leon_lightning.retrieval.clip_files import save_clip_weights, set_quick_gelu, uses_quick_gelu
from cm3leon_lightning.retrieval.encoder import _check_unit_range, create_clip, preprocess_images

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the learned temperature at 100


def caption_match_recall(sim: Tensor, captions: list[str]) -> tuple[Tensor, Tensor]:
    """Recall@1 of a batch where equal captions count as the same target (duplicates are common in caption data).

    Args:
        sim: ``(B, B)`` similarity, rows images, columns texts (the pair i is the diagonal).
        captions: B captions.

    Returns:
        ``(image->text recall@1, text->image recall@1)`` as float scalars.
    """
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    cls = torch.tensor([ids[c] for c in captions], device=sim.device)  # (B,)
    i2t = (cls[sim.argmax(dim=1)] == cls).float().mean()
    t2i = (cls[sim.argmax(dim=0)] == cls).float().mean()
    return i2t, t2i


def scale_grad(x: Tensor, factor: float) -> Tensor:
    """``x`` unchanged (bit for bit) in the forward pass; its gradient multiplied by ``factor`` in the backward."""
    return x.detach() + (x - x.detach()) * factor


class ClipModule(L.LightningModule):
    """Contrastive image-text training of an open_clip model.

    Batches are ``{"image": uint8 (B, 3, H, W), "caption": list[str]}``
    (:class:`~cm3leon_lightning.data.pairs.ImageCaptionDataModule`); images are resized/normalised and captions
    tokenized here, with the model's own preprocessing and tokenizer, so training and ``ClipEncoder`` agree.

    Args:
        model_name: open_clip architecture (``"cm3leon-clip-tiny"``, ``"cm3leon-clip-small"``, ``"ViT-B-32"``, ...).
        pretrained: weights to start from (open_clip tag or local file), ``None`` to train from scratch.
            :meth:`load_from_checkpoint` does not read them (the checkpoint holds the weights) unless passed, or
            the checkpoint predates the recorded image preprocessing and QuickGELU (they then come from them).
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay on weight matrices (not on gains, biases or the temperature).
        beta1: AdamW beta1.
        beta2: AdamW beta2 (CLIP: 0.98).
        eps: AdamW epsilon (CLIP: 1e-6).
        warmup_steps: linear warm-up steps.
        max_steps: the step at which the cosine decay ends, counted from step 0 with the warm-up included; ``None``
            uses the trainer's estimate (refused for data of unknown length without ``trainer.max_steps``).
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        local_loss: open_clip ``ClipLoss(local_loss=...)`` for multi-GPU: each rank scores only its own rows against
            the gathered features (less memory; labels offset by rank). Needs ``gather_with_grad=True`` on more than
            one device, as open_clip's maintainers advise: without it the gradient misses the other ranks' rows.
        gather_with_grad: open_clip ``ClipLoss(gather_with_grad=...)``: gradients flow through the gathered copies
            of the other ranks' features too. Without it (the default) they flow only through the local shard, and
            this module scales them by the world size so that, after DDP averages, they equal one process's gradient
            of the whole global batch (open_clip itself leaves them ``1/world_size`` too small, except the
            temperature's). Either way the update equals that of one device fed the global batch (a BatchNorm model
            such as ``cm3leon-clip-tiny`` also needs the Trainer's ``sync_batchnorm=True`` for that).
        export_path: if set, :meth:`export_weights` writes the model there (``.safetensors``) when ``fit`` ends.
        overwrite_export: let that export replace a file already at ``export_path``; without it ``fit`` refuses such
            a path when it starts (the file may be the weights a memory bank was built with: its sha256 is recorded).
    """

    def __init__(
        self,
        model_name: str = "cm3leon-clip-tiny",
        pretrained: str | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        beta1: float = 0.9,
        beta2: float = 0.98,
        eps: float = 1e-6,
        warmup_steps: int = 50,
        max_steps: int | None = None,
        min_lr_ratio: float = 0.0,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        export_path: str | None = None,
        overwrite_export: bool = False,
    ) -> None:
        super().__init__()
        if lr <= 0 or weight_decay < 0 or warmup_steps < 0:
            raise ValueError(
                f"need lr > 0, weight_decay >= 0, warmup_steps >= 0; got {lr}, {weight_decay}, {warmup_steps}"
            )
        if export_path is not None and Path(export_path).suffix != ".safetensors":
            raise ValueError(f"export_path must end in .safetensors, got {export_path!r}")
        self.save_hyperparameters()
        self.model: torch.nn.Module | None = None
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.loss_fn: ClipLoss | None = None

    _deferred = False  # set while load_from_checkpoint reads a checkpoint: the model is built in on_load_checkpoint

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> ClipModule:
        """Lightning's ``load_from_checkpoint``, without reading the ``pretrained`` weights saved in the checkpoint's
        hyper-parameters (they are replaced at once, and a tag would need a download, a file may be gone), unless
        ``pretrained`` is passed. The image preprocessing and QuickGELU come from the checkpoint; one saved before
        they were recorded still takes them from its ``pretrained`` weights, read as before."""
        if "pretrained" in kwargs:
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
        ClipModule._deferred = True
        try:
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
        finally:
            ClipModule._deferred = False

    def configure_model(self) -> None:
        """Build the open_clip model (idempotent; called by Lightning before fit and on checkpoint load)."""
        if self.model is not None or ClipModule._deferred:  # deferred: on_load_checkpoint knows what to read
            return
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*randomly initialised.*")  # expected when training
            self.model = create_clip(self.hparams.model_name, self.hparams.pretrained)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the image preprocessing and the activation beside the weights: a model fine-tuned from a tag runs the
        tag's preprocessing (e.g. mean/std 0.5) and, for ``"openai"``, QuickGELU, which a reload with
        ``pretrained=None`` (offline) would otherwise replace by the architecture's."""
        checkpoint["clip_preprocess_cfg"] = json.loads(json.dumps(dict(self.model.visual.preprocess_cfg)))
        checkpoint["clip_quick_gelu"] = uses_quick_gelu(self.model)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Build the model and restore the checkpoint's image preprocessing and QuickGELU (checkpoints from before
        keep the model's own, or with :meth:`load_from_checkpoint`, the ones their ``pretrained`` weights bring)."""
        if ClipModule._deferred:  # load_from_checkpoint: pretrained is read only for what the checkpoint lacks
            ClipModule._deferred = False
            if "clip_preprocess_cfg" in checkpoint or "clip_quick_gelu" in checkpoint:
                self.hparams.pretrained = None
        self.configure_model()
        recorded = checkpoint.get("clip_preprocess_cfg")
        if isinstance(recorded, dict):
            self.model.visual.preprocess_cfg = {**self.model.visual.preprocess_cfg, **recorded}
        quick = checkpoint.get("clip_quick_gelu")
        if isinstance(quick, bool) and quick != uses_quick_gelu(self.model):
            set_quick_gelu(self.model, quick)

    def setup(self, stage: str) -> None:
        """Create the loss with this process's rank and world size (features are gathered across GPUs); before
        ``fit``, refuse an ``export_path`` that holds a file unless ``overwrite_export``."""
        self.configure_model()
        export = self.hparams.export_path
        if stage == "fit" and export is not None and Path(export).exists() and not self.hparams.overwrite_export:
            raise FileExistsError(
                f"export_path {export} already exists and fit would replace it with the trained weights when it ends; "
                "give another export_path, or overwrite_export=True (--model.init_args.overwrite_export true) to "
                "replace it"
            )
        world_size = self.trainer.world_size if self._trainer is not None else 1
        if world_size > 1 and self.hparams.local_loss and not self.hparams.gather_with_grad:
            raise ValueError(
                f"ClipModule(local_loss=True) on {world_size} devices needs gather_with_grad=True: without it each "
                "rank's features miss the gradient of the other ranks' rows (set both, or neither)"
            )
        self.loss_fn = ClipLoss(
            local_loss=self.hparams.local_loss,
            gather_with_grad=self.hparams.gather_with_grad,
            cache_labels=True,
            rank=self.global_rank,
            world_size=world_size,
        )

    @property
    def image_size(self) -> int:
        """The model's input resolution."""
        size = self.model.visual.preprocess_cfg["size"]
        return int(size if isinstance(size, int) else size[0])

    def forward(self, images: Tensor, captions: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        """Embed a batch.

        Args:
            images: ``(B, 3, H, W)`` uint8 or float in [0, 1].
            captions: B captions.

        Returns:
            ``(image_features (B, D), text_features (B, D), logit_scale ())``, float32 (also under autocast: the
            towers run in its precision, the normalisation and everything after in float32), features L2-normalised.

        Raises:
            ValueError: ``captions`` is a single ``str`` or does not hold one caption per image, or a floating point
                image has values outside ``[0, 1]`` (as ``ClipEncoder`` refuses it; its index named).
        """
        if isinstance(captions, str) or len(captions) != len(images):  # the loss: "Target 3 is out of bounds"
            got = "a single str" if isinstance(captions, str) else f"{len(captions)} captions"
            raise ValueError(f"a batch of {len(images)} images needs as many captions, got {got}")
        pp = self.model.visual.preprocess_cfg  # open_clip's eval transform, as ClipEncoder applies it
        x = preprocess_images(
            _check_unit_range(images, 0),  # [0, 255] floats trained on a white or rescaled picture, silently
            pp["size"],
            pp["mean"],
            pp["std"],
            pp.get("resize_mode", "shortest"),
            pp.get("interpolation", "bicubic"),
            pp.get("fill_color", 0),
        )  # (B, 3, S, S)
        ids = self.tokenizer(captions).to(self.device)  # (B, L)
        img = F.normalize(self.model.encode_image(x).float(), dim=-1)  # = encode_image(x, normalize=True) in fp32
        txt = F.normalize(self.model.encode_text(ids).float(), dim=-1)
        return img, txt, self.model.logit_scale.exp().float()

    def contrastive_loss(self, img: Tensor, txt: Tensor, scale: Tensor) -> Tensor:
        """open_clip ``ClipLoss`` in float32 with autocast off: logits up to 100 in bfloat16 are off by up to 0.25.

        On several devices without ``gather_with_grad`` only the local shard carries gradient; it is scaled by the
        world size so that DDP's average is the single-process gradient of the global batch (the temperature,
        local to every rank's full loss, already gets its whole gradient on each rank).
        """
        with torch.autocast(img.device.type, enabled=False):
            img, txt, scale = img.float(), txt.float(), scale.float()
            n = self.loss_fn.world_size
            if n > 1 and not self.loss_fn.gather_with_grad and not self.loss_fn.local_loss:
                img, txt = scale_grad(img, float(n)), scale_grad(txt, float(n))
            return self.loss_fn(img, txt, scale)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """Symmetric InfoNCE over the global batch (open_clip ``ClipLoss``, features gathered across devices)."""
        img, txt, scale = self(batch["image"], batch["caption"])
        loss = self.contrastive_loss(img, txt, scale)
        bs = len(batch["caption"])
        # with local_loss each rank holds the loss of its own rows only: their mean is the global batch's loss
        self.log("train/loss", loss, prog_bar=True, batch_size=bs, sync_dist=self.hparams.local_loss)
        self.log("train/logit_scale", scale, batch_size=bs)
        return loss

    def on_train_start(self) -> None:
        """Set each learning rate from this run's schedule at the restored step: a resumed run with a larger
        ``trainer.max_steps`` kept the checkpoint's decay length (and trained at the floor rate after it)."""
        optim.reapply_optimizer_settings(self.trainer.lr_scheduler_configs, None)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Clamp the learned temperature like CLIP, so logits stay bounded (scale <= 100)."""
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def on_fit_end(self) -> None:
        """Export the weights for ``ClipEncoder`` when ``export_path`` is set (rank zero writes)."""
        if self.hparams.export_path is not None and self.trainer.is_global_zero:
            self.export_weights(self.hparams.export_path, overwrite=bool(self.hparams.overwrite_export))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """Contrastive loss and in-batch recall@1 both ways, counting equal captions as matches.

        On several devices the batch is the global one, as in the loss: every rank's pairs are candidates.
        """
        img, txt, scale = self(batch["image"], batch["caption"])
        loss = self.contrastive_loss(img, txt, scale)
        captions = list(batch["caption"])
        if self.loss_fn.world_size > 1:
            img, txt = self.all_gather(img).flatten(0, 1), self.all_gather(txt).flatten(0, 1)  # (world * B, D)
            parts: list[Any] = [None] * self.loss_fn.world_size
            torch.distributed.all_gather_object(parts, captions)
            captions = [c for part in parts for c in part]
        with torch.autocast(img.device.type, enabled=False):
            i2t, t2i = caption_match_recall(img @ txt.T, captions)
        bs = len(batch["caption"])
        self.log("val/loss", loss, prog_bar=True, batch_size=bs, sync_dist=True)
        self.log("val/i2t_r1", i2t, batch_size=bs, sync_dist=True)
        self.log("val/t2i_r1", t2i, prog_bar=True, batch_size=bs, sync_dist=True)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW without decay on gains, biases, norms and the temperature (open_clip's rule), warm-up + cosine."""
        hp = self.hparams
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            exclude = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
            (no_decay if exclude else decay).append(p)
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused = self.device.type in ("cpu", "cuda")  # one kernel for all tensors: ~6x faster on CPU
        opt = torch.optim.AdamW(groups, lr=hp.lr, betas=(hp.beta1, hp.beta2), eps=hp.eps, fused=fused)
        total = hp.max_steps or self.trainer.estimated_stepping_batches
        if not 0 < total < math.inf:  # Lightning gives max_steps (-1 when unset) for data of unknown length
            raise ValueError(
                "ClipModule's cosine decay needs the length of training, which the trainer does not know (data of "
                "unknown length): set trainer.max_steps or model max_steps"
            )
        # a plain function, not a WarmupDecay object, whose length a checkpoint would restore (optim.py)
        sched = optim.warmup_decay_scheduler(opt, hp.warmup_steps, int(total), "cosine", hp.min_lr_ratio)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def export_weights(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the open_clip state dict as safetensors, loadable by ``ClipEncoder(model_name, pretrained=path)``.

        The metadata records what the state dict lacks and ``create_clip`` rebuilds from it: ``model_name``,
        ``quick_gelu`` (``"true"``/``"false"``) and ``preprocess_cfg``, JSON of the model's image preprocessing
        (``size``, ``mean``, ``std``, ``interpolation``, ``resize_mode``, ``fill_color``): a model fine-tuned from a
        tag keeps the tag's (e.g. mean/std 0.5), not the architecture's defaults. The same model and preprocessing
        always give the same bytes, so the sha256 that ``cm3leon prepare`` records identifies them.

        Args:
            path: output file; ``.safetensors`` is the expected suffix (open_clip picks the loader by suffix).
            overwrite: replace a file already at ``path`` (written whole, then moved into place).

        Returns:
            The written path.

        Raises:
            FileExistsError: ``path`` exists and ``overwrite`` is false.
        """
        self.configure_model()
        out = Path(path)
        if out.suffix != ".safetensors":
            raise ValueError(f"export path must end in .safetensors (open_clip chooses its loader by suffix): {out}")
        if out.exists() and not overwrite:
            raise FileExistsError(f"{out} already exists; pass overwrite=True to replace it")
        out.parent.mkdir(parents=True, exist_ok=True)
        save_clip_weights(self.model, self.hparams.model_name, out)
        return out
