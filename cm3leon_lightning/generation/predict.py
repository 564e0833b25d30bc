"""``cm3leon predict``: text-to-image over a file of prompts through Lightning's predict loop, on any number of devices.

:class:`PromptDataModule` reads the prompts, :meth:`CM3LeonModule.predict_step
<cm3leon_lightning.modules.cm3leon.CM3LeonModule.predict_step>` samples image codes with the module's ``generation``
settings, and :class:`ImageWriter` decodes them with the VQGAN and writes PNGs. Lightning's distributed sampler
splits the prompts across devices; every file is named by the prompt's global index, so ranks never collide. Run it
with the saved config of the fit that wrote the checkpoint (its model section)::

    cm3leon predict --config run/config.yaml --ckpt_path run/ckpt/last.ckpt \\
        --trainer.default_root_dir out/ --trainer.devices 2 --return_predictions false \\
        --data cm3leon_lightning.generation.predict.PromptDataModule \\
        --data.prompts prompts.txt --data.tokenizer tok/ --data.vocab_from run/ckpt/last.ckpt \\
        --trainer.callbacks+=cm3leon_lightning.generation.predict.ImageWriter \\
        --trainer.callbacks.output_dir out/ --trainer.callbacks.vqgan vqgan/ \\
        --model.init_args.generation.num_samples 4 --model.init_args.generation.cfg 3

``--trainer.default_root_dir`` keeps the predict run's own ``config.yaml`` out of the fit's directory (without a
logger LightningCLI writes it to the root dir, over the fit's config). ``--return_predictions false`` keeps the
codes of a long prompts file out of memory. ``--data.vocab_from`` may also name the prepared training data.
Each prompt's samples depend only on its seed, so 1 or 8 devices give the same images.

``prompts.txt`` holds one prompt per line (blank lines skipped); ``prompts.jsonl`` one ``{"prompt": ..., "seed":
...}`` object per line (``seed`` optional). A prompt is tokenized as ``cm3leon prepare`` stored its training captions
(:func:`~cm3leon_lightning.data.cleaning.clean_caption`: control characters become spaces, whitespace runs one space,
ends stripped), and ``predictions.jsonl`` records it as given. ``out/`` receives, for prompt ``i``,
``{i:06d}-{j}.png`` per candidate ``j``, ``{i:06d}-grid.png`` (the candidates under the prompt),
``{i:06d}-codes.npy`` ``(N, grid_h * grid_w)``, and one line of ``predictions.jsonl`` (``index``, ``prompt``,
``seed``, ``files``, ``grid``, ``codes``), sorted by index; ``predict_settings.json`` records what decided the images
(the model, the ``generation`` settings, the writer's VQGAN, re-ranking and grid).
``--trainer.callbacks.clip ViT-B-32`` re-ranks each prompt's candidates with CLIP and writes them best first (adding
``clip_scores`` and ``order`` to the line); ``--trainer.callbacks.keep 1`` then writes only the best.
An ``out/`` that already holds such files (an earlier or stopped run) is refused before anything is decoded;
``--trainer.callbacks.overwrite true`` deletes them first, ``--trainer.callbacks.resume true`` keeps the prompts
written completely (those with a JSON line) and decodes only the others (on any number of devices; settings other
than the recorded ones are refused, naming each). A prompt too
long for the model's context is refused before the first prompt is decoded, naming its line in the file.

Unlike the rest of :mod:`cm3leon_lightning.generation` this module imports Lightning; the package ``__init__`` does
not import it.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from cm3leon_lightning.data.cleaning import model_text
from cm3leon_lightning.files import text_lines
from cm3leon_lightning.generation.predict_writer import (
    OUTPUT_NAME,
    PREDICTIONS_FILE,
    ImageWriter,
    previous_outputs,
    written_rows,
)
from cm3leon_lightning.generation.sampling import SEED_LIMIT  # a prompts file's seeds lie below it
from cm3leon_lightning.tokenization.vocab import MultimodalVocab

__all__ = [
    "OUTPUT_NAME",
    "PREDICTIONS_FILE",
    "ImageWriter",
    "PromptDataModule",
    "PromptDataset",
    "collate_prompts",
    "load_vocab",
    "previous_outputs",
    "read_prompt_lines",
    "read_prompts",
    "written_rows",
]


# ------------------------------------------------------------------------------------------------ reading


def read_prompts(path: str | os.PathLike[str]) -> list[tuple[str, int | None]]:
    """``(prompt, seed or None)`` pairs from a ``.txt`` (one prompt per line) or ``.jsonl`` file.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: an unknown suffix, a malformed line (file and line number named), or no prompt at all.
    """
    return [(prompt, seed) for _, prompt, seed in read_prompt_lines(path)]


def read_prompt_lines(path: str | os.PathLike[str]) -> list[tuple[int, str, int | None]]:
    """``(line number, prompt, seed or None)`` of each prompt of a prompts file (see :func:`read_prompts`)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompts: file not found: {p}")
    if p.suffix not in (".txt", ".jsonl"):
        raise ValueError(f"prompts: {p} must end in .txt (one prompt per line) or .jsonl ({{'prompt', 'seed'}})")
    out: list[tuple[int, str, int | None]] = []
    for n, line in text_lines(p, "prompts: "):
        if p.suffix == ".txt":
            model_text(line, f"prompts: {p} line {n}")
            out.append((n, line.strip(), None))
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"prompts: {p} line {n} is not JSON: {e}") from e
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise ValueError(f"prompts: {p} line {n} must be an object with a non-empty string 'prompt'")
        extra = sorted(set(row) - {"prompt", "seed"})
        if extra:
            raise ValueError(f"prompts: {p} line {n} has unknown fields {extra}; allowed: 'prompt', 'seed'")
        model_text(row["prompt"], f"prompts: {p} line {n}")
        seed = row.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < SEED_LIMIT):
            raise ValueError(f"prompts: {p} line {n}: 'seed' must be a non-negative integer below 2**63, got {seed!r}")
        out.append((n, row["prompt"], seed))
    if not out:
        raise ValueError(f"prompts: {p} holds no prompt")
    return out


