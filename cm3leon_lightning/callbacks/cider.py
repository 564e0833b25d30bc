"""CIDErCallback: caption fixed validation images with ``generate_text`` and log CIDEr-D (paper section 4.2).

The score is pycocoevalcap's ``Cider`` (the CIDEr-D variant; see :mod:`cm3leon_lightning.metrics.cider`) over the
captions of every rank, tokenized with PTB when Java is present, otherwise with the documented fallback tokenizer
(the warning comes at construction). Captions come from the image codes stored in the shards (``image.npy``), so no
VQGAN is needed; references are the samples' captions, grouped per identical source image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from cm3leon_lightning.callbacks.base import (
    EvalSample,
    GenerationCallback,
    module_vocab,
    read_shard_samples,
)
from cm3leon_lightning.data.cleaning import model_text
from cm3leon_lightning.metrics.cider import CIDErD
from cm3leon_lightning.metrics.fid import fid_resize


class CIDErCallback(GenerationCallback):
    """Generate captions for fixed validation images and log ``val/cider`` (CIDEr-D).

    Args:
        data: prepared shards (directory or manifest); None: the data module's ``val_data``.
        samples: in-memory samples (``references`` and ``codes`` or ``image``), instead of ``data``.
        num_samples: images captioned, the first ones in manifest order.
        group_by_image: merge samples with identical ``jpg`` into one image with several references, gathered
            from the whole dataset (an image's captions need not be next to each other).
        instruction: text placed before the answer span (empty for plain captioning), read as the training captions
            were cleaned (control characters to spaces, repeated whitespace to one, ends stripped).
        max_new_tokens: the most tokens per caption.
        method: ``greedy``, ``temperature`` or ``top_p``.
        temperature: softmax temperature.
        top_p: nucleus mass.
        tokenizer: CIDEr tokenization: ``auto`` (PTB with Java, else fallback), ``ptb`` or ``simple``.
        log_name: the logged key.
        layout: the prompt layout of :func:`~cm3leon_lightning.generation.generate_text`: ``infill`` (the answer
            infills a span before the image) or ``image_first`` (it follows the image and the instruction).
        **kwargs: :class:`GenerationCallback` arguments (``text_tokenizer``, ``vqgan``, ``batch_size``, ``seed``...).
    """

    def __init__(
        self,
        data: str | None = None,
        samples: Sequence[EvalSample] | None = None,
        num_samples: int = 500,
        group_by_image: bool = True,
        instruction: str = "",
        max_new_tokens: int = 32,
        method: str = "greedy",
        temperature: float = 1.0,
        top_p: float = 0.9,
        tokenizer: str = "auto",
        log_name: str = "val/cider",
        layout: str = "infill",
        **kwargs,
    ) -> None:
        from cm3leon_lightning.generation.generate import TEXT_LAYOUTS

        super().__init__(**kwargs)
        if num_samples < 1 or max_new_tokens < 1:
            raise ValueError(f"num_samples and max_new_tokens must be >= 1, got {num_samples}, {max_new_tokens}")
        if layout not in TEXT_LAYOUTS:
            raise ValueError(f"layout must be one of {TEXT_LAYOUTS}, got {layout!r}")
        self.data, self.samples = data, list(samples)[:num_samples] if samples is not None else None
        # as the model reads it (training captions were cleaned); blank is refused, "" is none
        where = f"{type(self).__name__}: instruction"
        instruction = model_text(instruction, where, "the instruction", allow_empty=True)
        self.num_samples, self.group_by_image, self.instruction = num_samples, group_by_image, instruction
        self.decoding = dict(
            max_new_tokens=max_new_tokens, method=method, temperature=temperature, top_p=top_p, layout=layout
        )
        self.log_name = log_name
        self.metric = CIDErD(tokenizer=tokenizer)  # resolves the tokenizer (and warns) now

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Read the evaluation images (codes and captions) once and check each has reference captions; warn when every
        image has only one (the default ``--coco-mode first`` preparation), as CIDEr-D then differs from COCO's."""
        self.load_resources(trainer)  # a missing tokenizer or VQGAN fails now, not at the first validation
        if self.samples is None:
            self.samples, _ = read_shard_samples(
                self.eval_source(trainer), self.num_samples, None, self.group_by_image, all_references=True
            )
        if not self.samples:
            raise ValueError("CIDErCallback: the evaluation set is empty")
        for s in self.samples:  # checked now, not after the first validation's captions are generated
            refs = s.references
            if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
                raise ValueError(
                    f"CIDErCallback: sample {s.key!r} needs a non-empty list of reference captions, got {refs!r}"
                )
        self.check_images("CIDErCallback")
        if len(self.samples) > 1 and all(len(s.references) == 1 for s in self.samples):
            rank_zero_warn(
                f"CIDErCallback: each of the {len(self.samples)} evaluation images has one reference caption, so "
                f"{self.log_name} is a one-reference CIDEr-D, not comparable with MS-COCO CIDEr (5 references per "
                "image; for COCO, prepare the validation set with `cm3leon prepare --coco-mode all` and keep "
                "group_by_image=True, which gathers an image's captions)"
            )

    def check_images(self, name: str) -> None:
        """Refuse samples with neither codes nor an image, or with an image to encode and no ``vqgan`` (they failed at
        the first validation's end, after training), naming the sample; bring images to encode to the VQGAN's size
        (:meth:`resize_images_to_encode`)."""
        for s in self.samples or ():
            if s.codes is None and s.image is None:
                raise ValueError(f"{name}: sample {s.key!r} has neither codes nor an image")
            if s.codes is None and self.vqgan is None:
                raise ValueError(
                    f"{name}: give vqgan (a VQGAN weights path or module) to encode the image of sample {s.key!r}"
                    " (it has no codes)"
                )
        self.resize_images_to_encode()

    def resize_images_to_encode(self) -> None:
        """With a ``vqgan``, bring the images of samples without codes to the VQGAN's size, so images of several
        sizes stack (samples with codes, or without an image, are kept as they are)."""
        if self.vqgan is not None and self.samples:
            size = int(self.load_vqgan().config.resolution)
            self.samples = [s if s.codes is not None or s.image is None else replace(s, image=fid_resize(s.image, size))
                            for s in self.samples]  # fmt: skip

    def codes_of(self, chunk: Sequence[EvalSample], device: torch.device) -> Tensor:
        """``(B, h*w)`` codes of the samples (the stored ones, else their images encoded with the VQGAN)."""
        missing = [i for i, s in enumerate(chunk) if s.codes is None]
        encoded = self.encode_images(torch.stack([chunk[i].image for i in missing]), device) if missing else None
        codes = [torch.as_tensor(s.codes).long() for s in chunk if s.codes is not None]
        out, k, j = [], 0, 0
        for i in range(len(chunk)):
            if missing and k < len(missing) and missing[k] == i:
                out.append(encoded[k])
                k += 1
            else:
                out.append(codes[j])
                j += 1
        return torch.stack(out)

    def generate(
        self, pl_module: L.LightningModule, codes: Tensor, instruction: str | Sequence[str], seed: int
    ) -> list[str]:
        """Image codes ``(B, h*w)`` and one instruction (or one per image) -> B texts. Override to change how
        captions are made.

        The default runs :func:`~cm3leon_lightning.generation.generate_text` with the module's network and decodes
        the ids with the text tokenizer. Instructions are tokenized as the training captions were cleaned
        (:func:`~cm3leon_lightning.data.cleaning.model_text`); an empty one is plain captioning (of its image).
        """
        from cm3leon_lightning.generation import generate_text

        tok = self.load_text_tokenizer(pl_module._trainer)
        if isinstance(instruction, str):
            text = model_text(instruction, "instruction", "the instruction", allow_empty=True)
            prompt = tok.encode(text) if text else None
        else:
            prompt = tok.encode_batch([model_text(t, f"instruction[{i}]", "the instruction", allow_empty=True)
                                       for i, t in enumerate(instruction)])  # fmt: skip
        with self.generating(pl_module) as net:
            ids = generate_text(
                net,
                module_vocab(pl_module._trainer, pl_module),
                codes,
                prompt,
                seed=seed,
                compile=self.compile,
                **self.decoding,
            )
        return [tok.decode(i).strip() for i in ids]

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        """Caption this rank's images, update the metric, and return the CIDEr-D of all ranks' captions."""
        self.metric = self.metric.to(pl_module.device)
        self.metric.reset()
        share = self.rank_batches(trainer)  # the captions of a one-device run on any number of devices
        if not share:  # a rank without images still updates, so every rank's metric syncs alike
            self.metric.update([], [])
        for seed, items in share:
            captions = self.generate(pl_module, self.codes_of(items, pl_module.device), self.instruction, seed)
            self.metric.update(captions, [s.references for s in items])
        return float(self.metric.compute())

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Every ``every_n_val_epochs`` validation epochs: compute and log :attr:`log_name` on every rank."""
        if self.should_run(trainer):
            pl_module.log(self.log_name, self.evaluate(trainer, pl_module), sync_dist=False)
