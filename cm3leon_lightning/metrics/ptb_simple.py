"""The pure-Python stand-in for the PTB tokenizer of CIDEr-D (``tokenizer="simple"``, or ``auto`` without Java):
CoreNLP 3.4.1's PTBTokenizer rules that captions meet, then pycocoevalcap's punctuation removal. Tables of rules,
checked against the jar (see :func:`simple_ptb_tokenize` for the measured agreement)."""

from __future__ import annotations

import re

PTB_PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
"""The tokens pycocoevalcap's PTBTokenizer removes after tokenizing (case-sensitive, as there)."""


# Abbreviations whose period PTB keeps (its lexer's ABBREV lists, checked against the 3.4.1 jar; case-insensitive).
# Single letters ("j. k. rowling", "vitamin c.") keep theirs too. _ABBREVIATIONS_SENT lose it before a capitalized
# word (PTB reads a sentence end there); _ABBREVIATIONS_NUM keep it only before a number ("no. 5", "fig. 3").
_ABBREVIATIONS_TITLE = frozenset(
    "mr mrs ms dr drs prof profs sen sens rep reps atty attys lt col gen messrs gov govs adm rev maj sgt cpl pvt mt "
    "capt st ste ave pres lieut hon brig cmdr comdr pfc spc supt supts det rt vs alex wm jos cie cf treas "
    "invt elec natl mfg mtg".split()
)
_ABBREVIATIONS_SENT = frozenset(
    "jan feb mar apr jun jul aug sep sept oct nov dec mon tue tues wed thu thurs fri ala ariz calif colo conn dak "
    "fla ga ind kan kans ky md mich minn mo mont neb nev okla penn tenn va vt wis wisc wyo inc co cos corp pty ptys "
    "ltd plc bancorp dept bhd assn univ intl sys ph tel est ext sq ft jr sr bros blvd rd esq bldg etc al seq".split()
)
_ABBREVIATIONS_NUM = frozenset("no nos prop fig figs ca art pp op".split())
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-", "[": "-lsb-", "]": "-rsb-"}
_SPECIAL_WORDS = {
    "can't": "ca n't",
    "won't": "wo n't",
    "cannot": "can not",
    "gonna": "gon na",
    "gotta": "got ta",
    "wanna": "wan na",
    "gimme": "gim me",
    "lemme": "lem me",
}
_CLITIC = re.compile(r"^(.+?)(n['’]t|['’]s|['’]re|['’]ve|['’]ll|['’]d|['’]m)$")  # PTB writes ’ clitics as '
_LONE_CLITIC = re.compile(r"^['’](s|re|ve|ll|d|m|em)['‘’‛]*$")  # already split off ("a man 's hat"): one token
_SINGLE_QUOTES = "'‘’‛"  # PTB drops them as quotes (before or after a word); ’ inside a word stays
_DOUBLE_QUOTES = re.compile('["“”«»]')  # all become the dropped quote tokens `` and ''
_DASHES = re.compile("[—–‒―]")  # em, en, figure dash and horizontal bar: PTB's -- (dropped)
_INTERNAL_PERIOD = re.compile(r"^[a-z0-9]+(\.[a-z0-9]+)+$")
# Kept as one token, before any other rule: URLs, and emoticons with PTB's brackets (":-)" is ":--rrb-").
_PROTECTED = re.compile(
    r"(?i:https?)://[^\s\"<>|()]*[^\s\"<>|.!?(){},-]"
    r"|(?i:www)\.(?:[^\s\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4}(?:/[^\s\"<>|()]*[^\s\"<>|.!?(){},-])?"
    r"|(?<!\S)[<>]?[:;=][-o*']?[()DPdpO\\{@|\[\]](?![A-Za-z0-9])"
)
_APOS = "['’]"
# Words with apostrophes that PTB keeps or splits its own way (full match on the lower-cased word, (rule, groups)):
# each group becomes a token.
_APOSTROPHE_WORDS = [
    re.compile(rf"^({_APOS}[2-9]0s)$"),  # '90s (but '10s is a quote + 10s)
    re.compile(rf"^({_APOS}\d\d)$"),  # '99
    re.compile(rf"^({_APOS}(?:n{_APOS}?|em|till?|cause))$"),  # 'n', 'em, 'til, 'cause
    re.compile(r"^('t)(is|was)$"),  # 'tis, 'twas -> 't is (not with ’)
    re.compile(rf"^(.+?)({_APOS}n{_APOS})(.+)$"),  # rock'n'roll -> rock 'n' roll
    re.compile(rf"^(y{_APOS})([a-z].*)$"),  # y'all, y'know -> y' all
    re.compile(rf"^((?:ol|somethin|dunkin|[ldj]){_APOS})$"),  # ol'
]
# Rewrites of the whole caption before it is lower-cased and split at spaces, in order: (pattern, replacement).
_CASED_RULES = [
    (re.compile(r"(?<![A-Z])&|&(?![A-Z])"), " & "),  # AT&T stays one word, rock&roll does not
]
_TEXT_RULES = [
    (re.compile(r"[€₠¤\x80]"), " $ "),  # PTB's currency normalization
    (re.compile("£"), " # "),
    (re.compile("¢"), " cents "),
    (re.compile("[¥؋฿₤￠￡￥￦]"), r" \g<0> "),
    (re.compile("[„‚]"), r" \g<0> "),  # low quotes stay tokens
    (re.compile("[‹›]"), " ' "),
    (re.compile(rf"(?<=\d)({_APOS})(?=\d\d(?:\s|$))"), r" \1"),  # 5'10 -> 5 '10
    (re.compile(rf"(?<=\d){_APOS}(?=\d)"), " ' "),  # 5'10" -> 5 ' 10
    (re.compile(r"\b(\d+(?:[.:,]\d+)+)(?=[a-z])"), r"\1 "),  # 3:30pm -> 3:30 pm, 1.5m -> 1.5 m
]


