"""FIDCallback: zero-shot text-to-image FID on a fixed, seeded set of validation captions (paper section 3.2).

Protocol of table 1 (the defaults): for each caption, ``samples_per_prompt=8`` images are generated with
classifier-free guidance and top-p sampling, a CLIP model keeps the best one (``clip_model``, ViT-B-32), and the
kept images are compared with the captions' source images by FID with the 2048-d Inception pool features.

Resize rule: real images are resized (shorter side to ``image_size``, PIL bicubic) and centre-cropped to
``image_size`` x ``image_size`` (256 for MS-COCO); generated images already at that size (the VQGAN's 256) are
used as they are; the Inception extractor then resizes both to 299 itself (torch-fidelity's TF1-compatible
bilinear). See :mod:`cm3leon_lightning.metrics.fid`.

Retrieval-augmented FID (table 1's CM3Leon rows with 1 or 2 retrieved documents, 4.88 for the 7B with 2):
``retrieve`` (the training set's memory bank), ``retrieve_shards`` (its prepared documents) and ``retrieve_k`` place
the caption's ``k`` nearest documents before it, found with the CLIP text embedding of the caption as
``cm3leon generate --retrieve`` does; the bank must have been built with ``clip_model``.

The MS-COCO 30K figure is one command (see ``configs/eval/coco_fid30k.yaml``)::

    cm3leon validate --config configs/model/<size>.yaml --config configs/eval/coco_fid30k.yaml \\
        --ckpt_path <model.ckpt> --data.init_args.val_data <coco val2014 shards with jpg>

Under DDP every rank generates its share of the caption batches (batch ``b`` of ``batch_size`` captions, seeded
``seed`` + its first caption's index, on rank ``b % world_size``), so the images do not depend on the number of
devices, and updates the metric; the metric's sums synchronise in ``compute`` on every rank (never in a
rank-zero-only block). The real images' statistics are computed once and, with ``cache_dir``, kept on disk keyed by
the reference images' pixels (after decoding and resizing) and the feature extractor's weights; rank zero decides
whether the cache is used, and a cache file that cannot be read or holds another image count is recomputed (with a
warning); one that cannot be written (a full disk) is left out, with a warning.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from cm3leon_lightning.callbacks.base import (
    EvalSample,
    GenerationCallback,
    batches,
    module_vocab,
    rank_share,
    read_shard_samples,
)
from cm3leon_lightning.data.cleaning import model_text
from cm3leon_lightning.metrics.fid import (
    fid_device,
    fid_resize,
    load_cached_real_stats,
    make_fid,
    real_stats,
    reference_cache_path,
    save_real_stats,
    to_uint8_images,
)
from cm3leon_lightning.tokenization.text import TextTokenizer


class FIDCallback(GenerationCallback):
    """Generate images for fixed validation captions and log ``val/fid`` against their source images.

    Args:
        data: prepared shards whose samples keep the source ``jpg`` (directory or manifest). None: the data
            module's ``val_data``.
        samples: in-memory samples (caption in ``references[0]``, uint8 ``image``), instead of ``data``.
        num_samples: captions (and reference images) used, the first ones in manifest order (a smaller set is
            used whole, with a warning: FID depends on the sample count). With no more images than features
            (2048 for Inception; e.g. the 1000 of ``configs/callbacks/fid.yaml``) the covariances are singular and
            the FID is a biased proxy, comparable only at the same count (``setup`` warns).
        image_size: side length both sets are brought to before the extractor (MS-COCO protocol: 256).
        samples_per_prompt: candidates per caption; the best by CLIP score is kept (paper table 1: 8).
        clip_model: open_clip model for re-ranking (paper: ViT-B-32); None keeps the first candidate.
        clip_pretrained: open_clip pretrained tag or local checkpoint for ``clip_model``.
        method: ``top_p``, ``temperature``, ``greedy`` (each with CFG) or ``cd_k``.
        cfg: classifier-free guidance scale (paper equation (2)).
        temperature: softmax temperature.
        top_p: nucleus mass.
        cdk_k: ``k`` of CD-K.
        cdk_alpha: ``alpha`` of CD-K.
        feature_extractor: an ``nn.Module`` mapping uint8 ``(N, 3, H, W)`` to ``(N, d)``, instead of Inception.
        feature_weights_path: local Inception weights file (torch-fidelity's), when it cannot be downloaded.
        feature_dim: Inception feature layer (2048 for FID).
        retrieve: memory bank directory for retrieval-augmented prompts (None: the caption alone, zero-shot).
        retrieve_shards: the prepared dataset holding the bank's documents (needed with ``retrieve``).
        retrieve_k: documents placed before each caption with ``retrieve`` (paper table 1: 1 or 2).
        cache_dir: directory for cached reference statistics (None: recompute each run).
        log_name: the logged key.
        **kwargs: :class:`GenerationCallback` arguments (``text_tokenizer``, ``vqgan``, ``batch_size``, ``seed``...).
    """

    def __init__(
        self,
        data: str | None = None,
        samples: Sequence[EvalSample] | None = None,
        num_samples: int = 1000,
        image_size: int = 256,
        samples_per_prompt: int = 8,
        clip_model: str | None = "ViT-B-32",
        clip_pretrained: str | None = "openai",
        method: str = "top_p",
        cfg: float = 3.0,
        temperature: float = 1.0,
        top_p: float = 0.9,
        cdk_k: int = 8,
        cdk_alpha: float = 0.5,
        feature_extractor: nn.Module | None = None,
        feature_weights_path: str | None = None,
        feature_dim: int = 2048,
        cache_dir: str | None = None,
        log_name: str = "val/fid",
        retrieve: str | None = None,
        retrieve_shards: str | None = None,
        retrieve_k: int = 2,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if num_samples < 2 or samples_per_prompt < 1 or image_size < 1:
            raise ValueError(
                f"num_samples must be >= 2 (FID needs two images), samples_per_prompt and image_size >= 1; "
                f"got {num_samples}, {samples_per_prompt}, {image_size}"
            )
        if retrieve is not None and (retrieve_shards is None or clip_model is None or retrieve_k < 1):
            raise ValueError(
                "FIDCallback: retrieve needs retrieve_shards (the bank's documents), clip_model (the CLIP the bank was "
                f"built with) and retrieve_k >= 1; got {retrieve_shards!r}, {clip_model!r}, {retrieve_k}"
            )
        self.retrieve, self.retrieve_shards, self.retrieve_k = retrieve, retrieve_shards, retrieve_k
        self.retriever = None
        self.data, self.samples = data, list(samples) if samples is not None else None
        self.num_samples, self.image_size, self.samples_per_prompt = num_samples, image_size, samples_per_prompt
        self.clip_model, self.clip_pretrained = clip_model, clip_pretrained
        self.sampling = dict(method=method, cfg=cfg, temperature=temperature, top_p=top_p, cdk_k=cdk_k)
        self.sampling["cdk_alpha"] = cdk_alpha
        self.feature_extractor, self.feature_weights_path = feature_extractor, feature_weights_path
        self.feature_dim, self.cache_dir, self.log_name = feature_dim, cache_dir, log_name
        self.metric = None
        self.clip = None
        self._reference_id: str | None = None
        self._real_ready = False

    # ------------------------------------------------------------------------------------------ set-up
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Build the FID metric (Inception weights or the given extractor), CLIP, and read the evaluation set (in-memory
        samples must each have a caption, ``references[0]``, and an image: ValueError naming the sample). Without
        ``vqgan`` the default :meth:`generate` cannot decode images, and a ``cache_dir`` that is a file cannot hold
        the cache: ValueError now, not after the first epoch."""
        self.load_resources(trainer)  # a missing tokenizer or VQGAN fails now, not at the first validation
        if self.cache_dir is not None and Path(self.cache_dir).exists() and not Path(self.cache_dir).is_dir():
            raise ValueError(f"FIDCallback cache_dir: {self.cache_dir} is not a directory")
        if self.vqgan is None and type(self).generate is FIDCallback.generate:  # else: after the first epoch
            raise ValueError("FIDCallback: give vqgan (a VQGAN weights path or module) to decode the generated images")
        if self.metric is None:
            self.metric = make_fid(self.feature_extractor, self.feature_weights_path, self.feature_dim)
        if self.samples is None:
            self.samples, _ = read_shard_samples(self.eval_source(trainer), self.num_samples, self.image_size)
        else:
            self.samples = self.samples[: self.num_samples]
            for s in self.samples:  # checked now, not at the first validation after an epoch of training
                refs = s.references
                if isinstance(refs, str) or not refs or not isinstance(refs[0], str) or s.image is None:
                    raise ValueError(
                        f"FIDCallback: sample {s.key!r} needs its caption in a list (references[0]) and its image, "
                        f"got references={refs!r}, image={'None' if s.image is None else 'given'}"
                    )
            self.samples = [  # captions as the model reads them (shards hold cleaned ones): blank is refused here
                EvalSample(s.key, [model_text(s.references[0], f"FIDCallback: sample {s.key!r}", "its caption"),
                                   *s.references[1:]], fid_resize(s.image, self.image_size), s.codes)
                for s in self.samples
            ]  # fmt: skip
        if len(self.samples) < 2:
            raise ValueError(f"FIDCallback: the evaluation set has {len(self.samples)} images; FID needs >= 2")
        if len(self.samples) < self.num_samples:
            rank_zero_warn(
                f"FIDCallback: num_samples={self.num_samples} but the evaluation set has {len(self.samples)} images; "
                f"{self.log_name} is the FID of {len(self.samples)} images, not comparable with FID-{self.num_samples}"
            )
        dims = int(self.metric.real_features_sum.shape[0])
        if len(self.samples) <= dims:
            rank_zero_warn(
                f"FIDCallback: {len(self.samples)} images for {dims} features: the covariances are singular, so "
                f"{self.log_name} is biased upward (more so the fewer the images); compare it only with runs of the "
                f"same count (the paper's FID-30K needs more than {dims} images)"
            )
        if self._reference_id is None:
            self._reference_id = reference_images_id(self.samples)
        wants_clip = self.samples_per_prompt > 1 or self.retrieve is not None
        if wants_clip and self.clip_model is not None and self.clip is None:
            from cm3leon_lightning.retrieval.encoder import ClipEncoder

            self.clip = ClipEncoder(self.clip_model, self.clip_pretrained, device=str(pl_module.device))
        if self.retrieve is not None and self.retriever is None:
            from cm3leon_lightning.generation.retrieve import DocumentRetriever

            self.retriever = DocumentRetriever(
                self.retrieve, self.retrieve_shards, self.clip, module_vocab(trainer, pl_module),
                self.load_text_tokenizer(trainer).sha256, preload=True,
            )  # fmt: skip

    # ------------------------------------------------------------------------------------------ generation
    def generate(self, pl_module: L.LightningModule, captions: list[str], seed: int) -> Tensor:
        """Captions -> one uint8 image ``(N, 3, image_size, image_size)`` each. Override to change how images are made.

        The default tokenizes the captions (cleaned as ``cm3leon prepare`` cleans training captions,
        :func:`~cm3leon_lightning.data.cleaning.model_text`), runs
        :func:`~cm3leon_lightning.generation.generate_image` with the module's network (after the captions' retrieved
        documents, with ``retrieve``), decodes with the VQGAN and, with several candidates, keeps the best by CLIP
        score.
        """
        from cm3leon_lightning.generation import generate_image, rerank

        captions = [model_text(c, f"captions[{i}]", "the caption") for i, c in enumerate(captions)]
        trainer = pl_module._trainer
        tok: TextTokenizer = self.load_text_tokenizer(trainer)
        vqgan = self.load_vqgan(pl_module.device)
        retrieved = None
        if self.retriever is not None:
            retrieved = [docs for _, docs in self.retriever.retrieve(captions, self.retrieve_k)]
        with self.generating(pl_module) as net:
            out = generate_image(
                net,
                module_vocab(trainer, pl_module),
                tok.encode_batch(captions),
                num_samples=self.samples_per_prompt,
                seed=seed,
                vqgan=vqgan,
                compile=self.compile,
                retrieved=retrieved,
                **self.sampling,
            )
        images = out.images  # (P, N, 3, H, W) in [-1, 1]
        if images.shape[1] > 1 and self.clip is not None:
            images = rerank(self.clip, captions, images, keep=1).images
        images = to_uint8_images(images[:, 0]).cpu()  # (P, 3, H, W)
        return torch.stack([fid_resize(img, self.image_size) for img in images])

    # ------------------------------------------------------------------------------------------ evaluation
    def _prepare_real(self, trainer: L.Trainer, device: torch.device) -> None:
        """Load cached reference statistics (rank zero holds the totals) or add this rank's real images.

        Rank zero's view decides on every rank: with a node-local ``cache_dir`` ranks could otherwise disagree and
        drop or double-count their shares of the reference set."""
        cache = None
        if self.cache_dir is not None:
            cache = reference_cache_path(self.cache_dir, self._reference_id, self.metric)
        if cache is not None and trainer.strategy.broadcast(cache.is_file(), src=0):
            loaded = self._load_cache(cache) if trainer.global_rank == 0 else None
            if trainer.strategy.broadcast(loaded, src=0):  # other ranks keep zero sums: rank zero holds the totals
                self._real_ready = True
                return
        for chunk in batches(rank_share(self.samples, trainer), self.batch_size):
            self.metric.update(torch.stack([s.image for s in chunk]).to(device), real=True)
        self._real_ready = True
        if cache is not None:
            with self.metric.sync_context():  # all ranks take part; the synced sums are the whole reference set
                if trainer.global_rank == 0:
                    try:
                        save_real_stats(cache, real_stats(self.metric))
                    except OSError as e:  # rank zero alone: raising here would leave the other ranks waiting
                        rank_zero_warn(
                            f"FIDCallback: could not write the reference-statistics cache {cache} ({e}); the FID "
                            "does not need it, the next run computes the statistics again"
                        )

    def _load_cache(self, cache: Path) -> bool:
        """Rank zero: put the cached totals into the metric; False (with a warning, metric unchanged) when the file
        cannot be read or does not hold this reference set's image count, so it is recomputed and rewritten."""
        reason = load_cached_real_stats(cache, self.metric, len(self.samples))
        if reason is not None:
            rank_zero_warn(
                f"FIDCallback: ignoring the reference-statistics cache {cache} ({reason}); recomputing it from the "
                "reference images"
            )
        return reason is None

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        """Generate for this rank's captions, update the metric, and return the synchronised FID. The metric runs on
        the module's device, except on Apple MPS, which cannot hold its float64 sums: there on the CPU
        (:func:`~cm3leon_lightning.metrics.fid.fid_device`)."""
        device = fid_device(pl_module.device)
        self.metric = self.metric.to(device)
        if not self._real_ready:
            self._prepare_real(trainer, device)
        self.metric.reset()  # fake statistics only (reset_real_features=False)
        # whole batches per rank: each batch's captions and seed are those of a one-device run
        for seed, chunk in self.rank_batches(trainer):
            captions = [s.references[0] for s in chunk]
            images = self.generate(pl_module, captions, seed)
            self.metric.update(images.to(device), real=False)
        return float(self.metric.compute())

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Every ``every_n_val_epochs`` validation epochs: compute and log :attr:`log_name` on every rank."""
        if not self.should_run(trainer):
            return
        value = self.evaluate(trainer, pl_module)
        pl_module.log(self.log_name, value, sync_dist=False)  # already synchronised by the metric


def reference_images_id(samples: Sequence[EvalSample]) -> str:
    """sha256 over the reference images' pixels (order-free): the statistics depend on nothing else, so the cache key
    changes with any change in decoding or resizing, and not with captions, order or a num_samples past the end."""
    digests = []
    for s in samples:
        h = hashlib.sha256(repr(tuple(s.image.shape)).encode())
        h.update(s.image.contiguous().cpu().numpy())
        digests.append(h.digest())
    return hashlib.sha256(b"".join(sorted(digests))).hexdigest()


def reference_cache_file(callback: FIDCallback) -> Path | None:
    """Where ``callback`` caches its reference statistics (after ``setup``), or None without ``cache_dir``."""
    if callback.cache_dir is None or callback.metric is None or callback._reference_id is None:
        return None
    return reference_cache_path(callback.cache_dir, callback._reference_id, callback.metric)