def load_vocab(source: str | os.PathLike[str]) -> MultimodalVocab:
    """The vocabulary of a checkpoint (``hyper_parameters["vocab"]``, a ``.ckpt`` or FSDP's sharded directory), a
    model directory of ``cm3leon export`` (either layout), a ``manifest.json`` or a prepared directory. No weights
    are read.

    Raises:
        FileNotFoundError: nothing at ``source``.
        ValueError: the file holds no vocabulary.
    """
    from cm3leon_lightning.data.shards import MANIFEST_NAME, Manifest
    from cm3leon_lightning.model.pretrained import is_hf_dir, is_model_dir, read_hf_block, read_model_config
    from cm3leon_lightning.model.weights import SHARDED_META, load_error

    p = Path(source)
    if is_hf_dir(p):
        return MultimodalVocab.from_dict(read_hf_block(p, "vocab_from")["vocab"], f"vocab_from: {p}: vocab")
    if is_model_dir(p):
        return MultimodalVocab.from_dict(read_model_config(p, "vocab_from")["vocab"], f"vocab_from: {p}: vocab")
    if p.is_dir():
        p = p / (SHARDED_META if (p / SHARDED_META).is_file() else MANIFEST_NAME)
    if not p.is_file():
        raise FileNotFoundError(
            f"vocab_from: no checkpoint, model directory, manifest.json or prepared directory at {source}"
        )
    if p.suffix == ".json":
        return Manifest.load(p).vocab()
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(p))
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a usable checkpoint"
        raise ValueError(
            f"vocab_from: {p} is neither a manifest.json nor a readable torch checkpoint: {load_error(e)}"
        ) from e
    vocab = ckpt.get("hyper_parameters", {}).get("vocab") if isinstance(ckpt, dict) else None
    if not vocab:
        raise ValueError(
            f"vocab_from: checkpoint {p} has no hyper_parameters['vocab']; was it written by CM3LeonModule?"
        )
    return MultimodalVocab.from_dict(vocab, f"vocab_from: checkpoint {p}: hyper_parameters['vocab']")


