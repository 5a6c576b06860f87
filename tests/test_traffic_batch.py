"""
L{TrafficGuard.messages}: the route's rate limits for several
message-starting frames at once (the gateway's relay accounts each read's
frames with it), the same as one L{TrafficGuard.frame} call per frame, all or
nothing.
"""

from __future__ import annotations

import random

import pytest

from txwssec.limits import TokenBucket
from txwssec.policy import RouteLimits
from txwssec.traffic import BYTE_RATE, MESSAGE_RATE, TrafficGuard

MAX_SIZE = 1000


def guards(limits: RouteLimits, shared: bool) -> tuple[TrafficGuard, TrafficGuard]:
    """Two guards in the same state (consumer buckets of their own each)."""

    def consumer() -> tuple[TokenBucket | None, TokenBucket | None]:
        if not shared:
            return (None, None)
        return (TokenBucket(7, 9, 0.0), TokenBucket(1500, 2500, 0.0))

    return (
        TrafficGuard(limits, MAX_SIZE, 0.0, consumer()),
        TrafficGuard(limits, MAX_SIZE, 0.0, consumer()),
    )


def state(guard: TrafficGuard, now: float) -> list[float]:
    buckets = [*guard._buckets_messages, *guard._buckets_bytes]
    return [b.available(now) for b in buckets] + [guard.fragments]


LIMITS = [
    RouteLimits(messages_per_second=5, burst=8),
    RouteLimits(bytes_per_second=700),
    RouteLimits(messages_per_second=3, burst=4, bytes_per_second=1200),
]


@pytest.mark.parametrize("shared", [False, True], ids=["connection", "with-consumer"])
@pytest.mark.parametrize("limits", LIMITS, ids=["messages", "bytes", "both"])
def test_messages_is_frame_by_frame_all_or_nothing(limits: RouteLimits, shared: bool) -> None:
    """
    For random batches at random times: when no frame of a batch goes past
    a limit frame by frame, C{messages} accounts them all and leaves every
    bucket exactly as the frame by frame calls do; otherwise it accounts
    nothing, and the frame by frame calls then name the same limit at the
    same frame as on a guard that never saw the batch.
    """
    rng = random.Random(19)
    batched, single = guards(limits, shared)
    now = 0.0
    refused = accepted = 0
    for _ in range(400):
        now += rng.choice([0.0, 0.001, 0.05, 0.3])
        lengths = [rng.choice([0, 1, 60, 300, 999]) for _ in range(rng.randint(1, 6))]
        before = state(batched, now)
        if batched.messages(len(lengths), sum(lengths), now):
            accepted += 1
            assert [single.frame(1, n, True, now) for n in lengths] == [None] * len(lengths)
        else:
            refused += 1
            assert state(batched, now) == before
            outcomes = [batched.frame(2, n, True, now) for n in lengths]
            assert outcomes == [single.frame(2, n, True, now) for n in lengths]
            assert any(o in (MESSAGE_RATE, BYTE_RATE) for o in outcomes)
        assert state(batched, now) == state(single, now)
    assert accepted > 10 and refused > 10, (accepted, refused)


def test_messages_takes_the_burst_exactly() -> None:
    """A burst of 4: a batch of 4 goes, a fifth message does not, nor a batch of 5."""
    limits = RouteLimits(messages_per_second=1, burst=4)
    guard = TrafficGuard(limits, MAX_SIZE, 0.0)
    assert not guard.messages(5, 5, 0.0)
    assert guard.messages(4, 4, 0.0)
    assert not guard.messages(1, 0, 0.0)
    assert guard.frame(1, 0, True, 0.0) is MESSAGE_RATE
    # One second later one more message.
    assert guard.messages(1, 0, 1.0)
    assert not guard.messages(1, 0, 1.0)


def test_messages_byte_burst_exactly() -> None:
    """The byte bucket holds max(rate, max_message_size) = 1000 bytes."""
    limits = RouteLimits(bytes_per_second=10)
    guard = TrafficGuard(limits, MAX_SIZE, 0.0)
    assert not guard.messages(3, 1001, 0.0)
    assert guard.messages(3, 1000, 0.0)
    assert guard.messages(2, 0, 0.0)  # empty messages cost no byte
    assert not guard.messages(1, 1, 0.0)
    assert guard.messages(1, 10, 1.0)


def test_messages_without_limits_always_accounts() -> None:
    guard = TrafficGuard(RouteLimits(), MAX_SIZE, 0.0)
    assert not guard.rated
    assert guard.messages(10_000, 10**9, 0.0)


def test_messages_starts_the_fragment_count_afresh() -> None:
    """As a message-starting frame does: a later continuation counts from 2."""
    guard = TrafficGuard(RouteLimits(max_fragments=2), MAX_SIZE, 0.0)
    assert guard.frame(1, 1, True, 0.0) is None
    assert guard.frame(0, 1, False, 0.0) is None
    assert guard.messages(2, 2, 0.0)
    assert guard.frame(0, 1, False, 0.0) is None
    assert guard.frame(0, 1, False, 0.0) is not None


def test_consumer_bucket_shared_by_two_guards() -> None:
    """A consumer's bucket is taken from by every connection's batches."""
    shared = TokenBucket(1, 5, 0.0)
    limits = RouteLimits(messages_per_second=100, burst=100)
    one = TrafficGuard(limits, MAX_SIZE, 0.0, (shared, None))
    two = TrafficGuard(limits, MAX_SIZE, 0.0, (shared, None))
    assert one.messages(3, 0, 0.0)
    assert not two.messages(3, 0, 0.0)
    assert two.messages(2, 0, 0.0)
    assert one.frame(1, 0, True, 0.0) is MESSAGE_RATE
