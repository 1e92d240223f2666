import pytest

from sidecard.prompts.template import Template, TemplateError


def test_render_and_escapes():
    t = Template("Hi {name}, {{literal}} and }} {name}")
    assert t.names == {"name"}
    assert t.render({"name": "Ann"}) == "Hi Ann, {literal} and } Ann"


@pytest.mark.parametrize("value", ["{other}", "{0}", "{name.__class__}", "{x:>999999}", "{{", "%s", "${HOME}"])
def test_values_are_rendered_literally(value):
    t = Template("A {name} B {other}")
    assert t.render({"name": value, "other": "o"}) == f"A {value} B o"


@pytest.mark.parametrize(
    "source, fragment",
    [
        ("{a.b}", "invalid placeholder"),
        ("{0}", "invalid placeholder"),
        ("{x!r}", "invalid placeholder"),
        ("{x:>3}", "invalid placeholder"),
        ("{x[0]}", "invalid placeholder"),
        ("{}", "invalid placeholder"),
        ("open {x", "unclosed"),
        ("a } b", "single '}'"),
    ],
)
def test_only_plain_names_are_placeholders(source, fragment):
    with pytest.raises(TemplateError, match=fragment.replace("{", r"\{").replace("}", r"\}")):
        Template(source)