class PromptDataset(Dataset):
    """Map-style prompts (so Lightning's distributed sampler can split them): item ``i`` is prompt ``indices[i]`` of
    the file (all of them, in order, unless some were excluded by :meth:`PromptDataModule.exclude`), with ``repeat``
    False; then ``padding`` more items repeat those prompts with ``repeat`` True (fillers, which
    :class:`ImageWriter` does not write: every device must get a prompt, see
    :meth:`PromptDataModule.predict_dataloader`)."""

    def __init__(self, prompts: list[tuple[str, int | None]], ids: list[list[int]]) -> None:
        self.prompts, self.ids = prompts, ids
        self.indices = list(range(len(prompts)))
        self.padding = 0

    def __len__(self) -> int:
        return len(self.indices) + (self.padding if self.indices else 0)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self):
            raise IndexError(f"prompt item {i} out of range (0 to {len(self) - 1})")
        j = self.indices[i % len(self.indices)]
        return {"index": j, "prompt": self.prompts[j][0], "ids": self.ids[j], "seed": self.prompts[j][1],
                "repeat": i >= len(self.indices)}  # fmt: skip


def collate_prompts(items: list[dict[str, Any]]) -> dict[str, list]:
    """Items -> lists by field (prompts differ in length; ``generate_image`` takes id lists); ``repeat`` is False for
    items that lack it."""
    batch = {key: [item[key] for item in items] for key in ("index", "prompt", "ids", "seed")}
    batch["repeat"] = [bool(item.get("repeat", False)) for item in items]
    return batch