def _keeps_period(stem: str, next_tok: str = "") -> bool:
    """Whether PTB keeps the period after ``stem`` (lower case): abbreviations, single letters, dotted words."""
    return bool(
        (len(stem) == 1 and stem.isalpha())
        or stem in _ABBREVIATIONS_TITLE
        or stem in _ABBREVIATIONS_SENT
        or (stem in _ABBREVIATIONS_NUM and next_tok[:1].isdigit())
        or _INTERNAL_PERIOD.match(stem)
    )


def _ellipsis(m: re.Match) -> str:
    """A run of periods is PTB's "..." (dropped), after the period of an abbreviation ("u.k...." is u.k. ...)."""
    word = m.group(1)
    return word + (". ... " if _keeps_period(word.lstrip(_SINGLE_QUOTES)) else " ... ")


def _split_word(tok: str, next_tok: str = "") -> list[str]:
    """One whitespace token -> PTB-like tokens (quotes and brackets already separated; ``next_tok`` follows it)."""
    out_tail: list[str] = []
    if set(tok) == {"."}:
        return [tok]
    if set(tok) <= set(_SINGLE_QUOTES):  # a lone quote (’ too): dropped as punctuation
        return ["'"]
    # Trailing periods: "..." is its own token; one period stays in abbreviations and dotted words (u.s., e.g.).
    m = re.match(r"^(.*?)(\.{2,})$", tok)
    if m and m.group(1):
        tok, out_tail = m.group(1), [m.group(2)]
    elif tok.endswith(".") and len(tok) > 1:
        stem = tok[:-1]
        if not _keeps_period(stem, next_tok):
            tok, out_tail = stem, ["."]
    if tok.replace("’", "'") in _SPECIAL_WORDS:
        return _SPECIAL_WORDS[tok.replace("’", "'")].split() + out_tail
    for rule in _APOSTROPHE_WORDS:
        m = rule.match(tok)
        if m:
            return list(m.groups()) + out_tail
    m = _LONE_CLITIC.match(tok)
    if m:  # not an opening quote before "s": PTB keeps "'s" (closing quotes after it are dropped)
        return ["'" + m.group(1)] + out_tail
    head: list[str] = []
    while tok[0] in _SINGLE_QUOTES and len(tok) > 1:  # opening single quote
        head.append("'")
        tok = tok[1:]
    tail: list[str] = []
    while tok[-1] in _SINGLE_QUOTES and len(tok) > 1:  # closing quote or plural possessive (dogs')
        tail.insert(0, "'")
        tok = tok[:-1]
    m = _CLITIC.match(tok)
    if m:
        return head + [m.group(1), m.group(2).replace("’", "'")] + tail + out_tail
    return head + [tok] + tail + out_tail


