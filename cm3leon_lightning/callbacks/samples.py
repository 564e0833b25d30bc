"""SampleLoggerCallback: fixed prompts and seeds -> image grids with their prompts, and captions of fixed images.

At every n-th validation epoch end, every rank generates one image per prompt (each with its own seed, so a prompt's
image changes only because the model did) and a caption per fixed image (under DDP the other ranks would wait for rank
zero anyway; a model sharded by FSDP is refused at setup, see :func:`~.base.check_unsharded`). Rank zero renders each
grid with the text above each picture (PIL's default font) and sends it to every active logger: W&B
(``WandbLogger.log_image``), TensorBoard (``add_image``), otherwise PNG files in ``<logger.log_dir>/samples/``
(CSVLogger); when no logger takes images (none, or only loggers without a local ``log_dir`` such as MLflow), in
``<default_root_dir>/samples/``. A PNG file is never replaced: a second grid of one tag at one step (two ``validate``
runs) gets a ``-1``, ``-2``... suffix.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from cm3leon_lightning.callbacks.base import (
    EvalSample,
    module_vocab,
    read_shard_samples,
    refuse_arguments,
)
from cm3leon_lightning.callbacks.cider import CIDErCallback
from cm3leon_lightning.data.cleaning import model_text
from cm3leon_lightning.generation.cli_files import drawable_text
from cm3leon_lightning.metrics.fid import fid_resize, to_uint8_images

DEFAULT_PROMPTS = (
    "a red square on a white background",
    "a photo of a dog on the beach",
    "a bowl of fruit on a wooden table",
    "a city street at night",
)


def render_grid(images: Tensor, texts: Sequence[str], columns: int = 4, cell: int = 256) -> Image.Image:
    """Lay out uint8 images ``(N, 3, H, W)`` in a grid, each scaled to ``cell`` px with its text above it (in PIL's
    default font; where that is its Latin-1 bitmap font, other characters show as ``?``).

    Raises:
        ValueError: a different number of images and texts, or no images.
    """
    if len(images) != len(texts) or len(images) == 0:
        raise ValueError(f"render_grid needs as many texts as images (>= 1), got {len(images)} and {len(texts)}")
    font = ImageFont.load_default()
    texts = [drawable_text(t) for t in texts]
    line_h = 12
    chars = max(8, cell // 6)
    wrapped = [textwrap.wrap(t, chars)[:4] or ["(empty)"] for t in texts]
    head = line_h * max(len(w) for w in wrapped) + 4
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * cell, rows * (cell + head)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (img, lines) in enumerate(zip(images, wrapped)):
        x, y = (i % columns) * cell, (i // columns) * (cell + head)
        for j, line in enumerate(lines):
            draw.text((x + 2, y + 2 + j * line_h), line, fill="black", font=font)
        pic = Image.fromarray(img.permute(1, 2, 0).cpu().numpy()).resize((cell, cell), Image.NEAREST)
        grid.paste(pic, (x, y + head))
    return grid


def log_image(trainer: L.Trainer, tag: str, image: Image.Image, texts: Sequence[str]) -> list[Path]:
    """Send ``image`` to every logger of ``trainer`` (see the module docstring); returns the PNG files written.

    W&B and TensorBoard get it at the step Lightning logs the validation's metrics at (the count of batches that
    stepped the optimizer, one less than ``global_step`` at a validation inside ``fit``), so a grid and the ``val/``
    metrics of the same validation share a step; PNG files are named by ``global_step``, as checkpoints are.
    """
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    step = trainer.global_step
    log_step = trainer.fit_loop.epoch_loop._batches_that_stepped  # what Lightning's log_metrics uses
    written: list[Path] = []
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", tag)
    png_dirs, sent = [], False
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=tag, images=[image], step=log_step, caption=[" | ".join(texts)])
            sent = True
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(tag, np.asarray(image), global_step=log_step, dataformats="HWC")
            sent = True
        elif getattr(logger, "log_dir", None):
            png_dirs.append(Path(logger.log_dir) / "samples")
    if not sent and not png_dirs:  # no logger, or only ones that keep nothing locally (MLflow, Comet)
        png_dirs.append(Path(trainer.default_root_dir) / "samples")
    for folder in png_dirs:
        folder.mkdir(parents=True, exist_ok=True)
        path, k = folder / f"{name}-step{step:07d}.png", 0
        while path.exists():  # another grid of this tag at this step (a second validate run): keep both
            k += 1
            path = folder / f"{name}-step{step:07d}-{k}.png"
        image.save(path)
        written.append(path)
    return written


class SampleLoggerCallback(CIDErCallback):
    """Log image grids for fixed prompts and seeds, and captions of fixed images (generated on every rank, logged by
    rank zero).

    Args:
        prompts: captions to draw; each gets one image. They are read (tokenized and shown) as ``cm3leon prepare``
            cleaned the training captions: control characters to spaces, repeated whitespace to one, ends stripped.
        seeds: one seed per prompt (default ``seed + i``).
        caption_data: prepared shards whose first ``num_caption_images`` images are captioned (None: the data
            module's ``val_data`` when it has one, else no captioning).
        caption_samples: in-memory images to caption (``codes`` or ``image``; ``image`` is shown when given).
        num_caption_images: how many images to caption (0: none).
        method: image decoding method (``top_p``, ``temperature``, ``greedy``, ``cd_k``).
        cfg: classifier-free guidance scale.
        temperature: softmax temperature.
        top_p: nucleus mass.
        columns: grid columns.
        cell: pixels per grid cell.
        tag: logger key prefix (``<tag>/text_to_image``, ``<tag>/image_to_text``).
        **kwargs: :class:`GenerationCallback` arguments (``text_tokenizer``, ``vqgan``, ``every_n_val_epochs``...).
            ``vqgan`` is required to draw ``prompts`` and to show or encode images that lack pixels or codes
            (``setup`` says so, before training). :class:`CIDErCallback`'s ``instruction`` and ``max_new_tokens``
            set the captioning; its ``group_by_image``, ``log_name`` and ``tokenizer`` are refused (ValueError naming
            them) rather than ignored.

    Raises:
        ValueError: ``prompts`` a string or holding one that cleans to nothing, ``seeds`` not one per prompt,
            ``num_caption_images < 0``, ``columns < 1`` or ``cell < 1``.
    """

    def __init__(
        self,
        prompts: Sequence[str] = DEFAULT_PROMPTS,
        seeds: Sequence[int] | None = None,
        caption_data: str | None = None,
        caption_samples: Sequence[EvalSample] | None = None,
        num_caption_images: int = 4,
        method: str = "top_p",
        cfg: float = 3.0,
        temperature: float = 1.0,
        top_p: float = 0.9,
        columns: int = 4,
        cell: int = 128,
        tag: str = "samples",
        **kwargs,
    ) -> None:
        refuse_arguments(
            "SampleLoggerCallback",
            kwargs,
            ("group_by_image", "log_name", "tokenizer"),
            "the first num_caption_images images are captioned, and the grids logged under tag",
        )
        super().__init__(caption_data, caption_samples, max(1, num_caption_images), group_by_image=False,
                         tokenizer="simple", log_name=f"{tag}/image_to_text", **kwargs)  # fmt: skip
        if isinstance(prompts, str):  # else each letter would be a prompt
            raise ValueError(
                f"SampleLoggerCallback: prompts must be a list of captions, got the string {prompts!r:.60}"
            )
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"give one seed per prompt: {len(prompts)} prompts, {len(seeds)} seeds")
        for name, value, least in (("num_caption_images", num_caption_images, 0), ("columns", columns, 1),
                                   ("cell", cell, 1)):  # fmt: skip
            if value < least:  # else a silent empty slice, or a failure at the first validation end
                raise ValueError(f"SampleLoggerCallback: {name} must be >= {least}, got {value}")
        self.prompts = [model_text(p, f"SampleLoggerCallback: prompts[{i}]") for i, p in enumerate(prompts)]
        self.seeds = list(seeds) if seeds is not None else [self.seed + i for i in range(len(prompts))]
        self.num_caption_images = num_caption_images
        self.image_sampling = dict(method=method, cfg=cfg, temperature=temperature, top_p=top_p)
        self.columns, self.cell, self.tag = columns, cell, tag
        self.written: list[Path] = []

    @property
    def state_key(self) -> str:
        """The checkpoint key: the class and :attr:`tag` (what tells two sample loggers apart)."""
        return self._generate_state_key(tag=self.tag)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Read the images to caption (if any) once, and check that a VQGAN is given where one is needed; images
        of any sizes are captioned (encoded at the VQGAN's size) and shown (at ``cell``).

        Raises:
            ValueError: no ``vqgan`` while the default :meth:`generate_images` draws ``prompts``, or while an image
                to caption has no pixels to show or no codes (it would fail at the first validation end).
        """
        self.load_resources(trainer)  # a missing tokenizer or VQGAN fails now, not at the first validation
        if self.samples is None and self.num_caption_images > 0:
            source = self.eval_source(trainer, required=False)
            if source is not None:
                try:  # show the source images when the shards keep them, else the VQGAN's decoding of the codes
                    self.samples, _ = read_shard_samples(source, self.num_caption_images, self.cell, False)
                except ValueError:
                    self.samples, _ = read_shard_samples(source, self.num_caption_images, None, False)
        self.samples = list(self.samples or [])[: self.num_caption_images]
        if self.vqgan is None:
            if self.prompts and type(self).generate_images is SampleLoggerCallback.generate_images:
                raise ValueError(
                    "SampleLoggerCallback: give vqgan (a VQGAN weights path or module) to draw the prompts' images, "
                    "or prompts=[]"
                )
            lacking = [s.key for s in self.samples if s.image is None or s.codes is None]
            if lacking:
                raise ValueError(
                    f"SampleLoggerCallback: give vqgan (a VQGAN weights path or module): the images to caption "
                    f"{lacking[:3]} lack pixels to show or codes to caption (or num_caption_images=0)"
                )
        self.resize_images_to_encode()  # at the VQGAN's size, so ones of several sizes stack

    def generate_images(self, pl_module: L.LightningModule, prompts: Sequence[str], seeds: Sequence[int]) -> Tensor:
        """Prompts -> uint8 images ``(N, 3, H, W)``, one per prompt with its own seed. Override to change it."""
        from cm3leon_lightning.generation import generate_image

        tok = self.load_text_tokenizer(pl_module._trainer)
        vqgan = self.load_vqgan(pl_module.device)
        vocab = module_vocab(pl_module._trainer, pl_module)
        out = []
        for prompt, seed in zip(prompts, seeds):
            with self.generating(pl_module) as net:
                gen = generate_image(
                    net,
                    vocab,
                    [tok.encode(prompt)],
                    seed=seed,
                    vqgan=vqgan,
                    compile=self.compile,
                    **self.image_sampling,
                )
            out.append(to_uint8_images(gen.images[0, 0]).cpu())
        return torch.stack(out)

    def log_samples(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[Path]:
        """Generate both grids (on every rank), render and log them (rank zero); returns the PNG files written."""
        written = []
        if self.prompts:
            images = self.generate_images(pl_module, self.prompts, self.seeds)
            if trainer.is_global_zero:
                grid = render_grid(images, self.prompts, self.columns, self.cell)
                written += log_image(trainer, f"{self.tag}/text_to_image", grid, self.prompts)
        if self.samples:
            codes = self.codes_of(self.samples, pl_module.device)
            captions = self.generate(pl_module, codes, self.instruction, self.seed)
            if trainer.is_global_zero:
                if all(s.image is not None for s in self.samples):
                    shown = torch.stack([fid_resize(s.image, self.cell) for s in self.samples])  # of any sizes
                else:
                    vqgan = self.load_vqgan(pl_module.device)
                    with torch.no_grad():
                        shown = to_uint8_images(vqgan.decode(codes.to(pl_module.device))).cpu()
                grid = render_grid(shown, captions, self.columns, self.cell)
                written += log_image(trainer, f"{self.tag}/image_to_text", grid, captions)
        return written

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Every ``every_n_val_epochs`` validation epochs: generate on every rank, log the grids from rank zero."""
        if self.should_run(trainer):
            self.written += self.log_samples(trainer, pl_module)
