"""Retrieval-augmented prompts at inference (paper section 2.1 and table 1: CM3Leon-7B's best zero-shot FID places
one or two retrieved documents before the caption).

:class:`DocumentRetriever` embeds captions with the CLIP a memory bank was built with, searches the bank and returns
the nearest documents (``[caption text, image]``) read from the prepared shards that hold them, checked against the
model's vocabulary and text tokenizer. ``cm3leon generate --retrieve`` reads the shards once per prompt; ``cm3leon
serve --retrieve`` keeps every document in memory (the shards' token arrays: about 2 bytes per image code).
This module imports no Lightning.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

from cm3leon_lightning.tokenization.vocab import Document, MultimodalVocab, Segment


class DocumentRetriever:
    """The ``k`` nearest documents of captions in a memory bank, read from its shards.

    Args:
        bank_dir: the :class:`~cm3leon_lightning.retrieval.index.MemoryBank` directory.
        shards_dir: the prepared dataset (``manifest.json`` and shards) holding the bank's documents.
        clip: the :class:`~cm3leon_lightning.retrieval.encoder.ClipEncoder` the bank was built with.
        vocab: when given, the model's vocabulary; the shards must have been tokenized for it.
        tokenizer_sha256: when given, the text tokenizer's sha256; the manifest must record the same one.
        preload: read every document now (and check that the shards hold every bank key), instead of scanning the
            shards on each :meth:`retrieve`.

    Raises:
        ValueError: a bank that does not match ``clip`` (its model, or weights other than those the manifest's
            ``clip`` section records), shards for another vocabulary, text tokenizer or VQGAN (the manifest's
            ``image_tokenizer.checkpoint_sha256`` against the one ``vocab`` records, where both record one), or
            (with ``preload``) bank keys missing from the shards.
    """

    CANDIDATES_PER_DOCUMENT = 4
    """Candidates searched per wanted document, so that skipped duplicates can be replaced."""

    def __init__(
        self,
        bank_dir: str | Path,
        shards_dir: str | Path,
        clip: object,
        vocab: MultimodalVocab | None = None,
        tokenizer_sha256: str | None = None,
        preload: bool = False,
    ) -> None:
        from cm3leon_lightning.data.shards import MANIFEST_NAME, Manifest
        from cm3leon_lightning.retrieval.index import MemoryBank

        self.shards_dir, self.clip = Path(shards_dir), clip
        self.manifest = Manifest.load(self.shards_dir / MANIFEST_NAME)
        if vocab is not None and self.manifest.vocab(vocab.pad_to_multiple) != vocab:
            raise ValueError(
                f"--shards: {shards_dir} was tokenized for {self.manifest.vocab(vocab.pad_to_multiple).to_dict()}, "
                f"but the checkpoint's vocabulary is {vocab.to_dict()}"
            )
        if vocab is not None:  # the same grid and codebook size from another VQGAN: the codes are other pictures
            from cm3leon_lightning.tokenization.vocab import check_same_tokenizer

            recorded_vqgan = self.manifest.vocab().identity
            shards = f"--shards {shards_dir} ({MANIFEST_NAME})"
            check_same_tokenizer("vqgan", vocab.identity, "the checkpoint", recorded_vqgan, shards, "", False)
        recorded = self.manifest.text_tokenizer.get("sha256")
        if tokenizer_sha256 is not None and recorded and recorded != tokenizer_sha256:
            raise ValueError(
                f"--shards: {shards_dir} was tokenized with a text tokenizer of sha256 {recorded[:12]}..., but "
                f"--tokenizer has sha256 {tokenizer_sha256[:12]}...; the retrieved ids would mean other words"
            )
        name, dim = getattr(clip, "model_name", None), getattr(clip, "dim", None)
        self.bank = MemoryBank.load(bank_dir, model_name=name, dim=dim)
        check_clip_weights(self.manifest.clip, getattr(clip, "pretrained", None), shards_dir)
        self._documents: dict[str, Document] | None = None
        if preload:
            self._documents = self._read(None)
            self._check_found(self.bank.keys, self._documents)

    @property
    def preloaded(self) -> dict[str, Document]:
        """The documents read when the retriever was built (``preload``), by bank key; empty without ``preload``."""
        return dict(self._documents or {})

    def _read(self, wanted: set[str] | None) -> dict[str, Document]:
        """The documents of ``wanted`` keys (None: all), scanning shards until every wanted key is found."""
        from cm3leon_lightning.data.shards import read_shard

        found: dict[str, Document] = {}
        for shard in self.manifest.shards:
            for s in read_shard(self.shards_dir / shard.name, self.manifest):
                if wanted is None or s.key in wanted:
                    found[s.key] = [Segment.text(s.text.tolist()), Segment.image(s.image.tolist())]
            if wanted is not None and len(found) == len(wanted):
                break
        return found

    def _check_found(self, keys: Iterable[str], documents: dict[str, Document]) -> None:
        missing = [key for key in keys if key not in documents]
        if missing:
            raise ValueError(f"--retrieve: bank keys {missing[:5]} are not in the shards of {self.shards_dir}")

    def retrieve(self, captions: Sequence[str], k: int) -> list[tuple[list[str], list[Document]]]:
        """For each caption, the bank keys and documents of its ``k`` nearest distinct neighbours, nearest first.

        Diversity, as the paper's retrieval strategy asks ("simply taking the top K documents ... can result in
        duplicates"): a document whose image is one already chosen (e.g. COCO's other captions of the same picture)
        is skipped, searching up to :attr:`CANDIDATES_PER_DOCUMENT` times
        ``k`` candidates; fewer than ``k`` come back when those run out or the bank holds fewer. A caption is
        embedded as ``cm3leon prepare`` cleaned the bank's captions
        (:func:`~cm3leon_lightning.data.cleaning.model_text`: control characters to spaces, repeated whitespace to
        one, ends stripped).

        Raises:
            ValueError: ``k < 1``, a caption that is not a string or cleans to nothing (naming its index), or a
                retrieved key missing from the shards.
        """
        if k < 1:
            raise ValueError(f"--k must be >= 1, got {k}")
        from cm3leon_lightning.data.cleaning import model_text

        if isinstance(captions, str):
            raise ValueError("captions must be a sequence of strings, got a single str")
        # The bank embedded cleaned captions: a query's tab or control character would change its CLIP tokens.
        queries = [model_text(c, f"captions[{i}]", "the caption") for i, c in enumerate(captions)]
        n = min(len(self.bank), self.CANDIDATES_PER_DOCUMENT * k)
        if n == 0:  # an empty bank: no documents (the bank's search would name k)
            return [([], []) for _ in queries]
        candidates = self.bank.search(self.clip.embed_texts(queries), n).keys  # type: ignore[attr-defined]
        documents = self._documents
        if documents is None:
            documents = self._read({key for row in candidates for key in row})
        self._check_found((key for row in candidates for key in row), documents)
        out: list[tuple[list[str], list[Document]]] = []
        for row in candidates:
            keys: list[str] = []
            images: set[tuple[int, ...]] = set()
            for key in row:
                image = next((seg.tokens for seg in documents[key] if seg.kind == "image"), None)
                if image is not None and image in images:
                    continue  # the same picture again: no new information for the generator
                keys.append(key)
                if image is not None:
                    images.add(image)
                if len(keys) == k:
                    break
            out.append((keys, [documents[key] for key in keys]))
        return out


def check_clip_weights(recorded: dict[str, object], pretrained: object, shards_dir: str | Path) -> None:
    """Raise ValueError when the query CLIP's weights are not those ``cm3leon prepare`` built the bank with.

    ``recorded`` is the manifest's ``clip`` section: its ``weights_sha256`` is the sha256 of a local weights file or
    ``open_clip:<tag>``. ``pretrained`` (the encoder's) is compared when it is of the same kind: a file with a file's
    sha256, a tag with a tag (a local copy of a tag's weights cannot be told apart, so it is accepted). Same-named
    models with other weights embed into another space: the search would return unrelated documents, silently.
    """
    from cm3leon_lightning.data.shards import file_sha256

    want = recorded.get("weights_sha256")
    if not isinstance(want, str) or not isinstance(pretrained, str):
        return
    if want.startswith("open_clip:"):
        have = None if Path(pretrained).is_file() else f"open_clip:{pretrained}"
    else:
        have = file_sha256(pretrained) if Path(pretrained).is_file() else None
        if have is None:  # a tag against a file: perhaps a copy of that tag's weights, more likely a forgotten flag
            warnings.warn(
                f"--clip-pretrained: the memory bank was built with the CLIP weights file {_show(want)} (the manifest "
                f"of {shards_dir}), but the queries use the open_clip tag {pretrained!r}; unless the file is a copy "
                "of that tag's weights, pass the file itself",
                stacklevel=2,
            )
    if have is not None and have != want:
        raise ValueError(
            f"--clip-pretrained: the memory bank was built with CLIP weights {_show(want)} (the manifest of "
            f"{shards_dir}), but {pretrained} is {_show(have)}; queries embedded so would find unrelated documents"
        )


def _show(weights: str) -> str:
    return weights if weights.startswith("open_clip:") else f"sha256 {weights[:12]}..."