def _split_text(text: str) -> list[str]:
    """A caption without URLs or emoticons -> PTB-like lower-case tokens, punctuation tokens still in."""
    for rule, repl in _CASED_RULES:
        text = rule.sub(repl, text)
    text = text.replace("\n", " ").replace("\r", " ").lower()
    for rule, repl in _TEXT_RULES:
        text = rule.sub(repl, text)
    text = _DOUBLE_QUOTES.sub(" '' ", text).replace("``", " `` ").replace("…", " ... ")
    text = re.sub(r"(\S*?)\.{2,}", _ellipsis, text)  # PTB writes every run of periods (".", "....") as "..."
    text = _DASHES.sub(" -- ", text)
    text = re.sub(r"([?!]+)", r" \1 ", text)  # runs like "?!" stay one token, as in PTB
    text = re.sub(r"(?<!\d),|,(?!\d)", " , ", text)  # keep 1,000
    text = re.sub(r"(?<!\d):|:(?!\d)", " : ", text)  # keep 10:30
    text = re.sub(r"([;%$=<>])|#(?![a-z])|\+(?!\d)|(?<=\S)\+", r" \g<0> ", text)  # keep #tag and +5
    text = re.sub(r"--+", " -- ", text)
    text = re.sub(r"(?<![\w-])-+(?=[a-z])", " - ", text)  # "-off" -> - off (-5 stays a number)
    for bracket, word in _BRACKETS.items():
        text = text.replace(bracket, f" {word} ")
    words = text.split()
    tokens: list[str] = []
    for i, tok in enumerate(words):
        stem = tok.strip("/")  # a slash that opens or ends a word is a token of its own ("w/ a dog": w / a dog)
        if not stem:
            tokens.extend(["/"] * len(tok))
            continue
        head, tail = len(tok) - len(tok.lstrip("/")), len(tok) - len(tok.rstrip("/"))
        following = words[i + 1] if i + 1 < len(words) else ""
        tokens.extend(["/"] * head + _split_word(stem, following) + ["/"] * tail)
    return tokens


def simple_ptb_tokenize(caption: str) -> str:
    """Pure-Python stand-in for PTB tokenization + pycocoevalcap punctuation removal (see the module docstring).

    An approximation of CoreNLP 3.4.1's PTBTokenizer: on 6,000 seeded caption-like texts (COCO-style templates
    with abbreviations, numbers, times, currency, URLs, emoticons, contractions, typographic quotes and dashes,
    ellipses) it gave PTB's tokens for 99.8% of captions and 99.99% of tokens (before the URL, emoticon,
    apostrophe-word, currency and abbreviation rules: 44% and 91%). Known differences: characters PTB deletes as
    untokenizable (``₹``, emoji), and a few context-dependent PTB choices (a final ``c.`` sometimes loses its period).

    Args:
        caption: one caption.

    Returns:
        Space-joined lower-case tokens, punctuation tokens removed.
    """
    tokens: list[str] = []
    pos = 0
    for m in _PROTECTED.finditer(caption):
        tokens += _split_text(caption[pos : m.start()])
        word = m.group().lower()
        tokens.append("".join(_BRACKETS.get(ch, ch) for ch in word) if not word[0].isalpha() else word)
        pos = m.end()
    tokens += _split_text(caption[pos:])
    return " ".join(t for t in tokens if t not in PTB_PUNCTUATIONS)
