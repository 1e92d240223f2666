"""timeout_scope: a scope only where it could fire first, found without trio's effective deadline when it can be."""

import trio
import trio.testing

from sidecard.scopes import NO_SCOPE, timeout_scope


def run(test) -> None:  # noqa: ANN001
    trio.run(test, clock=trio.testing.MockClock(autojump_threshold=0))


def test_no_timeout_is_no_scope() -> None:
    async def test() -> None:
        assert timeout_scope(None) is NO_SCOPE

    run(test)


def test_a_timeout_the_enclosing_deadline_meets_first_is_no_scope() -> None:
    async def test() -> None:
        with trio.move_on_after(5):
            assert timeout_scope(5) is NO_SCOPE
            assert timeout_scope(10) is NO_SCOPE
            assert isinstance(timeout_scope(4), trio.CancelScope)

    run(test)


def test_a_timeout_before_the_callers_bound_gets_its_scope() -> None:
    async def test() -> None:
        now = trio.current_time()
        with trio.move_on_after(60):
            scope = timeout_scope(30, now=now, bound=now + 60)
            assert isinstance(scope, trio.CancelScope) and scope.deadline == now + 30
            with scope:
                await trio.sleep(31)
            assert scope.cancelled_caught and trio.current_time() == now + 30
            # At or past the bound the enclosing deadline is asked, as without one.
            assert timeout_scope(30, bound=trio.current_time() + 30) is NO_SCOPE

    run(test)
