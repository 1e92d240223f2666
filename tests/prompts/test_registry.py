from pathlib import Path

import pytest

from sidecard.errors import Code, SidecardError
from sidecard.policies.canary import bucket, in_canary
from sidecard.prompts.registry import PromptStore

V1 = '''description = "one"
system = "You help with {topic}."
[variables]
topic = { default = "things" }
q = {}
[[messages]]
role = "user"
content = "{q}"
'''


def write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def root(tmp_path):
    write(tmp_path, "greet/v1.toml", V1)
    write(tmp_path, "greet/v2.toml", V1.replace("one", "two"))
    write(tmp_path, "greet/release.toml", "stable = 1\n")
    return tmp_path


def test_load_and_render(root):
    store = PromptStore(root)
    assert store.reload().errors == ()
    version, canary = store.resolve("greet")
    assert (version.version, canary) == (1, False)
    system, messages = version.render({"q": "hello"})
    assert system == "You help with things." and messages[0].content == "hello"


def test_missing_and_undeclared_variables_are_named(root):
    store = PromptStore(root)
    store.reload()
    version, _ = store.resolve("greet")
    with pytest.raises(SidecardError) as info:
        version.render({})
    assert info.value.code == Code.BAD_REQUEST and "vars.q" in info.value.message
    with pytest.raises(SidecardError, match="vars.bogus"):
        version.render({"q": "x", "bogus": "y"})


def test_unknown_prompt_and_version(root):
    store = PromptStore(root)
    store.reload()
    for kwargs in [{"name": "nope"}, {"name": "greet", "version": 9}]:
        with pytest.raises(SidecardError) as info:
            store.resolve(**kwargs)
        assert info.value.code == Code.PROMPT_NOT_FOUND


def test_bad_file_keeps_last_good_version_and_reports(root):
    store = PromptStore(root)
    store.reload()
    write(root, "greet/v2.toml", "this is [not toml")
    write(root, "greet/v3.toml", V1.replace("{q}", "{undeclared}"))
    snapshot = store.reload()
    reasons = {Path(e.path).name: e.reason for e in snapshot.errors}
    assert "invalid TOML" in reasons["v2.toml"]
    assert "{undeclared}" in reasons["v3.toml"]
    assert store.resolve("greet", version=2)[0].description == "two"  # the last good v2 still serves
    with pytest.raises(SidecardError):
        store.resolve("greet", version=3)


def test_a_version_asking_for_more_max_tokens_than_any_model_takes_is_refused(root):
    """The bound of a request's own max_tokens holds for the one its prompt gives it."""
    write(root, "greet/v3.toml", 'max_tokens = 1000000000000000\n' + V1)
    snapshot = PromptStore(root).reload()
    assert [(Path(e.path).name, e.reason) for e in snapshot.errors] == [("v3.toml", "max_tokens: expected int <= 1000000")]


def test_live_version_must_not_be_edited_but_drafts_may(root):
    store = PromptStore(root)
    store.reload()
    write(root, "greet/v1.toml", V1.replace("one", "edited"))
    write(root, "greet/v2.toml", V1.replace("one", "draft edit"))
    snapshot = store.reload()
    assert any("live and must not be edited" in e.reason for e in snapshot.errors)
    assert store.resolve("greet")[0].description == "one"
    assert store.resolve("greet", version=2)[0].description == "draft edit"


def test_deleted_live_version_is_kept_until_the_release_moves(root):
    store = PromptStore(root)
    store.reload()
    (root / "greet/v1.toml").unlink()
    snapshot = store.reload()
    assert any("deleted while live" in e.reason for e in snapshot.errors)
    assert store.resolve("greet")[0].version == 1
    write(root, "greet/release.toml", "stable = 2\n")
    store.reload()
    assert store.resolve("greet")[0].version == 2
    assert 1 not in store.snapshot.prompts["greet"].versions


def test_bad_release_keeps_the_previous_release(root):
    store = PromptStore(root)
    store.reload()
    write(root, "greet/release.toml", "stable = 7\n")
    snapshot = store.reload()
    assert any("v7 does not exist" in e.reason for e in snapshot.errors)
    assert store.resolve("greet")[0].version == 1


