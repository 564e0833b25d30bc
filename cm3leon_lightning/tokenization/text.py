"""The text tokenizer: a byte-level BPE trained with HF ``tokenizers`` (paper section 2.1).

The paper trains "a custom tokenizer over the Zhang et al. (2022) data with a vocabulary size of 56320"; here the
vocabulary size is an argument with that default. The special tokens sit at the fixed low ids of
:mod:`cm3leon_lightning.tokenization.vocab` (``<pad>`` 0, ``<eos>`` 1, ``<break>`` 2, ``<mask>`` 3, ``<infill>`` 4,
``<mask:0>``.. from 5), so the tokenizer's ids are the ``[0, n_text)`` range of :class:`MultimodalVocab` unchanged.

Plain text never encodes to a special id: a caption that literally contains ``"<eos>"`` is encoded byte by byte
(``Tokenizer.encode_special_tokens = True``), and a loaded file whose BPE merges could build a special token's
string, or that maps any other plain text to a special id (its unknown token is one, or its model and pre-tokenizer
turn a literal ``"<eos>"`` into id 1), is refused; so is one whose ids are not exactly ``0 .. vocab_size - 1``.
Special tokens are inserted by :class:`MultimodalVocab` (documents, examples) and by the CM3 objective, never by
:meth:`TextTokenizer.encode`. Truncation and padding settings in a loaded file (``transformers`` writes them) are
switched off: :meth:`TextTokenizer.encode` always returns every id of the text, and no ``<pad>``.
"""

from __future__ import annotations

import hashlib
import json
import operator
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from cm3leon_lightning.files import write_bytes_whole
from cm3leon_lightning.tokenization.vocab import (
    DEFAULT_NUM_SENTINELS,
    SENTINEL_OFFSET,
    MultimodalVocab,
    special_tokens,
)

TOKENIZER_FILE = "tokenizer.json"
PAPER_VOCAB_SIZE = 56320
_SENTINEL_RE = re.compile(r"<mask:(\d+)>")
_BYTE_ALPHABET = 256


def _resolve(path: str | Path) -> Path:
    """``path`` itself when it is an existing file or a ``.json`` path, else ``path / tokenizer.json``."""
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir() or p.suffix != ".json":
        return p / TOKENIZER_FILE
    return p