class PromptDataModule(L.LightningDataModule):
    """Prompts for ``cm3leon predict``, tokenized with the text tokenizer of the checkpoint.

    Args:
        prompts: ``.txt`` file (one prompt per line) or ``.jsonl`` file (``{"prompt": ..., "seed": ...}``).
        tokenizer: the text tokenizer the model was trained with: ``tokenizer.json`` or its directory.
        vocab_from: where the model's vocabulary is recorded: the checkpoint (``.ckpt``), or the prepared training
            data (directory or ``manifest.json``). The CLI links it to the model; it must match the tokenizer: its
            size, and the ``tokenizer.json`` sha256 where ``vocab_from`` records one (older checkpoints do not: a
            warning then says the tokenizer cannot be checked).
        batch_size: prompts per predict step (each prompt still decodes as its own batch of candidates).
        num_workers: data loader workers.
    """

    def __init__(
        self, prompts: str, tokenizer: str, vocab_from: str, batch_size: int = 4, num_workers: int = 0
    ) -> None:
        super().__init__()
        from cm3leon_lightning.tokenization.text import TextTokenizer

        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size} and {num_workers}")
        self.prompts_path, self.batch_size, self.num_workers = prompts, batch_size, num_workers
        self.tokenizer = TextTokenizer.load(tokenizer)
        self.vocab = load_vocab(vocab_from)
        have = (self.tokenizer.vocab_size, self.tokenizer.num_sentinels)
        if have != (self.vocab.n_text, self.vocab.num_sentinels):
            raise ValueError(
                f"vocabulary mismatch: {vocab_from} has n_text={self.vocab.n_text}, "
                f"num_sentinels={self.vocab.num_sentinels} but tokenizer {tokenizer} has vocab_size={have[0]}, "
                f"num_sentinels={have[1]}"
            )
        from cm3leon_lightning.generation.cli import check_tokenizers

        check_tokenizers(self.vocab, self.tokenizer, None, f"vocab_from {vocab_from}", flags=("tokenizer", "vqgan"))
        self.dataset: PromptDataset | None = None
        self.lines: list[int] = []  # each prompt's line in the file

    def setup(self, stage: str) -> None:
        """Read and tokenize the prompts (once)."""
        if self.dataset is None:
            rows = read_prompt_lines(self.prompts_path)
            prompts = [(prompt, seed) for _, prompt, seed in rows]
            self.lines = [n for n, _, _ in rows]
            ids = self.tokenizer.encode_batch([model_text(p) for p, _ in prompts])  # as training captions
            self.dataset = PromptDataset(prompts, ids)

    def exclude(self, done: dict[int, dict[str, Any]], source: str, base_seed: int | None = None) -> None:
        """Leave out the prompts of ``done`` (index -> the JSON line an earlier run wrote for it, read from
        ``source``): a resumed run decodes the others only.

        ``base_seed`` is the generation settings' seed: a prompt the file gives no seed decodes with ``base_seed +
        index``, so an earlier line's seed must be that (else the earlier run read the seeds of another file).

        Raises:
            ValueError: naming ``source`` and the index, when a line's prompt or seed is not what this prompts file
                gives: the earlier run read another file.
        """
        if self.dataset is None:
            self.setup("predict")
        assert self.dataset is not None
        prompts = self.dataset.prompts
        for index, row in sorted(done.items()):
            if index >= len(prompts) or row.get("prompt") != prompts[index][0]:
                have = repr(prompts[index][0][:60]) if index < len(prompts) else f"no prompt {index}"
                raise ValueError(
                    f"resume: {source} holds prompt {index} {str(row.get('prompt'))[:60]!r}, but {self.prompts_path} "
                    f"has {have}: the earlier run read another prompts file; give its file, or a new output_dir"
                )
            given = prompts[index][1]
            if given is not None and row.get("seed") != given:
                raise ValueError(
                    f"resume: {source} decoded prompt {index} with seed {row.get('seed')}, but {self.prompts_path} "
                    f"gives seed {given}; give the earlier run's file, or a new output_dir"
                )
            if given is None and base_seed is not None and row.get("seed") != base_seed + index:
                raise ValueError(
                    f"resume: {source} decoded prompt {index} with seed {row.get('seed')}, but {self.prompts_path} "
                    f"gives it no seed, so this run would use {base_seed + index} (generation.seed {base_seed} + "
                    "index): the earlier run read another file's seeds; give its file, or a new output_dir"
                )
        self.dataset.indices = [i for i in range(len(prompts)) if i not in done]

    def check_lengths(self, max_seq_len: int) -> None:
        """Raise ValueError naming the file and lines of the prompts whose ``<eos> caption <break>`` and image do
        not fit a context of ``max_seq_len`` (before any prompt is decoded, not when the first such one comes up)."""
        if self.dataset is None:
            self.setup("predict")
        assert self.dataset is not None
        image = self.vocab.image_tokens
        over = [
            (n, len(ids)) for n, ids in zip(self.lines, self.dataset.ids)
            if len(self.vocab.text_to_image_prompt(ids)) + image > max_seq_len
        ]  # fmt: skip
        if over:
            lines = ", ".join(f"line {n} ({k} text tokens)" for n, k in over[:5]) + (" ..." if len(over) > 5 else "")
            raise ValueError(
                f"prompts: {self.prompts_path}: {len(over)} prompt(s) too long for the model's context "
                f"max_seq_len={max_seq_len}, which must hold <eos>, the prompt's text tokens, <break> and {image} "
                f"image tokens (at most {max_seq_len - image - 2} text tokens): {lines}"
            )

    def predict_dataloader(self) -> DataLoader:
        """Prompts in file order; Lightning adds the distributed sampler on several devices. With a trainer whose
        module's network is built (``model.config.max_seq_len``), every prompt is first checked to fit it.

        Fewer prompts to decode than devices (a short file, or a resumed run with a few left) are padded with
        repeats flagged ``repeat`` up to one per device: Lightning's sampler gave the others none, and a rank without
        a batch stopped with "``DataLoader`` within local rank has zero length" while the others waited for it.
        """
        if self.dataset is None:
            self.setup("predict")
        assert self.dataset is not None
        module = self.trainer.lightning_module if self.trainer is not None else None
        max_seq_len = getattr(getattr(getattr(module, "model", None), "config", None), "max_seq_len", None)
        if isinstance(max_seq_len, int):
            self.check_lengths(max_seq_len)
        world = self.trainer.world_size if self.trainer is not None else 1
        self.dataset.padding = max(0, world - len(self.dataset.indices))
        return DataLoader(
            self.dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
            collate_fn=collate_prompts,
        )  # fmt: skip