def test_use_rollback_canary_promote(root):
    write(root, "greet/v3.toml", V1.replace("one", "three"))
    store = PromptStore(root)
    store.reload()
    before, after = store.use("greet", 2)
    assert (before.stable, after.stable, after.overridden) == (1, 2, True)
    _, after = store.rollback("greet")
    assert after.stable == 1
    _, after = store.set_canary("greet", 3, 25)
    assert (after.canary, after.canary_percent) == (3, 25)
    _, after = store.promote("greet")
    assert (after.stable, after.canary) == (3, None)
    _, after = store.rollback("greet")
    assert after.stable == 1
    _, after = store.clear("greet")
    assert (after.stable, after.overridden) == (1, False)


def test_override_wins_over_release_file_changes(root):
    store = PromptStore(root)
    store.reload()
    store.use("greet", 2)
    write(root, "greet/release.toml", "stable = 1\ncanary = 2\ncanary_percent = 50\n")
    store.reload()
    assert store.effective("greet").stable == 2


def test_canary_split_is_sticky_and_close_to_target():
    users = [f"user-{i}" for i in range(10_000)]
    share = sum(in_canary("greet", u, 10) for u in users) / len(users)
    assert abs(share - 0.10) <= 0.02
    in_at_10 = {u for u in users if in_canary("greet", u, 10)}
    in_at_30 = {u for u in users if in_canary("greet", u, 30)}
    assert in_at_10 <= in_at_30  # raising the percentage keeps everyone already in
    assert all(bucket("greet", u) == bucket("greet", u) for u in users[:100])


def test_store_canary_is_sticky_per_user(root):
    write(root, "greet/release.toml", "stable = 1\ncanary = 2\ncanary_percent = 50\n")
    store = PromptStore(root)
    store.reload()
    picks = {u: store.resolve("greet", sticky_key=u)[0].version for u in map(str, range(200))}
    assert set(picks.values()) == {1, 2}
    assert all(store.resolve("greet", sticky_key=u)[0].version == v for u, v in picks.items())


def test_the_shipped_example_prompts_load():
    store = PromptStore(Path(__file__).parents[2] / "prompts")
    snapshot = store.reload()
    assert snapshot.errors == ()
    multi = [p for p in snapshot.prompts.values() if len(p.versions) >= 2]
    assert len(multi) >= 2


def test_a_refused_edit_is_no_longer_reported_once_the_release_moves_off_the_version(root):
    store = PromptStore(root)
    store.reload()
    write(root, "greet/v1.toml", V1.replace("one", "edited"))
    assert any("live and must not be edited" in e.reason for e in store.reload().errors)
    write(root, "greet/release.toml", "stable = 2\n")  # the release moves off v1: the edit may now go in
    snapshot = store.reload()
    assert snapshot.errors == () and store.resolve("greet")[0].version == 2
    assert store.resolve("greet", version=1)[0].description == "edited"


def test_an_override_naming_a_version_that_is_gone_falls_back_to_the_release(root):
    write(root, "greet/v3.toml", V1.replace("one", "three"))
    store = PromptStore(root)
    store.reload()
    store.use("greet", 3)
    store.overrides["greet"].canary = 9  # as a state file from before v9 was deleted would bring back
    restarted = PromptStore(root)  # a restart after v3.toml was deleted: v3 is not in memory any more
    (root / "greet/v3.toml").unlink()
    restarted.reload()
    restarted.overrides, restarted.history = store.overrides, store.history
    effective = restarted.effective("greet")
    assert (effective.stable, effective.canary, effective.missing) == (1, None, (3, 9))
    assert effective.describe()["override_missing"] == [3, 9]
    assert restarted.resolve("greet")[0].version == 1  # serving, from release.toml
    problems = restarted.errors()
    assert [Path(p.path).name for p in problems] == ["v3.toml", "v9.toml"]
    assert all("sidecardctl prompt clear greet" in p.reason for p in problems)
    assert restarted.use("greet", 2)[1].stable == 2  # every op works
    assert restarted.rollback("greet")[1].stable == 1
    assert restarted.clear("greet")[1].overridden is False and restarted.errors() == ()


def test_use_pins_the_version_and_stops_the_canary(root):
    write(root, "greet/v3.toml", V1.replace("one", "three"))
    write(root, "greet/release.toml", "stable = 1\ncanary = 3\ncanary_percent = 10\n")
    store = PromptStore(root)
    store.reload()
    _, after = store.use("greet", 2)
    assert (after.stable, after.canary, after.canary_percent) == (2, None, 0.0)


