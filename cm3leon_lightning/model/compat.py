"""Whether a checkpoint's vocabulary and architecture fit ours: the comparisons shared by ``init_from``
(:mod:`cm3leon_lightning.model.weights`), ``CM3LeonModule.on_load_checkpoint`` and the data link, so each refuses a
mismatch in the same words. Split from :mod:`~cm3leon_lightning.model.weights`, which re-exports these names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cm3leon_lightning.config import INIT_ONLY_FIELDS

_MISSING = "<absent>"

TOKENIZER_HINT = (
    "; prepare the data with the tokenizers the checkpoint was trained with, or, to train on it anyway, pass "
    "allow_tokenizer_change=True (--model.init_args.allow_tokenizer_change true)"
)
"""What the refusal of data prepared with other tokenizers suggests."""


def vocab_layout(vocab: dict[str, Any]) -> dict[str, Any]:
    """A vocabulary description without its tokenizer hashes: the sizes that must be equal."""
    from cm3leon_lightning.tokenization.vocab import IDENTITY_FIELDS

    return {k: v for k, v in dict(vocab).items() if k not in IDENTITY_FIELDS}


def check_same_vocab(
    saved: dict[str, Any] | None,
    ours: dict[str, Any] | None,
    source: str,
    data_source: str = "the data",
    allow_tokenizer_change: bool = False,
) -> dict[str, bool]:
    """Raise ValueError, printing both, when a checkpoint's vocabulary sizes differ from the data's (None: unknown),
    or when both record a text tokenizer or VQGAN hash and they differ (naming ``source`` and ``data_source`` and the
    short hashes; :func:`~cm3leon_lightning.tokenization.vocab.check_same_tokenizer`), unless
    ``allow_tokenizer_change``. A side that records no hash is accepted with a warning, once per ``source``.

    Returns:
        For ``"text"`` and ``"vqgan"``, whether the hashes were compared and matched.
    """
    from cm3leon_lightning.tokenization.vocab import check_same_tokenizer

    if saved is None or ours is None:
        return {"text": False, "vqgan": False}
    if vocab_layout(saved) != vocab_layout(ours):
        raise ValueError(
            f"vocabulary mismatch: {source} was trained with {vocab_layout(saved)}, the data has {vocab_layout(ours)}"
        )
    if allow_tokenizer_change:
        return {"text": False, "vqgan": False}
    return {
        kind: check_same_tokenizer(kind, saved, source, ours, data_source, TOKENIZER_HINT)  # type: ignore[arg-type]
        for kind in ("text", "vqgan")
    }


def architecture_diff(
    a: dict[str, Any], b: dict[str, Any], ignore: Sequence[str] = INIT_ONLY_FIELDS
) -> dict[str, tuple[Any, Any]]:
    """``{field: (a's, b's)}`` for each field of two architecture dicts (``CM3LeonConfig.to_dict()``) that differs,
    ``_MISSING`` for one a dict lacks; the fields ``ignore`` names (by default those that only set the random
    initialisation) are not compared."""
    return {
        k: (a.get(k, _MISSING), b.get(k, _MISSING))
        for k in [*a, *(k for k in b if k not in a)]
        if k not in ignore and a.get(k, _MISSING) != b.get(k, _MISSING)
    }


def check_same_architecture(saved: dict[str, Any] | None, ours: dict[str, Any], source: str) -> None:
    """Raise ValueError listing each differing field as ``field: (checkpoint's, module's)`` (None: unknown).

    Fields that only set the random initialisation (:data:`~cm3leon_lightning.config.INIT_ONLY_FIELDS`) are not
    compared: the checkpoint's weights replace whatever they would have initialised.
    """
    if saved is None:
        return
    diff = architecture_diff(saved, ours)
    if diff:
        raise ValueError(f"architecture mismatch between {source} and module (checkpoint, module): {diff}")
