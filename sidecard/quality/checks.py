"""Cheap heuristic checks run on every answer (pure: microseconds on typical answers, bounded on huge ones).

Each check names a way an answer is probably bad without asking a model:

- `empty`: nothing but whitespace.
- `refusal`: a refusal opening ("I'm sorry, but I can't...", "I cannot help with", "As an AI...") within the
  first `REFUSAL_HEAD_CHARS` characters of an answer of at most `REFUSAL_MAX_CHARS`. Whether the request
  deserved a refusal cannot be known here, so this counts refusals: read its rate against the feature's
  normal rate, not as a count of mistakes.
- `truncated`: the model stopped at `max_tokens`.
- `bad_format`: the answer broke the prompt's declared output format (the engine checked it).
- `repeats_prompt`: the answer mostly repeats the question. Both are lowercased and split into words (`\\w+`);
  it fails when the answer has at least `REPEAT_MIN_WORDS` words and at least `REPEAT_SHARE` of its word
  `REPEAT_NGRAM`-grams also occur in the question. A feature whose answers legitimately quote their input
  (extractive summaries) will show a high rate of this.
- `language_mismatch`: only when the expected language is known; see `language_mismatch`.

Texts longer than the scan limits are checked on their head and tail only, so a 1 MiB question costs about
what a 20 kB one does.
"""

from __future__ import annotations

import re
from typing import Final, NamedTuple

import msgspec

CHECKS: Final = ("empty", "refusal", "truncated", "bad_format", "repeats_prompt", "language_mismatch")


class Sample(msgspec.Struct, gc=False):  # (scalars only: never in a cycle)
    """An answer as the engine hands it over for checking and judging."""

    feature: str
    model: str
    prompt: str | None
    version: int | None
    canary: bool
    question: str  # the request's last user text (rendered)
    system: str | None
    answer: str
    stop_reason: str | None
    output_problem: str | None  # from the prompt's declared output format; None: fine or nothing declared
    language: str | None = None  # expected language (ISO 639-1), when configured
    request_id: str | None = None  # the answer's, for the review queue
    route: str | None = None  # the route that served it, for a route's rollout
    # Tracing: the answered request's span (trace id, span id, flags), the parent of the judge's call.
    trace: tuple[int, int, int] | None = None


def run_checks(sample: Sample) -> list[str]:
    """The names of the checks this answer failed, in `CHECKS` order."""
    answer = sample.answer
    stripped = answer.strip()
    failed = []
    if not stripped:
        failed.append("empty")
    elif len(stripped) <= REFUSAL_MAX_CHARS and is_refusal(stripped):
        failed.append("refusal")
    if sample.stop_reason == "max_tokens":
        failed.append("truncated")
    if sample.output_problem is not None:
        failed.append("bad_format")
    if stripped and repeats(sample.question, answer):
        failed.append("repeats_prompt")
    if sample.language and stripped and language_mismatch(sample.language, answer):
        failed.append("language_mismatch")
    return failed


# ---------------------------------------------------------------- refusals

REFUSAL_HEAD_CHARS: Final = 200
REFUSAL_MAX_CHARS: Final = 1000  # a long answer that opens with an apology usually goes on to help
_REFUSAL: Final = re.compile(
    r"\b(?:"
    r"(?:i (?:can't|cannot|can not|won't|will not)|i(?: am|'m) (?:unable|not able) to) "
    r"(?:help|assist|provide|comply|fulfil|fulfill|answer|support|do that|engage|share|discuss|give|create"
    r"|generate|write|continue)"
    r"|as an ai\b"
    r"|i (?:must|have to|need to) (?:decline|refuse)"
    r"|i(?: am|'m) not comfortable (?:with|helping|providing)"
    r"|(?:this|that|your) request (?:goes against|violates)"
    r")"
)
# Each of `_REFUSAL`'s phrases holds one of these: a head with none (most answers not in the first person) is no
# refusal, known without the regex's try at every position.
_REFUSAL_MARKS: Final = ("i ", "i'", "as an ai", "this request ", "that request ", "your request ")


def is_refusal(answer: str) -> bool:
    head = answer.lstrip()[:REFUSAL_HEAD_CHARS].lower().replace("\u2019", "'")
    for mark in _REFUSAL_MARKS:
        if mark in head:
            return _REFUSAL.search(head) is not None
    return False


# ---------------------------------------------------------------- repeating the question