def test_rollback_on_a_first_version_stops_its_canary_or_says_what_to_do(root):
    write(root, "greet/release.toml", "stable = 1\ncanary = 2\ncanary_percent = 10\n")
    store = PromptStore(root)
    store.reload()
    _, after = store.rollback("greet")
    assert (after.stable, after.canary) == (1, None)
    with pytest.raises(SidecardError) as info:
        store.rollback("greet")
    assert info.value.code == Code.BAD_REQUEST
    assert "first version" in info.value.message and "sidecardctl kill prompt:greet" in info.value.message


def test_stopping_a_canary_that_is_not_running_is_a_no_op(root):
    store = PromptStore(root)
    store.reload()
    before, after = store.set_canary("greet", None, 0)
    assert before == after and after.canary is None and "greet" not in store.overrides


def test_a_change_that_raises_leaves_the_overrides_as_they_were(root):
    store = PromptStore(root)
    store.reload()
    store.use("greet", 2)
    with pytest.raises(RuntimeError), store.change():
        store.clear("greet")
        raise RuntimeError("refused after the fact")
    assert store.effective("greet").stable == 2 and store.history["greet"] == [1]


@pytest.mark.parametrize("setup, move", [
    pytest.param([lambda s: s.use("greet", 1)], lambda s: s.use("greet", 2), id="use"),
    pytest.param([lambda s: s.use("greet", 2), lambda s: s.use("greet", 1)], lambda s: s.rollback("greet"), id="rollback"),
    pytest.param([lambda s: s.use("greet", 1), lambda s: s.set_canary("greet", 2, 10)], lambda s: s.promote("greet"),
                 id="promote"),
    pytest.param([lambda s: s.use("greet", 3), lambda s: s.set_canary("greet", 1, 10)],
                 lambda s: s.set_canary("greet", None, 0), id="canary-0"),
    pytest.param([lambda s: s.use("greet", 3), lambda s: s.set_canary("greet", 1, 10)],
                 lambda s: s.stop_canary("greet", rolled_back=1), id="quality-rollback"),
    pytest.param([lambda s: s.use("greet", 2), lambda s: s.use("greet", 1)], lambda s: s.clear("greet"), id="clear"),
])
def test_a_refused_edit_goes_in_as_an_op_moves_the_release_off_the_version(root, setup, move):
    """Not at whatever reload comes next: what `use 1` serves later must not depend on unrelated changes."""
    write(root, "greet/v3.toml", V1.replace("one", "three"))
    write(root, "greet/release.toml", "stable = 3\n")
    store = PromptStore(root)
    store.reload()
    settled = []
    store.on_settled = settled.append
    for step in setup:
        step(store)
    write(root, "greet/v1.toml", V1.replace("one", "edited"))
    assert any("v1 is live" in e.reason for e in store.reload().errors)
    assert store.resolve("greet", version=1)[0].description == "one"
    move(store)
    assert 1 not in {store.effective("greet").stable, store.effective("greet").canary}
    assert store.errors() == () and settled == [{"greet"}]
    assert store.resolve("greet", version=1)[0].description == "edited"
    store.use("greet", 1)
    assert store.resolve("greet")[0].description == "edited"


def test_stopping_a_canary_named_by_release_toml_lets_its_refused_edit_in(root):
    write(root, "greet/release.toml", "stable = 1\ncanary = 2\ncanary_percent = 10\n")
    store = PromptStore(root)
    store.reload()
    write(root, "greet/v2.toml", V1.replace("one", "edited"))
    assert any("v2 is live" in e.reason for e in store.reload().errors)
    store.set_canary("greet", None, 0)
    assert store.errors() == () and store.resolve("greet", version=2)[0].description == "edited"
    store.reload()  # release.toml still names v2 as canary, but the override stopped it: still not refused
    assert store.errors() == ()


def test_a_version_deleted_while_live_goes_as_an_op_moves_off_it(root):
    store = PromptStore(root)
    store.reload()
    (root / "greet/v1.toml").unlink()
    write(root, "greet/release.toml", "stable = 2\n")
    store.use("greet", 1)  # the override keeps v1 serving from memory
    assert any("deleted while live" in e.reason for e in store.reload().errors)
    store.clear("greet")
    assert store.errors() == () and sorted(store.snapshot.prompts["greet"].versions) == [2]


def test_an_op_refused_after_the_fact_leaves_the_edit_refused(root):
    store = PromptStore(root)
    store.reload()
    write(root, "greet/v1.toml", V1.replace("one", "edited"))
    store.reload()
    with pytest.raises(RuntimeError), store.change():
        store.use("greet", 2)
        raise RuntimeError("refused after the fact")
    assert store.effective("greet").stable == 1 and store.resolve("greet")[0].description == "one"
    assert any("v1 is live" in e.reason for e in store.errors())