class TextTokenizer:
    """Byte-level BPE text tokenizer with the CM3Leon special tokens at fixed low ids.

    Build one with :meth:`train` or :meth:`load`; the constructor wraps an existing ``tokenizers.Tokenizer`` and
    checks it (so every way in gives the same guarantees). Its truncation and padding are switched off: a file
    saved with ``max_length`` or padding would otherwise cut captions short or pad :meth:`encode_batch` rows with
    the special ``<pad>`` id. They are switched off in a copy: the tokenizer passed in is left as it was.

    Args:
        tokenizer: a ``tokenizers.Tokenizer`` whose first ids are ``special_tokens(num_sentinels)``.
        source: the file it came from, used in error messages and as :attr:`path`.
        raw: the exact bytes of that file, hashed for :attr:`sha256` (defaults to the serialized tokenizer).

    Raises:
        ValueError: a special token missing or at the wrong id, no ``<mask:i>`` sentinels, token ids that are not
            exactly ``0 .. vocab_size - 1``, BPE merges that build a special token's string from plain text, or
            any other way plain text could encode to a special id (an unknown token that is special, a model or
            pre-tokenizer that maps a literal ``"<eos>"`` to its id).
    """

    def __init__(self, tokenizer: Tokenizer, source: str | Path | None = None, raw: bytes | None = None) -> None:
        serialized = tokenizer.to_str()
        # A copy: the settings switched below (special strings as text, no truncation or padding) must not change a
        # tokenizer the caller goes on using.
        tokenizer = self._tok = Tokenizer.from_str(serialized)
        self.path: Path | None = Path(source) if source is not None else None
        where = str(source) if source is not None else "tokenizer"
        self.num_sentinels = _count_sentinels(tokenizer, where)
        _check_special_ids(tokenizer, self.num_sentinels, where)
        model = json.loads(serialized).get("model", {})
        _check_merges(model, self.num_sentinels, where)
        _check_contiguous_ids(tokenizer, where)
        # Literal "<eos>" etc. in input text goes through BPE like any other text (never a special id).
        self._tok.encode_special_tokens = True
        # Every id of a text, and no <pad>: settings stored in the file (transformers writes them) would truncate
        # captions silently and pad encode_batch rows with the special id 0.
        self._tok.no_truncation()
        self._tok.no_padding()
        _check_plain_text(tokenizer, model, self.num_sentinels, where)
        self._raw = raw if raw is not None else tokenizer.to_str().encode("utf-8")

    # -------------------------------------------------------------------------------------------- building
    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int = PAPER_VOCAB_SIZE,
        num_sentinels: int = DEFAULT_NUM_SENTINELS,
        min_frequency: int = 2,
        show_progress: bool = False,
    ) -> TextTokenizer:
        """Train a byte-level BPE on an iterator of strings.

        Args:
            texts: training text (e.g. captions); any iterable of strings, consumed once (not one string: that
                would train on its single characters).
            vocab_size: target vocabulary size including special tokens (paper: 56320). A small corpus may give
                fewer tokens; :attr:`vocab_size` reports the real size.
            num_sentinels: number K of ``<mask:i>`` sentinels for the CM3 objective.
            min_frequency: a pair must occur at least this often to be merged.
            show_progress: show the ``tokenizers`` progress bar.

        Raises:
            ValueError: ``vocab_size`` below 256 byte tokens + the special tokens, or ``min_frequency < 1``.
            TypeError: ``texts`` is a single string, or an item of it is not a string (named by its index).
        """
        if isinstance(texts, (str, bytes)):
            raise TypeError("texts must be an iterable of strings (e.g. a list of captions), not a single string")
        specials = special_tokens(num_sentinels)
        minimum = _BYTE_ALPHABET + len(specials)
        if vocab_size < minimum:
            raise ValueError(
                f"vocab_size={vocab_size} must be >= {minimum} (256 byte tokens + {len(specials)} special)"
            )
        if min_frequency < 1:
            raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=specials,  # the trainer gives them ids 0.. in this order
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        tok.train_from_iterator(_strings(texts), trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path) -> TextTokenizer:
        """Load ``tokenizer.json`` (``path`` is the file, whatever its name, or the directory holding it).

        Raises:
            FileNotFoundError: no such file.
            ValueError: the file is not a tokenizer, or its special tokens are not at the fixed ids.
        """
        file = _resolve(path)
        if not file.is_file():
            raise FileNotFoundError(f"text tokenizer file not found: {file}")
        raw = file.read_bytes()
        try:
            tok = Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as err:  # tokenizers raises a bare Exception on malformed JSON
            raise ValueError(f"{file}: not a valid tokenizers JSON file ({err})") from err
        return cls(tok, source=file, raw=raw)

    def save(self, path: str | Path) -> Path:
        """Write ``tokenizer.json`` (``path`` is a ``.json`` file, or a directory created if needed).

        The file is replaced whole (written beside it, then renamed): a failed write leaves an existing file as it was.

        Returns:
            The file written; its sha256 is :attr:`sha256`.

        Raises:
            FileExistsError: ``path`` is an existing file whose name does not end in ``.json`` (not replaced).
        """
        if Path(path).is_file() and Path(path).suffix != ".json":
            raise FileExistsError(f"{path} exists and is not a .json file; not replacing it with a tokenizer")
        file = _resolve(path)
        file.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_whole(file, self._raw)
        self.path = file
        return file

    # ------------------------------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        """Number of text ids, special tokens included: ``n_text`` of :class:`MultimodalVocab`."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def num_special(self) -> int:
        """Number of special ids at the bottom of the id range."""
        return SENTINEL_OFFSET + self.num_sentinels

    @property
    def sha256(self) -> str:
        """Hex sha256 of the ``tokenizer.json`` bytes (those :meth:`save` writes, or those :meth:`load` read)."""
        return hashlib.sha256(self._raw).hexdigest()

    @property
    def backend(self) -> Tokenizer:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._tok

    def make_vocab(self, n_codes: int = 8192, grid_h: int = 32, grid_w: int = 32) -> MultimodalVocab:
        """The :class:`MultimodalVocab` with this tokenizer's ids as its text range."""
        return MultimodalVocab(
            n_text=self.vocab_size, n_codes=n_codes, grid_h=grid_h, grid_w=grid_w, num_sentinels=self.num_sentinels
        )

    # ------------------------------------------------------------------------------------ encode / decode
    def encode(self, text: str) -> list[int]:
        """Text -> ids. No special token is added, and none can come out of plain text.

        Raises:
            TypeError: ``text`` is not a str.
            ValueError: ``text`` holds an unpaired surrogate (JSON's ``"\\ud800"``), which is not Unicode text.
        """
        _check_text(text, "text")
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        except TypeError:  # tokenizers' "TextInputSequence must be str" for a str it cannot take
            _check_unicode(text, "text")
            raise

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Several texts -> ids, in parallel (same guarantees as :meth:`encode`).

        Raises:
            TypeError: ``texts`` is a single string (it would be encoded character by character), or an item is not
                a str (a tuple would be encoded as a pair of texts, joined); the item is named by its index.
            ValueError: an item holds an unpaired surrogate, named by its index.
        """
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a sequence of strings, not a single string; use encode()")
        texts = list(texts)
        for i, text in enumerate(texts):
            _check_text(text, f"texts[{i}]")
        try:
            return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]
        except TypeError:
            for i, text in enumerate(texts):
                _check_unicode(text, f"texts[{i}]")
            raise

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Ids -> text, skipping special tokens by default.

        Raises:
            ValueError: an id outside ``[0, vocab_size)`` (e.g. an image id passed by mistake), or one that is not
                an integer (a float would be truncated to another token).
        """
        ids = list(ids)
        try:
            ids = [operator.index(i) for i in ids]
        except TypeError:
            bad = next(i for i in ids if not _is_index(i))
            raise ValueError(f"text ids must be integers, got {bad!r}") from None
        n = self.vocab_size
        bad = next((i for i in ids if not 0 <= i < n), None)
        if bad is not None:
            raise ValueError(f"text id {bad} outside the allowed range [0, {n})")
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def __getstate__(self) -> dict[str, object]:
        # tokenizers pickles through its JSON, which drops ``encode_special_tokens``: rebuild through __init__
        # so data loader workers keep every guarantee.
        return {"raw": self._raw, "path": self.path}

    def __setstate__(self, state: dict[str, object]) -> None:
        raw = state["raw"]
        self.__init__(Tokenizer.from_str(raw.decode("utf-8")), source=state["path"], raw=raw)

    def __repr__(self) -> str:
        return f"TextTokenizer(vocab_size={self.vocab_size}, num_sentinels={self.num_sentinels}, path={self.path})"


