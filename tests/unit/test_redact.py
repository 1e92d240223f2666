from sidecard.observe.redact import Redactor, pseudonym
from tests.harness import fake_api_key


def test_masks_pii_and_credentials():
    r = Redactor(["my-configured-key-123456"])
    text = (
        "mail jane.doe@example.com or call +1 (415) 555-0134, card 4111 1111 1111 1111, "
        f"key {fake_api_key('AbCdEfGhIjKlMnOpQrStUv')}, Authorization: Bearer abc.def.ghijkl, "
        "password=hunter2 and my-configured-key-123456"
    )
    out = r.redact(text)
    for secret in ["jane.doe", "555-0134", "4111", "sk-ant", "abc.def", "hunter2", "my-configured-key"]:
        assert secret not in out
    assert "[email]" in out and "[card]" in out and "[key]" in out and "[token]" in out


def test_prefix_is_short_single_line_and_redacts_across_the_cut():
    r = Redactor()
    text = "x" * 70 + " " + fake_api_key("A" * 60)
    out = r.prefix(text, 80)
    assert len(out) <= 80 and "sk-ant" not in out and "AAAA" not in out
    assert r.prefix("line one\nline two", 80) == "line one line two"
    assert r.prefix("short", 80) == "short"
    assert r.prefix("anything", 0) == ""


def test_pseudonym_is_stable_and_salted():
    assert pseudonym("alice", b"s1") == pseudonym("alice", b"s1")
    assert pseudonym("alice", b"s1") != pseudonym("alice", b"s2")
    assert "alice" not in pseudonym("alice", b"s1")