def test_a_prompt_whose_directory_is_gone_is_removed(root):
    write(root, "other/v1.toml", V1)
    write(root, "other/release.toml", "stable = 1\n")
    store = PromptStore(root)
    store.reload()
    store.use("greet", 2)
    for path in sorted((root / "greet").iterdir()):  # files first, as `rm -rf` goes: a load may see the empty directory
        path.unlink()
    assert store.resolve("greet")[0].version == 2  # kept while the directory is there: a rewrite may be under way
    (root / "greet").rmdir()
    snapshot = store.reload()
    assert snapshot.removed == ("greet",) and "greet" not in snapshot.prompts and snapshot.errors == ()
    with pytest.raises(SidecardError) as info:
        store.resolve("greet")
    assert info.value.code == Code.PROMPT_NOT_FOUND
    (problem,) = store.errors()  # the override is left over: said plainly, with the way to drop it
    assert problem.path == str(root / "greet") and "directory is gone" in problem.reason
    assert "sidecardctl prompt clear greet" in problem.reason
    assert store.forget("greet") and store.errors() == () and not store.forget("greet")
    assert store.reload().removed == ()


def test_a_prompt_directory_that_is_gone_altogether_keeps_everything_serving(tmp_path, root):
    store = PromptStore(root)
    store.reload()
    moved = tmp_path.parent / (tmp_path.name + "-moved")
    root.rename(moved)  # a deploy swapping the directory, or an unmounted disk: not every prompt removed at once
    try:
        snapshot = store.reload()
        assert "greet" in snapshot.prompts and snapshot.removed == ()
        assert [e.reason for e in snapshot.errors] == ["the prompt directory is gone: every prompt loaded keeps serving"]
    finally:
        moved.rename(root)
    assert store.reload().errors == ()


def test_a_prompt_directory_that_cannot_be_read_keeps_what_it_served(root, monkeypatch):
    """Review: reading a prompt's directory could raise out of a load (unreadable, or gone since it was listed),
    and now every override change (`settle`) may read one: the prompt as loaded keeps serving, and it is said."""
    store = PromptStore(root)
    store.reload()
    real_iterdir = Path.iterdir

    def unreadable(path):
        if path.name == "greet":
            raise PermissionError(13, "Permission denied")
        return real_iterdir(path)

    monkeypatch.setattr(Path, "iterdir", unreadable)
    snapshot = store.reload()
    assert [e.reason for e in snapshot.errors] == ["cannot be read (Permission denied): the prompt as loaded before keeps serving"]
    assert store.resolve("greet")[0].version == 1


def test_a_reload_that_settles_still_reports_what_it_removed(root, monkeypatch):
    """An op moving the release off a held version while the reload reads: the settle that follows reads that
    prompt again, and the reload's own `removed` must survive it (its log line names the prompts it removed)."""
    import trio

    from sidecard.prompts import registry

    write(root, "other/v1.toml", V1)
    write(root, "other/release.toml", "stable = 1\n")
    store = PromptStore(root)
    store.reload()
    write(root, "greet/v1.toml", V1.replace("one", "edited"))
    store.reload()  # v1 is live: held from memory
    for path in sorted((root / "other").iterdir()):
        path.unlink()
    (root / "other").rmdir()
    real_load = registry.load_directory

    def load_while_an_op_lands(*args, **kwargs):
        monkeypatch.setattr(registry, "load_directory", real_load)  # (the op's own settle loads as usual)
        snapshot = real_load(*args, **kwargs)
        trio.from_thread.run_sync(store.use, "greet", 2)
        return snapshot

    monkeypatch.setattr(registry, "load_directory", load_while_an_op_lands)
    snapshot = trio.run(store.reload_async)
    assert snapshot.removed == ("other",) and "other" not in snapshot.prompts
    assert store.resolve("greet", version=1)[0].description == "edited"  # settled: the edit went in


def test_a_prompt_file_saved_with_a_byte_order_mark_loads(root):
    write(root, "greet/v2.toml", "\ufeff" + V1.replace("one", "marked"))
    write(root, "greet/release.toml", "\ufeffstable = 2\n")
    store = PromptStore(root)
    assert store.reload().errors == ()
    assert store.resolve("greet")[0].description == "marked"
