"""Shared machinery of the evaluation callbacks: evaluation samples, generation resources, scheduling, ranks.

An evaluation callback reads a fixed, ordered set of :class:`EvalSample` (from prepared shards that keep the source
``jpg``, from a VQA-format JSON file, or given in memory), splits it across ranks (``samples[rank::world_size]``),
generates with the module's network through a small overridable method, updates a torchmetrics metric on every rank
and logs the synchronised value. Generation resources (text tokenizer, VQGAN, CLIP re-ranker) are given as paths
(YAML) or objects (notebooks, tests) and loaded in ``setup``, so a missing file fails at the start of a run, not
after the first epoch.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from cm3leon_lightning.data.shards import Manifest
from cm3leon_lightning.metrics.fid import fid_resize
from cm3leon_lightning.tokenization.text import TextTokenizer
from cm3leon_lightning.tokenization.vocab import MultimodalVocab


@dataclass
class EvalSample:
    """One evaluation item.

    Attributes:
        key: stable id (the shard key).
        references: the captions of the image (the first one is the text-to-image prompt).
        image: the source image as uint8 ``(3, S, S)`` after :func:`~cm3leon_lightning.metrics.fid_resize`, or None.
        codes: the image's codes ``(grid_h * grid_w,)``, or None (then encoded with the VQGAN when needed).
        question: the question (VQA data).
        answers: the human answers (VQA data).
    """

    key: str
    references: list[str] = field(default_factory=list)
    image: Tensor | None = None
    codes: Tensor | None = None
    question: str | None = None
    answers: list[str] | None = None


def manifest_path(source: str | os.PathLike[str]) -> Path:
    """A shards directory or ``manifest.json`` path -> the manifest file (raises FileNotFoundError)."""
    path = Path(source)
    path = path / "manifest.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"evaluation data: no manifest.json at {source} (give a prepared shards directory)")
    return path


def read_shard_samples(
    source: str | os.PathLike[str],
    num_samples: int,
    image_size: int | None = None,
    group_by_image: bool = True,
    all_references: bool = False,
) -> tuple[list[EvalSample], str]:
    """The first ``num_samples`` images of a prepared dataset, in manifest order, with their captions and codes.

    Args:
        source: shards directory or ``manifest.json``.
        num_samples: how many distinct images to read (fewer when the dataset is smaller).
        image_size: decode each sample's ``jpg`` to this size (:func:`fid_resize`); None leaves ``image`` None.
        group_by_image: samples with byte-identical ``jpg`` (e.g. COCO's five captions per image) become one item
            with several references.
        all_references: with ``group_by_image``, read the whole dataset for the references of the images kept
            (COCO's annotation order scatters an image's five captions, so stopping at the ``num_samples``-th image
            drops some of them and lowers CIDEr); no further images are added.

    Returns:
        The samples and an id of the selection (sha256 over the manifest's shard hashes and these arguments; the
        FID cache is keyed by the reference pixels instead, ``callbacks.fid.reference_images_id``).

    Raises:
        ValueError: ``image_size`` given but a sample has no ``jpg``.
    """
    from cm3leon_lightning.data.shards import Manifest, read_shard

    mpath = manifest_path(source)
    manifest = Manifest.load(mpath)
    out: list[EvalSample] = []
    by_image: dict[str, EvalSample] = {}
    done = False
    for info in manifest.shards:
        for s in read_shard(mpath.parent / info.name, manifest):
            digest = hashlib.sha256(s.jpg).hexdigest() if s.jpg is not None else None
            if group_by_image and digest is not None and digest in by_image:
                by_image[digest].references.append(s.caption)
                continue
            if len(out) == num_samples:
                if group_by_image and all_references:
                    continue  # only references of the images already kept from here on
                done = True
                break
            if image_size is not None and s.jpg is None:
                raise ValueError(
                    f"{mpath.parent / info.name}: sample {s.key!r} has no jpg (only cm3leon "
                    "prepare's validation split keeps the source images, keep_val_jpg)"
                )
            image = fid_resize(s.jpg, image_size) if image_size is not None else None
            item = EvalSample(s.key, [s.caption], image, torch.as_tensor(s.image.astype("int64")))
            out.append(item)
            if digest is not None:
                by_image[digest] = item
        if done:
            break
    h = hashlib.sha256(f"{num_samples}|{image_size}|{group_by_image}{'|all' if all_references else ''}".encode())
    for info in manifest.shards:
        h.update(info.sha256.encode())
    return out, h.hexdigest()


def rank_share(items: Sequence[Any], trainer: L.Trainer) -> list[Any]:
    """This rank's items: ``items[rank::world_size]`` (every rank evaluates; metrics sum or gather)."""
    return list(items[trainer.global_rank :: trainer.world_size])


def batches(items: Sequence[Any], size: int) -> list[list[Any]]:
    """Consecutive chunks of at most ``size`` items."""
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def module_vocab(trainer: L.Trainer, pl_module: L.LightningModule) -> MultimodalVocab:
    """The vocabulary of the module (``pl_module.vocab``), else of the data module (raises when unknown)."""
    vocab = getattr(pl_module, "vocab", None)
    if vocab is None:
        vocab = getattr(getattr(trainer, "datamodule", None), "vocab", None)
    if vocab is None:
        raise ValueError("evaluation callback: neither the module nor the data module knows the vocabulary")
    return vocab if isinstance(vocab, MultimodalVocab) else MultimodalVocab(**dict(vocab))


def module_network(pl_module: L.LightningModule) -> nn.Module:
    """The CM3Leon network inside the module (``pl_module.model``)."""
    net = getattr(pl_module, "model", None)
    if net is None:
        raise ValueError(f"{type(pl_module).__name__} has no built `model` to generate with")
    return net


@contextmanager
def fresh_kv_cache(net: nn.Module) -> Iterator[nn.Module]:
    """Generate with a KV cache made for this call and dropped after it.

    A cache left on the network would hold memory during training, and one allocated under ``inference_mode``
    (inside validation) cannot be updated by a later call outside it.
    """
    net.kv_cache = None
    try:
        yield net
    finally:
        net.kv_cache = None


def check_unsharded(trainer: L.Trainer | None, owner: str) -> None:
    """Raise ValueError when ``trainer`` shards the model's parameters across devices (FSDP other than ``NO_SHARD``,
    or ``ModelParallelStrategy``, on more than one device).

    The callbacks decode through ``pl_module.model`` outside the training step, where the sharded root parameters
    (embeddings, LM head) are not gathered; and ranks stop decoding text at different steps, so a forward that needs
    every rank would hang. DDP and single-device runs are fine.
    """
    if trainer is None or getattr(trainer, "world_size", 1) <= 1:
        return
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    strategy = trainer.strategy
    sharding = getattr(strategy, "sharding_strategy", None)
    sharded = isinstance(strategy, ModelParallelStrategy) or (
        isinstance(strategy, FSDPStrategy) and getattr(sharding, "name", sharding) != "NO_SHARD"
    )
    if sharded:
        how = type(strategy).__name__ + (f" ({getattr(sharding, 'name', sharding)})" if sharding is not None else "")
        raise ValueError(
            f"{owner}: generating with a model sharded across {trainer.world_size} devices by {how} is not supported "
            "(the decode runs outside the training step, where the shards are not gathered). Drop the callback from "
            "the sharded run and evaluate a saved checkpoint on one device: `cm3leon validate` without the FSDP "
            "trainer config, with --model.init_args.init_from=<the checkpoint directory>"
        )


def refuse_arguments(owner: str, kwargs: dict[str, Any], names: Sequence[str], why: str) -> None:
    """Raise ValueError naming the arguments of ``names`` found in ``kwargs``: parent-class arguments that ``owner``
    does not use (they were accepted and silently ignored); ``why`` says what ``owner`` does instead."""
    given = [name for name in names if name in kwargs]
    if given:
        raise ValueError(f"{owner}: {', '.join(given)} {'is' if len(given) == 1 else 'are'} not used ({why})")


PLACEHOLDER_VQGAN = "artifacts/vqgan"
"""The ``vqgan`` of ``configs/callbacks/*.yaml``, to be replaced by the user's VQGAN."""
PLACEHOLDER_HINT = (
    f" ({PLACEHOLDER_VQGAN} is the callback YAMLs' placeholder; with several callback configs composed, "
    "--trainer.callbacks.vqgan sets only the last one's: point each YAML, or a copy, at your VQGAN)"
)


class GenerationCallback(L.Callback):
    """Base class: scheduling and the text tokenizer / VQGAN resources of the evaluation callbacks.

    Args:
        text_tokenizer: path of ``tokenizer.json`` (or its directory) or a ``TextTokenizer``. None: the path in the
            data module's manifest (``text_tokenizer.path``), when there is one.
        vqgan: VQGAN weights directory / file (``VQGAN.from_pretrained``) or a ``VQGAN`` module.
        vqgan_preset: preset name for weights files that carry no config.
        every_n_val_epochs: run at every n-th validation epoch end (never during the sanity check).
        batch_size: prompts per generation batch.
        seed: base seed; each generation batch samples with ``seed`` plus an offset of the subclass's choosing (FID,
            CIDEr and VQA: the index of the batch's first item, so the results do not depend on the device count).
        compile: compile the decode step (None: on CUDA).
        autocast: decode under the trainer's precision context (autocast with ``bf16-mixed`` / ``16-mixed``), as
            Lightning runs ``validation_step``; False: in the weights' dtype (float32 under mixed precision, slower
            on GPUs). The VQGAN decodes the codes in its own dtype either way.
    """

    def __init__(
        self,
        text_tokenizer: str | TextTokenizer | None = None,
        vqgan: str | nn.Module | None = None,
        vqgan_preset: str | None = None,
        every_n_val_epochs: int = 1,
        batch_size: int = 8,
        seed: int = 0,
        compile: bool | None = None,
        autocast: bool = True,
    ) -> None:
        if every_n_val_epochs < 1 or batch_size < 1:
            raise ValueError(f"every_n_val_epochs and batch_size must be >= 1, got {every_n_val_epochs}, {batch_size}")
        self.text_tokenizer = text_tokenizer
        self.vqgan = vqgan
        self.vqgan_preset = vqgan_preset
        self.every_n_val_epochs = every_n_val_epochs
        self.batch_size = batch_size
        self.seed = seed
        self.compile = compile
        self.autocast = autocast
        self._val_epochs = 0

    @contextmanager
    def generating(self, pl_module: L.LightningModule) -> Iterator[nn.Module]:
        """The module's network (:func:`module_network`) with a fresh KV cache (:func:`fresh_kv_cache`), under the
        trainer's precision context when :attr:`autocast` (autocast with mixed precision)."""
        trainer = pl_module._trainer
        precision = trainer.precision_plugin.forward_context() if self.autocast and trainer is not None else None
        with precision or nullcontext(), fresh_kv_cache(module_network(pl_module)) as net:
            yield net

    # ------------------------------------------------------------------------------------------ resources
    def load_text_tokenizer(self, trainer: L.Trainer | None) -> TextTokenizer:
        """Resolve :attr:`text_tokenizer` (object, path, or the data manifest's path) once."""
        if isinstance(self.text_tokenizer, TextTokenizer):
            return self.text_tokenizer
        path, manifest = self.text_tokenizer, None
        if path is None:
            manifest = getattr(getattr(trainer, "datamodule", None), "manifest", None)
            path = manifest.text_tokenizer_path() if isinstance(manifest, Manifest) else None
        if path is None:
            raise ValueError(f"{type(self).__name__}: give text_tokenizer (a tokenizer.json path)")
        tokenizer = TextTokenizer.load(path)
        recorded = manifest.text_tokenizer.get("sha256") if manifest is not None else None
        if recorded and tokenizer.sha256 != recorded:
            raise ValueError(
                f"{type(self).__name__}: the tokenizer at {path} (sha256 {tokenizer.sha256[:12]}...) is not the one "
                f"the data manifest {manifest.location} records ({recorded[:12]}...); give text_tokenizer"
            )
        self.text_tokenizer = tokenizer
        return self.text_tokenizer

    def load_resources(self, trainer: L.Trainer | None) -> None:
        """Resolve the tokenizer and the VQGAN (when one is given) now, and refuse a sharded model
        (:func:`check_unsharded`): subclasses call it in ``setup``, so a missing or wrong file or an unsupported
        strategy stops the run before training, not at the first validation hours later."""
        check_unsharded(trainer, type(self).__name__)
        self.load_text_tokenizer(trainer)
        if self.vqgan is not None:
            self.load_vqgan()

    def load_vqgan(self, device: torch.device | None = None) -> nn.Module:
        """Resolve :attr:`vqgan` (module or path) once, in eval mode, on ``device``."""
        if self.vqgan is None:
            raise ValueError(f"{type(self).__name__}: give vqgan (a VQGAN weights path or module)")
        if not isinstance(self.vqgan, nn.Module):
            from cm3leon_lightning.tokenization.vqgan import VQGAN

            try:
                self.vqgan = VQGAN.from_pretrained(self.vqgan, preset=self.vqgan_preset)
            except (FileNotFoundError, ValueError) as e:  # name the callback: composed configs hold several
                hint = PLACEHOLDER_HINT if str(self.vqgan) == PLACEHOLDER_VQGAN else ""
                raise type(e)(f"{type(self).__name__} vqgan: {e}{hint}") from e
        self.vqgan.eval().requires_grad_(False)
        if device is not None:
            self.vqgan.to(device)
        return self.vqgan

    def encode_images(self, images: Tensor, device: torch.device) -> Tensor:
        """uint8 ``(B, 3, S, S)`` -> ``(B, h*w)`` codes with the VQGAN (resized to its resolution first)."""
        vqgan = self.load_vqgan(device)
        size = int(vqgan.config.resolution)
        batch = torch.stack([fid_resize(img, size) for img in images]).to(device)
        with torch.no_grad():
            return vqgan.encode(batch).long().cpu()

    def rank_batches(self, trainer: L.Trainer) -> list[tuple[int, list[EvalSample]]]:
        """This rank's whole batches of :attr:`samples`, each with its seed (``seed`` + the index of its first
        item): every batch is generated as in a one-device run, whatever the number of devices."""
        chunks = batches(list(enumerate(self.samples)), self.batch_size)
        return [(self.seed + chunk[0][0], [s for _, s in chunk]) for chunk in rank_share(chunks, trainer)]

    def eval_source(self, trainer: L.Trainer | None, required: bool = True) -> str | None:
        """The prepared dataset to evaluate on: ``data``, else the data module's ``val_data`` (a one-entry list is
        its entry); None when neither is given and not ``required``.

        Raises:
            ValueError: neither is given (``required``), or the source is not a prepared dataset directory or its
                ``manifest.json`` (a list of shard files or a pattern, which the data module reads, is not read here).
        """
        name, source = "data", getattr(self, "data", None)
        if source is None:
            name = "the data module's val_data"
            source = getattr(getattr(trainer, "datamodule", None), "hparams", {}).get("val_data")
            if isinstance(source, (list, tuple)) and len(source) == 1:
                source = source[0]
        if source is None:
            if required:
                raise ValueError(f"{type(self).__name__}: give data (a prepared validation dataset) or samples")
            return None
        if isinstance(source, (list, tuple)) or not (Path(source).is_dir() or str(source).endswith(".json")):
            raise ValueError(
                f"{type(self).__name__}: {name} {source!r} is not a prepared dataset directory or manifest.json "
                "(shard lists and patterns are not read here); give data=<prepared dataset directory>"
            )
        return str(source)

    # ------------------------------------------------------------------------------------------ scheduling
    TEST_HOOKS = ("on_test_epoch_start", "on_test_batch_end", "on_test_epoch_end", "on_test_end")
    """Lightning hooks that, when a subclass defines one, mean it does evaluate in test runs (no warning then)."""

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Say that a test run does not evaluate with this callback (it runs at validation ends), rather than log
        nothing without a word; a subclass with a test hook of its own (:attr:`TEST_HOOKS`) is not warned about."""
        from lightning.pytorch.utilities import rank_zero_warn

        if any(getattr(type(self), hook) is not getattr(L.Callback, hook) for hook in self.TEST_HOOKS):
            return
        rank_zero_warn(
            f"{type(self).__name__} evaluates at the end of validation epochs: `cm3leon test` / Trainer.test does not "
            "run it; use `cm3leon validate` (Trainer.validate) with the data it should score"
        )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Warn, before training, when this fit will not validate (no validation data, ``limit_val_batches=0``):
        the callback runs at validation ends, so it would log nothing without a word."""
        from lightning.pytorch.utilities import rank_zero_warn

        hparams = getattr(getattr(trainer, "datamodule", None), "hparams", {})
        val_data = hparams.get("val_data", "given") if isinstance(hparams, dict) else "given"
        no_val_data = val_data is None or (isinstance(val_data, (str, list, tuple)) and not val_data)
        if trainer.enable_validation and not no_val_data:  # e.g. CM3LeonDataModule's val_data
            return
        why = "limit_val_batches is 0" if trainer.limit_val_batches == 0 else "it has no validation data"
        rank_zero_warn(
            f"{type(self).__name__} evaluates at the end of validation epochs, but this fit does not validate ({why}): "
            "it will log nothing. Give the data module a val_data (--data.init_args.val_data, any small prepared "
            "set) or validation dataloaders"
        )

    def should_run(self, trainer: L.Trainer) -> bool:
        """Count validation epochs (not the sanity check) and run on every n-th."""
        if trainer.sanity_checking:
            return False
        self._val_epochs += 1
        return (self._val_epochs - 1) % self.every_n_val_epochs == 0

    @property
    def state_key(self) -> str:
        """The checkpoint key: the class and :attr:`log_name`, so several instances of one class (e.g. two
        ``VQACallback`` with different ``log_name``) can run together and each restores its own state."""
        return self._generate_state_key(log_name=getattr(self, "log_name", None))

    @property
    def _legacy_state_key(self) -> str:
        """The key of checkpoints saved before :attr:`state_key` existed (the class name); Lightning falls back
        to it when :attr:`state_key` is not in a checkpoint."""
        return self.__class__.__qualname__

    def state_dict(self) -> dict[str, Any]:
        """The count of validation epochs seen (the ``every_n_val_epochs`` schedule)."""
        return {"val_epochs": self._val_epochs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self._val_epochs = int(state_dict.get("val_epochs", 0))
