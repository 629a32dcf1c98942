"""Which controller replica next, and after how long (meshcore.failover): a killed replica's nodes move to the
next at once, spread over a short window; a controller that is wholly down is waited for as one always was."""

from __future__ import annotations

import itertools

import pytest

from meshcore.failover import (
    FAILOVER_CAP,
    FIRST_DELAY,
    HEALTHY_AFTER,
    WAIT_CAP,
    Failover,
    controller_urls,
    tried_in_order,
    usable_urls,
)

A, B, C = "https://ctl-1:8443", "https://ctl-2:8443", "https://ctl-3:8443"


def most(urls: list[str]) -> Failover:
    """A failover whose jitter always draws the top of its window (just below it, really)."""
    return Failover(urls, jitter=lambda: 1.0)


def test_a_failed_stream_moves_to_the_next_replica_and_wraps_around() -> None:
    failover = most([A, B, C])
    assert failover.url == A and failover.position == 1
    seen = []
    for _ in range(4):
        failover.failed(now=0.0)
        seen.append(failover.url)
    assert seen == [B, C, A, B]


def test_the_first_move_to_another_replica_waits_at_most_a_tenth_of_a_second() -> None:
    failover = most([A, B, C])
    failover.connected(now=0.0)
    assert failover.failed(now=60.0) == pytest.approx(FIRST_DELAY)


def test_delays_are_full_jitter_from_zero_to_the_ceiling() -> None:
    draws = iter([0.0, 0.5, 0.999])
    failover = Failover([A, B, C], jitter=lambda: next(draws))
    assert [failover.failed(now=0.0) for _ in range(3)] == pytest.approx([0.0, 0.1, 0.3996])


def test_while_some_replica_is_untried_the_ceiling_stops_at_the_failover_cap() -> None:
    urls = [f"https://ctl-{n}:8443" for n in range(12)]
    failover = most(urls)
    delays = [failover.failed(now=0.0) for _ in range(len(urls) - 1)]
    assert delays[:5] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6])
    assert max(delays) == FAILOVER_CAP
    assert sum(delays) < 20  # eleven replicas tried in under twenty seconds


def test_once_every_replica_failed_in_a_row_the_ceiling_grows_to_the_wait_cap() -> None:
    failover = most([A, B, C])
    delays = [failover.failed(now=0.0) for _ in range(12)]
    assert delays[:3] == pytest.approx([0.1, 0.2, 0.4])  # the first round
    assert delays[3:6] == pytest.approx([0.8, 1.6, 3.2])  # all down: waiting for the controller now
    assert delays[-1] == WAIT_CAP


def test_a_single_controller_backs_off_to_the_wait_cap_and_stays_on_its_url() -> None:
    failover = most([A])
    delays = [failover.failed(now=0.0) for _ in range(20)]
    assert failover.url == A
    assert delays[0] == pytest.approx(FIRST_DELAY) and delays[-1] == WAIT_CAP
    assert all(later >= earlier for earlier, later in itertools.pairwise(delays))


def test_a_stream_healthy_for_a_while_resets_the_back_off() -> None:
    failover = most([A, B, C])
    for _ in range(6):
        failover.failed(now=0.0)
    failover.connected(now=100.0)
    assert failover.failed(now=100.0 + HEALTHY_AFTER) == pytest.approx(FIRST_DELAY)


def test_a_stream_that_ends_at_once_does_not_reset_the_back_off() -> None:
    failover = most([A, B, C])
    for _ in range(4):
        failover.failed(now=0.0)
        failover.connected(now=0.0)  # a replica that accepts and closes straight away
    assert failover.failed(now=1.0) == pytest.approx(1.6)


def test_the_back_off_never_overflows_after_days_of_failures() -> None:
    failover = most([A])
    for _ in range(10_000):
        delay = failover.failed(now=0.0)
    assert delay == WAIT_CAP


def test_an_empty_list_from_the_controller_keeps_the_known_one() -> None:
    failover = most([A, B])
    assert not failover.learn([])
    assert failover.urls == (A, B)


def test_a_new_list_keeps_the_replica_in_use_and_goes_on_after_it() -> None:
    failover = most([A, B])
    failover.failed(now=0.0)
    assert failover.url == B
    assert failover.learn([A, B, C]) and not failover.learn([A, B, C + "/"])
    assert failover.url == B and failover.position == 2
    failover.failed(now=0.0)
    assert failover.url == C


def test_a_replica_that_left_the_list_is_used_until_it_fails_then_the_list_starts_over() -> None:
    failover = most([A, B])
    assert failover.learn([B, C])
    assert failover.url == A and failover.position is None
    failover.failed(now=0.0)
    assert failover.url == B


def test_a_failover_needs_a_url() -> None:
    with pytest.raises(ValueError, match="at least one controller URL"):
        Failover([])


def test_requests_start_at_the_replica_that_answered_last_and_go_on_in_list_order() -> None:
    assert tried_in_order((A, B, C), A) == (A, B, C)
    assert tried_in_order((A, B, C), B) == (B, C, A)
    assert tried_in_order((A, B, C), "https://gone:8443") == (A, B, C)
    assert tried_in_order((A,), A) == (A,)


def test_urls_are_compared_without_a_trailing_slash_and_kept_once_in_order() -> None:
    assert controller_urls([B + "/", A, B, A + "/"]) == (B, A)


def test_a_node_follows_only_https_urls_with_a_host() -> None:
    listed = [A, "http://ctl-2:8443", "https://", "https://ctl-4:99999", "ctl-5:8443", C + "/"]
    assert usable_urls(listed) == (A, C)