def _strings(texts: Iterable[str]) -> Iterable[str]:
    """``texts``, raising TypeError at the first item that is not a string (``None`` for a missing caption)."""
    for i, text in enumerate(texts):
        _check_text(text, f"texts[{i}]")
        if not text.isascii():  # tokenizers fails on a lone surrogate with an error that names no text
            _check_unicode(text, f"texts[{i}]")
        yield text


def _check_text(text: object, what: str) -> None:
    """Raise TypeError naming ``what`` unless ``text`` is a str (tokenizers says only "must be str")."""
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, got {type(text).__name__}: {text!r:.80}")


def _check_unicode(text: str, what: str) -> None:
    """Raise ValueError naming ``what`` and the position of an unpaired surrogate, which UTF-8 cannot encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"{what} holds the unpaired surrogate {text[err.start]!r} at position {err.start}, which is not Unicode "
            "text (decode bytes with errors='replace', or clean the text first)"
        ) from None


def _is_index(value: object) -> bool:
    """Whether ``value`` is an integer (``operator.index`` accepts it)."""
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


# ------------------------------------------------------------------------------------------------ checks
def _count_sentinels(tok: Tokenizer, where: str) -> int:
    """K: the number of ``<mask:i>`` special tokens."""
    k = sum(1 for t in tok.get_added_tokens_decoder().values() if _SENTINEL_RE.fullmatch(t.content))
    if k == 0:
        raise ValueError(f"{where}: no <mask:i> sentinel tokens; expected <mask:0> at id {SENTINEL_OFFSET}")
    return k


def _check_special_ids(tok: Tokenizer, num_sentinels: int, where: str) -> None:
    """Every special token at its fixed id, and marked special (so decode can skip it)."""
    added = tok.get_added_tokens_decoder()
    for expected_id, name in enumerate(special_tokens(num_sentinels)):
        actual = tok.token_to_id(name)
        if actual != expected_id:
            got = "missing" if actual is None else f"at id {actual}"
            raise ValueError(f"{where}: special token {name} is {got}; it must be at id {expected_id}")
        if expected_id not in added or not added[expected_id].special:
            raise ValueError(f"{where}: token {name} at id {expected_id} is not registered as a special token")


def _check_merges(model: dict, num_sentinels: int, where: str) -> None:
    """Refuse BPE merges whose result is a special token's string: plain text could then encode to that id."""
    specials = set(special_tokens(num_sentinels))
    for merge in model.get("merges", []):
        pair = merge.split(" ", 1) if isinstance(merge, str) else merge
        if "".join(pair) in specials:
            raise ValueError(f"{where}: BPE merge {pair} builds special token {''.join(pair)} from plain text")