REPEAT_NGRAM: Final = 4
REPEAT_MIN_WORDS: Final = 8
REPEAT_SHARE: Final = 0.6
SCAN_CHARS: Final = 20_000
_WORD: Final = re.compile(r"\w+")
# Every byte that is not a word character (`\w` on ASCII: letters, digits, underscore) as a space.
_ASCII_NON_WORD_TO_SPACE: Final = bytes(c if chr(c).isascii() and (chr(c).isalnum() or c == 0x5F) else 0x20 for c in range(256))


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _ascii_words(text: str) -> list[bytes]:
    """`_words` of an ASCII text, in a fifth of the time (most answers are ASCII; no regex, one split)."""
    return text.encode("ascii").lower().translate(_ASCII_NON_WORD_TO_SPACE).split()


def _clip(text: str, limit: int) -> str:
    """The head and tail of a long text: what a repeat or a language shows up in, at a bounded cost."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n{text[-half:]}"


def _ngrams(words: list[str] | list[bytes]) -> list[tuple[str | bytes, ...]]:
    return list(zip(*(words[i:] for i in range(REPEAT_NGRAM)), strict=False))


def repeats(question: str, answer: str) -> bool:
    """Does the answer mostly repeat the question? (see the module docstring for the exact rule)"""
    answer, question = _clip(answer, SCAN_CHARS), _clip(question, SCAN_CHARS)
    words_of = _ascii_words if answer.isascii() and question.isascii() else _words
    words = words_of(answer)
    if len(words) < REPEAT_MIN_WORDS:
        return False
    asked_words = words_of(question)
    if len(asked_words) < REPEAT_NGRAM:
        return False
    starts = len(words) - REPEAT_NGRAM + 1
    needed = REPEAT_SHARE * starts
    # A repeated n-gram starts with a word of the question: too few of those, and no n-gram need be built.
    vocabulary = set(asked_words)
    if sum(map(vocabulary.__contains__, words[:starts])) < needed:
        return False
    asked = set(_ngrams(asked_words))
    return sum(map(asked.__contains__, _ngrams(words))) >= needed


# ---------------------------------------------------------------- language

LANG_SCAN_CHARS: Final = 2000
MIN_LETTERS: Final = 10  # fewer letters than this: the script is "unknown"
# A Latin-script language is named only when its stop words score at least MIN_STOP_WORDS (a word shared by k
# languages scores 1/k for each) and STOP_WORD_LEAD times the runner-up's score.
MIN_STOP_WORDS: Final = 3.0
STOP_WORD_LEAD: Final = 2.0

# Letters per script, counted among the non-ASCII characters only (ASCII letters are Latin): most answers are
# nearly all ASCII, so this is one cheap pass instead of a dozen.
_ASCII: Final = re.compile(r"[\x00-\x7f]+")
_ASCII_LETTERS: Final = re.compile(r"[A-Za-z]")
_SCRIPTS: Final = {
    "latin": re.compile(r"[\u00C0-\u024F\u1E00-\u1EFF]"),
    "cyrillic": re.compile(r"[\u0400-\u04FF]"),
    "greek": re.compile(r"[\u0370-\u03FF\u1F00-\u1FFF]"),
    "arabic": re.compile(r"[\u0600-\u06FF\u0750-\u077F]"),
    "hebrew": re.compile(r"[\u0590-\u05FF]"),
    "han": re.compile(r"[\u3400-\u4DBF\u4E00-\u9FFF]"),
    "kana": re.compile(r"[\u3040-\u30FF]"),
    "hangul": re.compile(r"[\u1100-\u11FF\uAC00-\uD7AF]"),
    "devanagari": re.compile(r"[\u0900-\u097F]"),
    "thai": re.compile(r"[\u0E00-\u0E7F]"),
    "armenian": re.compile(r"[\u0530-\u058F]"),
    "georgian": re.compile(r"[\u10A0-\u10FF]"),
}
KANA_SHARE: Final = 0.1  # Japanese mixes kana into kanji; Chinese has none

_LANGUAGES_BY_SCRIPT: Final = {
    "latin": "en de fr es it pt nl sv da no nb nn fi pl cs sk sl hr bs ro hu tr vi id ms tl ca eu gl et lv lt is ga "
    "sq sw af cy mt az uz",
    "cyrillic": "ru uk bg be mk kk ky mn tg",
    "greek": "el",
    "arabic": "ar fa ur ps",
    "hebrew": "he iw yi",
    "han": "zh",
    "kana": "ja",
    "hangul": "ko",
    "devanagari": "hi mr ne",
    "thai": "th",
    "armenian": "hy",
    "georgian": "ka",
}
SCRIPT_OF: Final = {lang: script for script, langs in _LANGUAGES_BY_SCRIPT.items() for lang in langs.split()}
# A script written by one language names it; the others (Latin aside) stay "unknown" beyond the script.
_ONLY_LANGUAGE: Final = {s: langs for s, langs in _LANGUAGES_BY_SCRIPT.items() if " " not in langs}

_STOP_WORDS: Final = {
    "en": "the and is are was were of to in that it for with on as this be not have has you your we they at by from "
    "or but an will would can there their what which if about how do does",
    "de": "der die das und ist nicht ein eine einen zu den mit sich des auf für im dem von es sie ich du wir auch als "
    "wird bei oder aber wenn nur noch kann sind werden ihr ihre hat haben",
    "fr": "le la les et est un une des du que qui dans pour pas sur au avec ce il elle nous vous je sont ne se plus "
    "par mais ou cette aux été votre vos",
    "es": "el la los las y es un una de que en por con para no se lo su al del como más pero sus le ya muy está son "
    "también fue usted puede",
    "it": "il lo la gli le e è un una di che per non con del della sono si ma come anche più questo questa nel alla "
    "ho può suo sua",
    "pt": "o a os as e é um uma de que em para com não se do da dos das no na por mais mas como ao você são está "
    "também pode seu sua",
    "nl": "de het een en is van in dat op te voor met zijn niet er aan ook als bij maar om dit uit je wordt worden "
    "naar wel u uw kunt",
    "sv": "och att det är som en ett på av för med till den inte har jag vi om men från ska kan eller så sig var du ni",
}


def _languages_of_word() -> dict[str, tuple[str, ...]]:
    index: dict[str, tuple[str, ...]] = {}
    for lang, words in _STOP_WORDS.items():
        for word in words.split():
            index[word] = (*index.get(word, ()), lang)
    return index


_LANGUAGES_OF_WORD: Final = _languages_of_word()
_LETTERS: Final = re.compile(r"[^\W\d_]+")


class Detected(NamedTuple):
    script: str  # a key of the script table, or "unknown"
    language: str  # an ISO 639-1 code, or "unknown"


def detect_language(text: str) -> Detected:
    """The dominant script of TEXT's head and, where it can tell, the language: a script written by one
    language names it; Latin text is named by stop words (en de fr es it pt nl sv) when one language clearly
    leads. Other scripts shared by several languages (Cyrillic, Arabic...) name no language."""
    head = text[:LANG_SCAN_CHARS]
    rest = _ASCII.sub("", head)
    counts = {script: len(pattern.findall(rest)) if rest else 0 for script, pattern in _SCRIPTS.items()}
    counts["latin"] += len(_ASCII_LETTERS.findall(head))
    cjk = counts["han"] + counts["kana"]
    if cjk:  # kanji and kana are one Japanese text; kanji alone is Chinese
        japanese = counts["kana"] >= KANA_SHARE * cjk
        counts["kana"], counts["han"] = (cjk, 0) if japanese else (0, cjk)
    script = max(counts, key=counts.__getitem__)
    if counts[script] < MIN_LETTERS:
        return Detected("unknown", "unknown")
    if script != "latin":
        return Detected(script, _ONLY_LANGUAGE.get(script, "unknown"))
    hits = dict.fromkeys(_STOP_WORDS, 0.0)
    for word in _LETTERS.findall(head.lower()):
        langs = _LANGUAGES_OF_WORD.get(word, ())
        for lang in langs:  # a word shared by k languages ("de", "la") says less about each
            hits[lang] += 1 / len(langs)
    ranked = sorted(hits.values(), reverse=True)
    best = max(hits, key=hits.__getitem__)
    if ranked[0] >= MIN_STOP_WORDS and ranked[0] >= STOP_WORD_LEAD * ranked[1]:
        return Detected("latin", best)
    return Detected("latin", "unknown")


def language_mismatch(expected: str, text: str) -> bool:
    """Is TEXT clearly not in the EXPECTED language (ISO 639-1, a region suffix like `pt-BR` ignored)?

    A different script is a mismatch; within Latin script, so is a clearly different stop-word language.
    Undetectable text ("unknown") and expected languages this module does not know never mismatch.
    """
    want = expected.strip().lower().replace("_", "-").split("-")[0]
    want_script = SCRIPT_OF.get(want)
    if want_script is None:
        return False
    found = detect_language(text)
    if found.script == "unknown":
        return False
    if found.script != want_script:
        return True
    return found.language not in ("unknown", want)
