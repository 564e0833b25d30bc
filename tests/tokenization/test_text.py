"""Tests for the byte-level BPE TextTokenizer: fixed special ids, round trips, save/load, refusal of bad files."""

from __future__ import annotations

import hashlib
import json
import pickle
import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from cm3leon_lightning.tokenization.text import TextTokenizer
from cm3leon_lightning.tokenization.vocab import MultimodalVocab, special_tokens

SUBJECTS = ["a red cube", "the blue sphere", "two green cones", "a small dog", "an old man", "three yellow stars"]
VERBS = ["sits on", "is next to", "floats above", "hides behind", "looks at"]
OBJECTS = ["a wooden table", "the snowy mountain", "a purple triangle", "the city street", "a calm lake"]


def sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` generated captions."""
    rng = random.Random(seed)
    return [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}." for _ in range(n)]


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.train(sentences(300), vocab_size=400, num_sentinels=8, min_frequency=2)


def test_special_tokens_at_fixed_ids(tok):
    names = special_tokens(8)
    assert names[:5] == ["<pad>", "<eos>", "<break>", "<mask>", "<infill>"]
    for i, name in enumerate(names):
        assert tok.backend.token_to_id(name) == i
        assert tok.backend.id_to_token(i) == name
    assert tok.num_sentinels == 8 and tok.num_special == 13


def test_vocab_size_counts_everything_and_merges_were_learned(tok):
    assert tok.vocab_size == tok.backend.get_vocab_size(with_added_tokens=True)
    assert 13 + 256 < tok.vocab_size <= 400  # some merges on top of the byte alphabet
    assert len(tok.encode("a red cube sits on a wooden table.")) < len("a red cube sits on a wooden table.")


def test_num_sentinels_is_configurable():
    small = TextTokenizer.train(sentences(50), vocab_size=300, num_sentinels=2)
    assert small.num_sentinels == 2
    assert [small.backend.id_to_token(i) for i in range(7)] == special_tokens(2)


def test_encode_decode_round_trip(tok):
    for text in sentences(50, seed=1) + ["", " leading space", "tabs\tand\nnewlines", "ünïcødé 猫 🦎"]:
        ids = tok.encode(text)
        assert all(tok.num_special <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=60))
def test_arbitrary_unicode_round_trips(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(parts=st.lists(st.one_of(st.sampled_from(special_tokens(8)), st.text(max_size=8)), max_size=8))
def test_plain_text_never_encodes_to_a_special_id(tok, parts):
    text = "".join(parts)
    ids = tok.encode(text)
    assert all(i >= tok.num_special for i in ids)
    assert tok.decode(ids) == text


def test_literal_special_strings_are_plain_text(tok):
    text = "a caption that says <eos> and <break> and <mask:0>"
    ids = tok.encode(text)
    assert min(ids) >= tok.num_special
    assert 1 not in ids and 2 not in ids and 5 not in ids
    assert tok.decode(ids) == text


def test_encode_batch_matches_encode(tok):
    texts = sentences(20, seed=2) + ["<eos>"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_decode_skips_special_tokens_by_default(tok):
    ids = [1] + tok.encode("a red cube") + [2, 5]
    assert tok.decode(ids) == "a red cube"
    assert tok.decode(ids, skip_special_tokens=False) == "<eos>a red cube<break><mask:0>"


def test_decode_rejects_ids_outside_text_range(tok):
    with pytest.raises(
        ValueError, match=rf"text id {tok.vocab_size} outside the allowed range \[0, {tok.vocab_size}\)"
    ):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="text id -1"):
        tok.decode([-1])


def test_save_load_gives_identical_ids_and_hash(tok, tmp_path):
    file = tok.save(tmp_path / "tok")
    assert file == tmp_path / "tok" / "tokenizer.json" and tok.path == file
    assert tok.sha256 == hashlib.sha256(file.read_bytes()).hexdigest()
    for source in (file, tmp_path / "tok"):
        loaded = TextTokenizer.load(source)
        assert loaded.path == file
        assert loaded.sha256 == tok.sha256
        assert loaded.vocab_size == tok.vocab_size and loaded.num_sentinels == tok.num_sentinels
        for text in sentences(30, seed=3) + ["<eos> literal"]:
            assert loaded.encode(text) == tok.encode(text)


def test_pickle_keeps_plain_text_guarantee(tok):
    # Data loader workers receive the tokenizer pickled; tokenizers' own pickling drops encode_special_tokens.
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode("<eos> a red cube") == tok.encode("<eos> a red cube")
    assert min(clone.encode("<eos>")) >= clone.num_special
    assert clone.sha256 == tok.sha256 and clone.num_sentinels == tok.num_sentinels


def test_save_to_explicit_json_path(tok, tmp_path):
    file = tok.save(tmp_path / "custom.json")
    assert file == tmp_path / "custom.json" and file.is_file()
    assert TextTokenizer.load(file).encode("a small dog") == tok.encode("a small dog")


def test_training_is_deterministic_even_with_tied_pair_counts(tok):
    """``cm3leon prepare`` trains the tokenizer from its plan and records its sha256: the same corpus must give the
    same bytes every time, though ``tokenizers`` counts pairs in hash maps seeded afresh per run; every 3-letter
    permutation makes most pair counts tie."""
    import itertools

    ties = ["".join(p) for p in itertools.permutations("abcdef", 3)] * 2
    a, b = TextTokenizer.train(ties, vocab_size=400), TextTokenizer.train(ties, vocab_size=400)
    assert a.sha256 == b.sha256 and a.vocab_size == b.vocab_size == 400
    assert TextTokenizer.train(sentences(300), vocab_size=400, num_sentinels=8, min_frequency=2).sha256 == tok.sha256


def test_sha256_differs_between_tokenizers(tok):
    other = TextTokenizer.train(sentences(300, seed=5) + ["zebra zebra zebra"] * 5, vocab_size=400)
    assert other.sha256 != tok.sha256
    assert len(tok.sha256) == 64


def test_make_vocab(tok):
    vocab = tok.make_vocab(n_codes=16, grid_h=2, grid_w=2)
    assert vocab == MultimodalVocab(n_text=tok.vocab_size, n_codes=16, grid_h=2, grid_w=2, num_sentinels=8)
    assert vocab.image_offset == tok.vocab_size


def test_load_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope" / "tokenizer.json")):
        TextTokenizer.load(tmp_path / "nope")


def test_load_reads_an_existing_file_of_any_name(tok, tmp_path):
    """A path naming an existing file is that file, not ``file/tokenizer.json`` (the docstring's promise)."""
    file = tmp_path / "tok.txt"
    file.write_bytes(tok.save(tmp_path / "t.json").read_bytes())
    loaded = TextTokenizer.load(file)
    assert loaded.path == file and loaded.sha256 == tok.sha256
    assert loaded.encode("a small dog") == tok.encode("a small dog")
    (tmp_path / "notes.txt").write_text("a red cube\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / 'notes.txt'))}: not a valid tokenizers JSON"):
        TextTokenizer.load(tmp_path / "notes.txt")
    with pytest.raises(FileExistsError, match="notes.txt exists and is not a .json file"):  # saving never replaces it
        tok.save(tmp_path / "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "a red cube\n"


def test_load_rejects_non_tokenizer_json(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizers JSON"):
        TextTokenizer.load(bad)


def _raw_tokenizer(specials: list[str]) -> Tokenizer:
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    t.train_from_iterator(sentences(50), trainer=trainer)
    return t


def test_load_rejects_special_tokens_at_wrong_ids(tmp_path):
    specials = special_tokens(8)
    specials[0], specials[1] = specials[1], specials[0]  # <eos> at 0, <pad> at 1
    file = tmp_path / "swapped.json"
    _raw_tokenizer(specials).save(str(file))
    with pytest.raises(ValueError, match=rf"{file}: special token <pad> is at id 1; it must be at id 0"):
        TextTokenizer.load(file)


def test_load_rejects_missing_special_token(tmp_path):
    file = tmp_path / "nobreak.json"
    _raw_tokenizer([s for s in special_tokens(8) if s != "<break>"]).save(str(file))
    with pytest.raises(ValueError, match=rf"{file}: special token <break> is missing; it must be at id 2"):
        TextTokenizer.load(file)
    file2 = tmp_path / "nosentinel.json"
    _raw_tokenizer(special_tokens(8)[:5]).save(str(file2))
    with pytest.raises(ValueError, match=rf"{file2}: no <mask:i> sentinel tokens"):
        TextTokenizer.load(file2)


def test_load_rejects_merges_that_build_a_special_token(tok, tmp_path):
    data = json.loads(tok.backend.to_str())
    vocab = data["model"]["vocab"]
    for piece in ("<eos", ">"):
        vocab.setdefault(piece, len(vocab) + len(data["added_tokens"]))
    data["model"]["merges"].append(["<eos", ">"])
    file = tmp_path / "tokenizer.json"
    file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"builds special token <eos> from plain text"):
        TextTokenizer.load(file)


def test_train_rejects_too_small_vocab():
    with pytest.raises(ValueError, match=r"vocab_size=100 must be >= 269"):
        TextTokenizer.train(sentences(10), vocab_size=100)
    with pytest.raises(ValueError, match="min_frequency must be >= 1"):
        TextTokenizer.train(sentences(10), vocab_size=300, min_frequency=0)


@pytest.mark.parametrize(
    ("corpus", "size"),
    [([], 263), (["", "", ""], 263), (["   ", "\t\n", " "], None), (["猫猫猫 🦎🦎 ünï"] * 5, None), (["a"], 263)],
)
def test_training_on_tiny_or_odd_corpora_keeps_every_guarantee(corpus, size):
    small = TextTokenizer.train(corpus, vocab_size=300, num_sentinels=2)
    if size is not None:  # 256 byte tokens + 7 special tokens, nothing to merge
        assert small.vocab_size == size
    assert 263 <= small.vocab_size <= 300
    for text in ["<eos>", " <break>", "<mask><mask:0>", "<pad><infill>", "ab\x00c", "\r\n\r\n", "猫🦎", ""]:
        ids = small.encode(text)
        assert all(small.num_special <= i < small.vocab_size for i in ids)
        assert small.decode(ids) == text


def _edited(tok: TextTokenizer, tmp_path, edit) -> str:
    data = json.loads(tok.backend.to_str())
    edit(data)
    file = tmp_path / "tokenizer.json"
    file.write_text(json.dumps(data))
    return str(file)


def test_load_rejects_ids_that_skip_into_the_image_range(tok, tmp_path):
    """Found in review: a file whose largest id is above vocab_size - 1 loaded, reported vocab_size (n_text) as the
    token count and encoded text to ids >= n_text, i.e. to image ids of the MultimodalVocab."""

    def move_last(data):
        vocab = data["model"]["vocab"]
        vocab[max(vocab, key=vocab.get)] = 5000

    file = _edited(tok, tmp_path, move_last)
    n = tok.vocab_size
    with pytest.raises(ValueError, match=rf"{file}: token ids must be exactly 0..{n - 1} .* id {n - 1} is unused and "
                       rf"the largest id is 5000"):  # fmt: skip
        TextTokenizer.load(file)


def test_load_rejects_a_whole_word_special_token(tok, tmp_path):
    """Found in review: a BPE with ignore_merges after a whitespace split (no merges building "<pad>") encoded the
    plain text "<pad>" to id 0; the merge check could not see it."""

    def whole_words(data):
        data["model"]["ignore_merges"] = True
        data["pre_tokenizer"] = {"type": "WhitespaceSplit"}

    file = _edited(tok, tmp_path, whole_words)
    assert Tokenizer.from_file(file).encode("<pad>", add_special_tokens=False).ids == [0]  # what it would do
    with pytest.raises(ValueError, match=rf"{file}: the plain text '<pad>' encodes to the special id 0 \(<pad>\)"):
        TextTokenizer.load(file)


def test_load_rejects_a_special_unknown_token(tok, tmp_path):
    """Found in review: a WordLevel file whose unk_token is <pad> encoded every unknown word to id 0."""

    def word_level(data):
        data["model"] = {"type": "WordLevel", "vocab": data["model"]["vocab"], "unk_token": "<pad>"}
        data["pre_tokenizer"] = {"type": "WhitespaceSplit"}

    file = _edited(tok, tmp_path, word_level)
    with pytest.raises(ValueError, match=rf"{file}: the model's unk_token is the special token <pad>"):
        TextTokenizer.load(file)


@pytest.mark.parametrize(
    "setting",
    [
        lambda b: b.enable_truncation(max_length=4),
        lambda b: b.enable_padding(length=40, pad_id=0, pad_token="<pad>"),
        lambda b: b.enable_padding(pad_id=0, pad_token="<pad>"),  # to the longest of a batch
    ],
    ids=["truncation", "fixed-padding", "batch-padding"],
)
def test_truncation_and_padding_stored_in_a_file_are_switched_off(tok, tmp_path, setting):
    """Found in review: a tokenizer.json saved with truncation (as transformers writes them) cut every caption to
    ``max_length`` ids silently; batch padding filled shorter encode_batch rows with the special <pad> id 0; fixed
    padding made the file refused with a misleading message about the literal text '<pad>'."""
    backend = Tokenizer.from_str(tok.backend.to_str())
    setting(backend)
    file = tmp_path / "tokenizer.json"
    file.write_text(backend.to_str())
    loaded = TextTokenizer.load(file)
    text = "a red cube sits on a wooden table."
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.encode_batch([text, "a"]) == [tok.encode(text), tok.encode("a")]
    assert loaded.sha256 == hashlib.sha256(file.read_bytes()).hexdigest()  # the file's bytes, settings included
    assert pickle.loads(pickle.dumps(loaded)).encode_batch([text, "a"]) == [tok.encode(text), tok.encode("a")]


def test_a_wrapped_tokenizer_of_the_caller_keeps_its_settings(tok):
    """Found in review: wrapping a caller's ``tokenizers.Tokenizer`` switched off its truncation and padding and made
    it encode "<eos>" as text, under the caller's feet (a tokenizer shared with transformers code changed)."""
    theirs = Tokenizer.from_str(tok.backend.to_str())
    theirs.enable_truncation(max_length=4)
    theirs.enable_padding(length=8, pad_id=0, pad_token="<pad>")
    text = "a red cube sits on a wooden table."
    before = theirs.encode(text).ids
    wrapped = TextTokenizer(theirs)
    assert wrapped.encode(text) == tok.encode(text) and len(tok.encode(text)) > 8
    assert theirs.truncation["max_length"] == 4 and theirs.padding["length"] == 8
    assert theirs.encode(text).ids == before and len(before) == 8
    assert theirs.encode("<eos>").ids[0] == 1 and not theirs.encode_special_tokens
    assert wrapped.sha256 == tok.sha256  # the settings in use: no truncation or padding


def test_train_refuses_a_single_string_and_names_a_non_string_item():
    """Found in review: a single string trained on its characters (no merges, silently), and a ``None`` caption
    failed with "'NoneType' object is not iterable", naming neither the argument nor the item."""
    with pytest.raises(TypeError, match="texts must be an iterable of strings .*not a single string"):
        TextTokenizer.train(" ".join(sentences(50)), vocab_size=300)
    with pytest.raises(TypeError, match=r"texts\[2\] must be a str, got NoneType: None"):
        TextTokenizer.train(iter(["a red cube", "a small dog", None]), vocab_size=300)
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str, got bytes: b'xx'"):
        TextTokenizer.train(["a b", b"xx"], vocab_size=300)


def test_encode_batch_refuses_a_single_string(tok):
    """Found in review: ``encode_batch("a red cube")`` encoded each character as its own text."""
    with pytest.raises(TypeError, match="encode_batch takes a sequence of strings, not a single string"):
        tok.encode_batch("a red cube")


def test_decode_refuses_non_integer_ids(tok):
    """Found in review: a float id was truncated (100.7 decoded as token 100)."""
    with pytest.raises(ValueError, match=r"text ids must be integers, got 100.7"):
        tok.decode([tok.encode("a")[0], 100.7])
    with pytest.raises(ValueError, match=r"text ids must be integers, got 'a'"):
        tok.decode("abc")
    ids = tok.encode("a red cube")
    assert tok.decode(iter(ids)) == tok.decode(ids) == "a red cube"


def test_a_failed_save_keeps_the_existing_file(tok, tmp_path, monkeypatch):
    """Found in review: ``save`` truncated an existing tokenizer.json before writing it, so a failed write (a full
    disk) lost the tokenizer a prepared dataset's manifest refers to."""
    other = TextTokenizer.train(sentences(100, seed=9), vocab_size=300)
    file = other.save(tmp_path)
    before = file.read_bytes()

    def half_then_fail(self, data):
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(file), "write_bytes", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        tok.save(tmp_path)
    monkeypatch.undo()
    assert file.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json"]
    assert tok.save(tmp_path) == file and file.read_bytes() != before
    assert TextTokenizer.load(file).sha256 == tok.sha256


def test_non_text_items_and_lone_surrogates_are_named_by_their_index(tok):
    """Found in review: a tuple item of ``encode_batch`` was encoded silently as a *pair* of texts joined
    (``[("a red", " cube")]`` gave the ids of "a red cube"); ``None`` failed with "TextEncodeInput must be
    Union[...]"; a lone surrogate (JSON's ``"\\ud800"``) with "TextInputSequence must be str", naming neither the
    item nor the character, and in training with a UnicodeEncodeError naming no item."""
    surrogate = "the unpaired surrogate '\\ud800' at position 5, which is not Unicode text"
    with pytest.raises(TypeError) as e:
        tok.encode_batch(["a small dog", ("a red", " cube")])
    assert str(e.value) == "texts[1] must be a str, got tuple: ('a red', ' cube')"
    with pytest.raises(TypeError) as e:
        tok.encode_batch(["a small dog", None])
    assert str(e.value) == "texts[1] must be a str, got NoneType: None"
    with pytest.raises(TypeError) as e:
        tok.encode(None)
    assert str(e.value) == "text must be a str, got NoneType: None"
    for call, what in (
        (lambda: tok.encode("a red\ud800cube"), "text"),
        (lambda: tok.encode_batch(["a small dog", "a red\ud800cube"]), "texts[1]"),
        (lambda: TextTokenizer.train(["a small dog", "a red\ud800cube"], vocab_size=300), "texts[1]"),
    ):
        with pytest.raises(ValueError) as e:
            call()
        assert str(e.value).startswith(f"{what} holds {surrogate} (")
    assert tok.encode_batch(["a red cube", "", "日本 🦎"]) == [tok.encode(t) for t in ["a red cube", "", "日本 🦎"]]