def _check_contiguous_ids(tok: Tokenizer, where: str) -> None:
    """Token ids exactly ``0 .. vocab_size - 1``: a larger id would fall in the image id range of the vocabulary."""
    n = tok.get_vocab_size(with_added_tokens=True)
    ids = sorted(set(tok.get_vocab(with_added_tokens=True).values()))
    if ids != list(range(n)):
        missing = next((i for i in range(n) if i >= len(ids) or ids[i] != i), n)
        raise ValueError(
            f"{where}: token ids must be exactly 0..{n - 1} (vocab_size {n}), but id {missing} is unused and the "
            f"largest id is {ids[-1]}; a larger id would collide with the image ids [{n}, ...)"
        )


def _check_plain_text(tok: Tokenizer, model: dict, num_sentinels: int, where: str) -> None:
    """Plain text never encodes to a special id: no special unknown token, and literal special strings stay text.

    Catches what the merge check cannot see in a file not trained by :meth:`TextTokenizer.train`: a model whose
    ``unk_token`` is special (every unknown character would become it), or a model and pre-tokenizer that map the
    whole string ``"<eos>"`` to its id (e.g. a WordLevel model, or BPE with ``ignore_merges`` after a whitespace
    split). ``model`` is the file's ``"model"`` section; needs ``encode_special_tokens = True`` already set.
    """
    specials = special_tokens(num_sentinels)
    unk = model.get("unk_token")
    if unk is None and isinstance(model.get("unk_id"), int):  # Unigram names its unknown token by id
        unk = tok.id_to_token(model["unk_id"])
    if unk in specials:
        raise ValueError(f"{where}: the model's unk_token is the special token {unk}; unknown text would encode to it")
    for name in specials:
        for text in (name, f" {name}", f"a{name}b", f"{name} {name}"):
            ids = tok.encode(text, add_special_tokens=False).ids
            bad = next((i for i in ids if i < len(specials)), None)
            if bad is not None:
                raise ValueError(
                    f"{where}: the plain text {text!r} encodes to the special id {bad} ({specials[bad]}); "
                    "special ids must come only from MultimodalVocab and the CM3 objective"
                )
