from dataclasses import dataclass

from sidecard.policies.hedge import Hedge, hedge_for


@dataclass
class T:
    hedge_after_ms: int | None = None


def test_a_target_with_a_hedge_delay_is_raced_against_the_next():
    targets = [T(250), T(), T(100)]
    assert hedge_for(targets, 0) == Hedge(partner=1, after_s=0.25)
    assert hedge_for(targets, 1) is None  # no delay: never hedged
    assert hedge_for(targets, 2) is None  # the last target has nothing to race against
    assert hedge_for([T(100)], 0) is None
