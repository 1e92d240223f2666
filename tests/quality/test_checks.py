"""The cheap per-answer checks: each one's positives and negatives, language detection; huge inputs (their cost: bench/quality_checks.py)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecard.quality.checks import (
    CHECKS,
    Detected,
    Sample,
    detect_language,
    is_refusal,
    language_mismatch,
    repeats,
    run_checks,
)
from sidecard.sim.replies import OFF_TOPIC, REFUSAL

QUESTION = "How do I reset my password?"
GOOD = "Open Settings, then Security, then choose Reset password. You will get an email with a link."


def sample(answer: str = GOOD, **fields) -> Sample:
    base = {"feature": "support", "model": "claude-sonnet-4-6", "prompt": "support-reply", "version": 1,
            "canary": False, "question": QUESTION, "system": "You are helpful.", "answer": answer,
            "stop_reason": "end_turn", "output_problem": None}  # fmt: skip
    return Sample(**{**base, **fields})


def test_a_good_answer_passes_everything():
    assert run_checks(sample()) == []
    assert run_checks(sample(language="en")) == []
    assert CHECKS == ("empty", "refusal", "truncated", "bad_format", "repeats_prompt", "language_mismatch")


def test_empty():
    assert run_checks(sample("")) == ["empty"]
    assert run_checks(sample(" \n\t ", language="de")) == ["empty"]
    assert "empty" not in run_checks(sample("."))


@pytest.mark.parametrize("answer", [
    REFUSAL,
    "I’m sorry, but I can’t assist with that.",  # curly apostrophes
    "I cannot help with requests like this one.",
    "Sorry - I am unable to provide that information.",
    "As an AI language model, I don't have access to your account.",
    "I must decline to answer this question.",
    "Unfortunately, I'm not able to help with that, but our team can.",
    "  I won't share personal data about other customers.",
])  # fmt: skip
def test_refusals(answer):
    assert run_checks(sample(answer)) == ["refusal"]


@pytest.mark.parametrize("answer", [
    GOOD,
    OFF_TOPIC,  # off-topic is the judge's to catch, not a refusal
    "You can't reset it from the app yet; use the website instead.",
    "I can help with that: open Settings and choose Reset password.",
    "Sorry for the wait! Open Settings and choose Reset password.",
])  # fmt: skip
def test_not_refusals(answer):
    assert "refusal" not in run_checks(sample(answer))


def test_a_refusal_phrase_late_or_in_a_long_answer_does_not_count():
    late = "Open Settings, then Security. " * 8 + "I cannot help with billing questions here."
    assert len(late) > 200 and not is_refusal(late)
    long = "I'm sorry, but I can't do that directly. " + "Here is how you can do it yourself, step by step. " * 25
    assert len(long) > 1000 and run_checks(sample(long)) == []
    assert is_refusal(long)  # the phrase is there; the answer is too long to be a refusal


_PIECES = ["I", "i'm", "I\u2019m", "am", "can't", "cannot", "not", "able", "to", "help", "as", "an", "AI", "ai,", "must",
           "decline", "this", "your", "request", "violates", "comfortable", "with", "Hi", "wifi", "sure", "\n", "."]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=14), st.sampled_from([" ", "  ", "\n"]))
def test_the_refusal_shortcut_never_changes_a_verdict(words, gap):
    from sidecard.quality.checks import _REFUSAL, REFUSAL_HEAD_CHARS

    answer = gap.join(words)
    head = answer.lstrip()[:REFUSAL_HEAD_CHARS].lower().replace("\u2019", "'")
    assert is_refusal(answer) == (_REFUSAL.search(head) is not None)


def test_truncated_and_bad_format():
    assert run_checks(sample(stop_reason="max_tokens")) == ["truncated"]
    assert run_checks(sample(stop_reason="stop_sequence")) == []
    assert run_checks(sample(output_problem="the answer is not valid JSON")) == ["bad_format"]
    assert run_checks(sample("", stop_reason="max_tokens", output_problem="x")) == ["empty", "truncated", "bad_format"]


def test_repeats_prompt():
    question = "My invoice for March shows the wrong company address, can you fix it before the audit?"
    assert run_checks(sample(question, question=question)) == ["repeats_prompt"]  # an echo
    parroted = "You said: my invoice for March shows the wrong company address, can you fix it. Yes."
    assert repeats(question, parroted)
    answered = "Yes: open Billing, edit the company address, and we will reissue the March invoice today."
    assert not repeats(question, answered)
    q = "one two three four five six seven eight nine ten"
    assert not repeats(q, "one two three four five six seven")  # fewer than 8 words are never judged
    assert not repeats("short question", "short question " * 10)  # a question shorter than one n-gram


def test_repeats_prompt_exact_share():
    q = "a b c d e f g h i j"
    # 6 four-grams, 4 shared (a b c d / b c d e / c d e f / d e f g) -> 0.67 >= 0.6
    assert repeats(q, "a b c d e f g x y")
    # 6 four-grams, 3 shared -> 0.5 < 0.6
    assert not repeats(q, "a b c d e f x y z")


def _repeats_by_the_rule(question: str, answer: str) -> bool:
    """The rule as the module docstring states it, with every n-gram built."""
    import re

    from sidecard.quality.checks import REPEAT_MIN_WORDS, REPEAT_NGRAM, REPEAT_SHARE

    def grams(text: str) -> list[tuple[str, ...]]:
        words = re.findall(r"\w+", text.lower())
        return [tuple(words[i : i + REPEAT_NGRAM]) for i in range(len(words) - REPEAT_NGRAM + 1)]

    if len(re.findall(r"\w+", answer)) < REPEAT_MIN_WORDS:
        return False
    asked, given = set(grams(question)), grams(answer)
    return bool(asked) and sum(gram in asked for gram in given) >= REPEAT_SHARE * len(given)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from("a b c d e f x y".split()), max_size=14),
       st.lists(st.sampled_from("a b c d e f x y z".split()), max_size=20))
def test_repeats_skips_no_answer_the_rule_would_flag(question, answer):
    # (the word-level bound skips building n-grams for most answers: it must never change a verdict)
    assert repeats(" ".join(question), " ".join(answer)) == _repeats_by_the_rule(" ".join(question), " ".join(answer))


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="abAc_1 .,-'\n\t\u00e9\u00a0", max_size=60),
       st.text(alphabet="abAc_1 .-\u00e9", max_size=40))
def test_repeats_splits_words_as_the_rule_does_in_any_script(answer, question):
    # (ASCII texts take a split without the regex: its words must be the regex's, and mixing scripts must not
    # hide a repeat)
    from sidecard.quality.checks import _ascii_words, _words

    if answer.isascii():
        assert [w.decode() for w in _ascii_words(answer)] == _words(answer)
    echo = f"{question} {answer} {question} {question}"
    assert repeats(question, echo) == _repeats_by_the_rule(question, echo)


LANGUAGES = {
    "en": "To reset your password, open the settings page and choose Security. If you do not see it, contact us.",
    "de": "Um Ihr Passwort zurückzusetzen, öffnen Sie die Einstellungen und wählen Sie Sicherheit. Wenn die Option "
    "nicht angezeigt wird, wenden Sie sich an den Support.",
    "fr": "Pour réinitialiser votre mot de passe, ouvrez les paramètres et choisissez Sécurité. Si vous ne voyez pas "
    "cette option, contactez le support.",
    "es": "Para restablecer su contraseña, abra la configuración y elija Seguridad. Si no ve la opción, póngase en "
    "contacto con el soporte y le ayudaremos.",
    "it": "Per reimpostare la password, apri le impostazioni e scegli Sicurezza. Se non vedi questa opzione, "
    "contatta il supporto e ti aiuteremo con la procedura.",
    "pt": "Para redefinir a sua senha, abra as configurações e escolha Segurança. Se não vir a opção, entre em "
    "contato com o suporte e nós ajudamos você.",
    "nl": "Om uw wachtwoord opnieuw in te stellen, opent u de instellingen en kiest u Beveiliging. Als u de optie "
    "niet ziet, neem dan contact op met de ondersteuning.",
    "sv": "För att återställa ditt lösenord öppnar du inställningarna och väljer Säkerhet. Om du inte ser "
    "alternativet kan du kontakta supporten så hjälper vi dig.",
}


@pytest.mark.parametrize("lang", sorted(LANGUAGES))
def test_latin_languages_by_stop_words(lang):
    text = LANGUAGES[lang]
    assert detect_language(text) == Detected("latin", lang)
    assert not language_mismatch(lang, text)
    for other in LANGUAGES:
        assert language_mismatch(other, text) is (other != lang)


def test_scripts():
    assert detect_language("Чтобы сбросить пароль, откройте настройки.") == Detected("cyrillic", "unknown")
    assert detect_language("パスワードをリセットするには、設定を開いてください。") == Detected("kana", "ja")
    assert detect_language("要重置密码，请打开设置并选择安全选项。") == Detected("han", "zh")
    assert detect_language("비밀번호를 재설정하려면 설정을 열고 보안을 선택하세요.") == Detected("hangul", "ko")
    assert detect_language("Για να επαναφέρετε τον κωδικό σας, ανοίξτε τις ρυθμίσεις.") == Detected("greek", "el")
    assert detect_language("لإعادة تعيين كلمة المرور، افتح الإعدادات.") == Detected("arabic", "unknown")
    assert detect_language("כדי לאפס את הסיסמה, פתח את ההגדרות.") == Detected("hebrew", "unknown")
    assert detect_language("OK 42!") == Detected("unknown", "unknown")  # too few letters


def test_language_mismatch():
    russian = "Чтобы сбросить пароль, откройте настройки и выберите Безопасность."
    assert not language_mismatch("ru", russian) and not language_mismatch("uk", russian)  # script only
    assert language_mismatch("en", russian) and language_mismatch("ja", russian)
    assert language_mismatch("ru", LANGUAGES["en"])
    assert language_mismatch("zh", "パスワードをリセットするには、設定を開いてください。")  # Japanese, not Chinese
    assert not language_mismatch("pt-BR", LANGUAGES["pt"]) and language_mismatch("pt_BR", LANGUAGES["es"])
    assert not language_mismatch("pl", "Faktura jest generowana pierwszego dnia każdego miesiąca.")  # unknown: fine
    assert not language_mismatch("de", "Open Settings, then Security.")  # too few stop words: unknown
    assert not language_mismatch("xx", LANGUAGES["en"])  # a language the checks do not know
    assert run_checks(sample(LANGUAGES["fr"], language="de")) == ["language_mismatch"]
    assert run_checks(sample(LANGUAGES["fr"])) == []  # no expected language: not checked


def test_huge_inputs_are_checked_without_a_false_finding():
    # Their cost is measured by bench/quality_checks.py, not asserted here.
    huge = sample(" ".join(f"word{i}" for i in range(200_000)), question="lorem ipsum dolor " * 60_000, language="en")
    assert run_checks(huge) == []
