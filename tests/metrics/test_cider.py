"""CIDEr-D: equals pycocoevalcap's Cider with PTB tokens and with the fallback tokenizer; hand-computed value."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from cm3leon_lightning.metrics.cider import (
    CIDErD,
    _decode,
    _encode,
    cider_d,
    java_available,
    ptb_input,
    ptb_output_lines,
    ptb_tokenize,
    resolve_tokenizer,
    simple_ptb_tokenize,
)

needs_java = pytest.mark.skipif(not java_available(), reason="the PTB tokenizer needs java")

CANDIDATES = [
    "A man riding a wave on top of a surfboard.",
    "Two dogs' toys (red) on the U.S. grass!",
    "He doesn't like the \"big\" cat's t-shirt -- really?",
    "A 3.5 inch pizza; cheese, tomatoes & basil...",
    "a cat sitting on a chair .",
    "Mr. Smith at 10:30 costs $5.00 etc.",
]
REFERENCES = [
    ["A surfer rides a large wave.", "a man on a surfboard riding a wave", "Man surfing; big wave!"],
    ["Red toys on the grass.", "two dog toys lying on green grass", "Toys (for dogs) in the U.S."],
    ["A cat's t-shirt.", "He won't wear the cat's shirt, can't he?", "a big cat shirt"],
    ["A pizza with cheese, tomatoes and basil.", "a small pizza", "Pizza: 3.5 inches, basil & cheese."],
    ["A cat on a chair.", "a grey cat sits on a wooden chair", "the cat is sitting."],
    ["Mr. Smith pays $5.00 at 10:30.", "a man paying five dollars", "it's 1,000 dollars, 50% off"],
]
EXTRA = [
    "I'm here, we're there, they've gone, she'll stay, he'd go.",
    "can't won't cannot gonna wanna gotta",
    "A large {curly} [boxed] item",
    "dog's bowl. Another sentence here.",
    "50% off #1 deal",
    "a 'quoted' word",
    "e.g. this ends with U.S.",
    "Dr. Who St. Louis x:y yes!! what?!",
    "o'clock Let's go ME AND YOU one+one=two a ... b",
    "Ünïcode café, naïve.",
    "",
    "He’ll say “no”—maybe…",
    "a man’s «big» hat – the dog’s ‘toy’ … I’m here, don’t go, can’t stop ’ o’clock",
    "A MAN 'S HAT , they 're here and we 've gone , i 'm sure he 'll say you 'd , the dog ’s 's' toy , get 'em .",
    "A man w/ a dog.. a table w/food, hi..there ok .... black and/or white 1/2 /a //b c//",
]


def _pycocoevalcap(cands: list[str], refs: list[list[str]], tokenized: bool = False) -> tuple[float, list[float]]:
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    res = {i: [{"caption": c}] for i, c in enumerate(cands)}
    gts = {i: [{"caption": r} for r in rs] for i, rs in enumerate(refs)}
    if tokenized:
        res = {i: [v[0]["caption"]] for i, v in res.items()}
        gts = {i: [d["caption"] for d in v] for i, v in gts.items()}
    else:
        tok = PTBTokenizer()
        res, gts = tok.tokenize(res), tok.tokenize(gts)
    score, scores = Cider().compute_score(gts, res)
    return float(score), [float(s) for s in scores]


def test_hand_computed_value() -> None:
    # Two images; "a" occurs in both reference sets, so its IDF is log(2) - log(2) = 0: only "cat"/"dog" and the
    # bigram count. 1- and 2-gram cosines are 1, 3- and 4-grams have no n-grams (0): mean 0.5, times 10 = 5.
    score, scores = cider_d(["a cat", "a dog"], [["a cat"], ["a dog"]], tokenizer="simple")
    assert scores == pytest.approx([5.0, 5.0], abs=1e-12) and score == pytest.approx(5.0, abs=1e-12)
    score, _ = cider_d(["a dog", "a cat"], [["a cat"], ["a dog"]], tokenizer="simple")
    assert score == 0.0


@needs_java
def test_simple_tokenizer_matches_ptb_on_fixed_captions() -> None:
    captions = CANDIDATES + [r for rs in REFERENCES for r in rs] + EXTRA
    assert [simple_ptb_tokenize(c) for c in captions] == ptb_tokenize(captions)


@needs_java
def test_ptb_equals_pycocoevalcap() -> None:
    want = _pycocoevalcap(CANDIDATES, REFERENCES)
    assert want[0] > 0.1
    got = cider_d(CANDIDATES, REFERENCES, tokenizer="ptb")
    assert got[0] == want[0] and got[1] == want[1]


def test_simple_equals_pycocoevalcap_on_its_tokens() -> None:
    toks = [simple_ptb_tokenize(c) for c in CANDIDATES]
    ref_toks = [[simple_ptb_tokenize(r) for r in rs] for rs in REFERENCES]
    want = _pycocoevalcap(toks, ref_toks, tokenized=True)
    got = cider_d(CANDIDATES, REFERENCES, tokenizer="simple")
    assert got[0] == want[0] and got[1] == want[1]
    if java_available():  # and, as the tokens agree, with the PTB pipeline too
        assert got == _pycocoevalcap(CANDIDATES, REFERENCES)


def test_metric_accumulates_and_equals_function() -> None:
    metric = CIDErD(tokenizer="simple")
    metric.update(CANDIDATES[:2], REFERENCES[:2])
    metric.update(CANDIDATES[2:], REFERENCES[2:])
    assert metric.captions() == (CANDIDATES, REFERENCES)
    assert metric.compute().item() == pytest.approx(cider_d(CANDIDATES, REFERENCES, "simple")[0], rel=1e-6)
    metric.reset()
    with pytest.raises(RuntimeError, match="before any update"):
        metric.compute()


def test_byte_encoding_roundtrip_survives_concatenation() -> None:
    a, la = _encode(["héllo", "", "wörld ✓"])
    b, lb = _encode(["x"])
    assert _decode(torch.cat([a, b]), torch.cat([la, lb])) == ["héllo", "", "wörld ✓", "x"]


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="tokenizer must be one of"):
        resolve_tokenizer("nltk")
    with pytest.raises(ValueError, match="no reference"):
        cider_d(["a"], [[]], "simple")
    with pytest.raises(ValueError, match="2 candidates but 1"):
        CIDErD(tokenizer="simple").update(["a", "b"], [["a"]])


def test_fallback_warns_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("cm3leon_lightning.metrics.cider.shutil.which", lambda name: None)
    with pytest.warns(UserWarning, match="fallback"):
        metric = CIDErD(tokenizer="auto")
    assert metric.tokenizer == "simple"
    with pytest.raises(RuntimeError, match="java"):
        resolve_tokenizer("ptb")


# Every whitespace character Python's \s knows; Java's PTBTokenizer breaks lines at several (\x0b, \x0c, \x85, ...).
WHITESPACE = "\n\r\t\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u2028\u2029\u3000"


def test_ptb_input_has_one_line_per_caption() -> None:
    captions = [f"a{ch}b" for ch in WHITESPACE] + ["", " \x0c\u2028 ", "c d"]
    text = ptb_input(captions)
    assert text == "a b\n" * len(WHITESPACE) + " \n \n" + "c d\n"
    assert len(text.splitlines()) == len(captions)  # splitlines breaks at every line boundary Java might use


def test_ptb_output_must_have_one_line_per_caption() -> None:
    assert ptb_output_lines("a b\nc\n", 2) == ["a b", "c"]
    assert ptb_output_lines("a\n\n", 2) == ["a", ""]  # a blank last caption keeps its line
    with pytest.raises(RuntimeError, match="3 lines for 2 captions"):
        ptb_output_lines("a\nb\nc\n", 2)
    with pytest.raises(RuntimeError, match="1 lines for 2 captions"):
        ptb_output_lines("a\n", 2)


@needs_java
def test_ptb_keeps_captions_with_line_breaking_whitespace_aligned() -> None:
    captions = ["a cat\x0con a mat", "a dog\u2028runs\x85fast", "a red bus\x0b", "the end"]
    assert ptb_tokenize(captions) == ["a cat on a mat", "a dog runs fast", "a red bus", "the end"]
    refs = [["a cat on a mat", "a cat sitting"], ["a dog runs", "a fast dog"], ["a red bus", "a bus"], ["the end"]]
    clean = [" ".join(c.split()) for c in captions]
    assert cider_d(captions, refs, "ptb") == cider_d(clean, refs, "ptb")


def test_metric_states_are_typed_before_any_update() -> None:
    # A rank that never updates must send uint8 / int64 in the DDP gather, as the others do (test_metrics_ddp.py).
    metric = CIDErD(tokenizer="simple")
    for _ in range(2):
        assert [getattr(metric, n)[0].dtype for n in ("cand_bytes", "cand_lens", "ref_bytes", "ref_counts")] == [
            torch.uint8,
            torch.long,
            torch.uint8,
            torch.long,
        ]
        metric.update(["a cat"], [["a cat"]])
        metric.reset()


def test_simple_tokenizer_reads_typographic_punctuation_as_ptb_does() -> None:
    # PTB writes ’ clitics as ' and drops curly quotes, long dashes and the ellipsis; they stayed in the words.
    assert (
        simple_ptb_tokenize("He’ll say “no”—maybe… the dog’s ‘toy’ – can’t")
        == "he 'll say no maybe the dog 's toy ca n't"
    )
    assert simple_ptb_tokenize("a ’ b «c» o’clock") == "a b c o’clock"


@pytest.mark.parametrize("tokenizer", ["simple", pytest.param("ptb", marks=needs_java)])
def test_references_empty_once_tokenized_are_a_clear_error(tokenizer: str) -> None:
    with pytest.raises(
        ValueError, match=r"all 3 reference captions are empty once tokenized.*references\[0\] = \['\.'\]"
    ):
        cider_d(["a cat", "a dog"], [["."], ["!", " "]], tokenizer)  # was pycocoevalcap's "max() arg is empty"
    assert cider_d(["a cat", "a dog"], [["."], ["a dog"]], tokenizer)[1] == [0.0, 5.0]  # one reference has words


def test_one_image_warns_that_its_score_is_zero() -> None:
    with pytest.warns(UserWarning, match="single image is always 0"):
        assert cider_d(["a cat"], [["a cat", "the cat"]], "simple") == (0.0, [0.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cider_d(["a cat", "a dog"], [["a cat"], ["a dog"]], "simple")


def test_java_failure_reports_its_error_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    java = tmp_path / "java"
    java.write_text("#!/bin/sh\necho 'Error: Could not find or load main class' >&2\nexit 1\n")
    java.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="exit status 1: Error: Could not find or load main class"):
        ptb_tokenize(["a cat"])


def test_simple_tokenizer_drops_runs_of_periods_and_splits_slashes_off_words_as_ptb_does() -> None:
    # PTB writes "..", "...." as the dropped "..." and splits a slash that opens or ends a word ("w/ a dog" is
    # "w / a dog"); the fallback kept "dog..", "w/" as words, so they matched no reference n-gram.
    caption = "A man w/ a dog.. a table w/food, hi..there ok .... black and/or white 1/2 /a //b c//"
    want = "a man w / a dog a table w/food hi there ok black and/or white 1/2 / a / / b c / /"
    assert simple_ptb_tokenize(caption) == want and caption in EXTRA  # EXTRA: PTB gives the same, with Java
    assert simple_ptb_tokenize("//") == "/ /" and simple_ptb_tokenize("a / b") == "a / b"


def test_simple_tokenizer_keeps_clitics_already_split_off() -> None:
    # Pre-tokenized captions (Flickr30k references, decoded BPE) write "man 's": PTB keeps "'s"; it became "s".
    assert (
        simple_ptb_tokenize("A MAN 'S HAT , they 're here , i 'm sure he 'll say you 'd we 've the dog ’s 's' toy .")
        == "a man 's hat they 're here i 'm sure he 'll say you 'd we 've the dog 's 's toy"
    )
    assert simple_ptb_tokenize("a dog ' s bone 'sa") == "a dog s bone sa"  # a quote before a word stays a quote


def test_a_java_that_does_not_run_is_found_at_construction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # macOS's /usr/bin/java stub without a JDK: `auto` chose PTB, and the first validation's compute() failed.
    java = tmp_path / "java"
    java.write_text("#!/bin/sh\necho 'Unable to locate a Java Runtime.' >&2\nexit 1\n")
    java.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.warns(UserWarning, match=r"java -version` failed with exit status 1: Unable to locate a Java Runtime"):
        metric = CIDErD(tokenizer="auto")
    assert metric.tokenizer == "simple"
    metric.update(["a cat", "a dog"], [["a cat"], ["a dog"]])
    assert float(metric.compute()) == pytest.approx(cider_d(["a cat", "a dog"], [["a cat"], ["a dog"]], "simple")[0])
    with pytest.raises(RuntimeError, match="tokenizer='ptb' needs a `java` .* that runs .*Unable to locate"):
        CIDErD(tokenizer="ptb")


# Corner cases a review found (or the generated comparison corpus did), with the tokens Stanford's PTBTokenizer
# 3.4.1 gives (pycocoevalcap's jar, -preserveLines -lowerCase, punctuation dropped); the fallback differed on each.
PTB_CORNER_CASES = {
    "No. 5 on the list, not the no. and Fig. 3": "no. 5 on the list not the no and fig. 3",
    "music from the '90s and the 80's, the '10s and '99": "music from the '90s and the 80 's the 10s and '99",
    "rock'n'roll band, fish 'n' chips, rock&roll at AT&T": "rock 'n' roll band fish 'n' chips rock & roll at at&t",
    "y'all come back": "y' all come back",
    "'Tis the season, 'twas 'til 'em 'cause": "'t is the season 't was 'til 'em 'cause",
    "he is 5'10\" tall and she's 5'10 and 6' tall": "he is 5 10 tall and she 's 5 '10 and 6 tall",
    "I <3 NY": "i < 3 ny",
    "smile =) ok :-) and :) and ;-( and :D and :P but not :o or :/": (
        "smile =-rrb- ok :--rrb- and :-rrb- and ;--lrb- and :d and :p but not o or /"
    ),
    "costs $5.99 or €10 or £3 or 20¢ or ¥500 or 50%-off": (
        "costs $ 5.99 or $ 10 or # 3 or 20 cents or ¥ 500 or 50 % off"
    ),
    "visit http://www.example.com/page?a=b, HTTPS://X.ORG. or www.google.com today": (
        "visit http://www.example.com/page?a=b https://x.org or www.google.com today"
    ),
    "Jr. Gen. Capt. Lt. Ave. Blvd. Rd. vs. Inc. Co. Mt. Ft. x. A. vitamin C": (
        "jr. gen. capt. lt. ave. blvd. rd. vs. inc. co. mt. ft. x. a. vitamin c"
    ),
    "at 3:30pm, a 10.5ft pole and 1.5m, +5 and one+one": "at 3:30 pm a 10.5 ft pole and 1.5 m +5 and one + one",
    "the U.K.... and Main St.. and plan B..": "the u.k. and main st. and plan b.",
    "#hashtag @user „quote“ ‹a›": "#hashtag @user „ quote a",
}


@pytest.mark.parametrize("caption", list(PTB_CORNER_CASES))
def test_simple_tokenizer_matches_ptb_on_corner_cases(caption: str) -> None:
    # Abbreviations (no. 5, st.), apostrophe words ('90s, rock 'n' roll, y' all, 't is), 5'10", <3, emoticons,
    # currency, URLs, numbers glued to units: the fallback dropped periods and quotes PTB keeps, split URLs apart...
    assert simple_ptb_tokenize(caption) == PTB_CORNER_CASES[caption]


@needs_java
def test_corner_case_expectations_are_ptb_output() -> None:
    captions = list(PTB_CORNER_CASES)
    assert ptb_tokenize(captions) == [PTB_CORNER_CASES[c] for c in captions]
