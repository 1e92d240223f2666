"""A request's error names the request on a copy: the same error object may end several requests."""

from sidecard.engine import CANCELLED_BY_CLIENT, PartialAnswer
from sidecard.errors import Code, SidecardError


def test_naming_a_request_copies_the_error_and_leaves_the_shared_one_alone():
    reply = CANCELLED_BY_CLIENT.of_request("a1-1", "req_1")
    assert (reply.code, reply.message, reply.retryable, reply.request_id, reply.upstream_request_id) == (
        Code.CANCELLED, CANCELLED_BY_CLIENT.message, False, "a1-1", "req_1")
    assert CANCELLED_BY_CLIENT.request_id is None and CANCELLED_BY_CLIENT.upstream_request_id is None
    assert str(reply) == str(CANCELLED_BY_CLIENT)


def test_a_partial_answer_stays_one_with_its_text():
    partial = PartialAnswer(Code.UPSTREAM_ERROR, "the stream broke", "Open Settings")
    reply = partial.of_request("a1-2", None)
    assert isinstance(reply, PartialAnswer) and reply.text == "Open Settings" and reply.request_id == "a1-2"
    assert partial.request_id is None


def test_the_wait_it_carries_is_kept():
    reply = SidecardError(Code.RATE_LIMITED, "slow down", retry_after_ms=250).of_request("a1-3", None)
    assert reply.retry_after_ms == 250 and reply.retryable
