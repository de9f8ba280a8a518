"""The push planner (umemd.planner): demand pre-paging, hot windows after faults,
every page pushed once per session."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from umemd.planner import PushPlanner


def drain(plan: PushPlanner) -> list[tuple[int, int]]:
    runs = []
    while (run := plan.next_push()) is not None:
        runs.append(run)
    return runs


def test_a_demand_prepages_until_the_first_page_already_sent() -> None:
    plan = PushPlanner(100, prepage=8)
    assert plan.demand(20) == (20, 28)
    assert plan.demand(16) == (16, 20), "pre-paging stops at page 20, sent already"
    assert plan.demand(20) == (20, 21), "a demanded page goes again (it has not arrived), alone"
    assert plan.demand(96) == (96, 100), "nothing past the last page"


def test_the_push_follows_each_faults_window_oldest_first_then_goes_in_order() -> None:
    plan = PushPlanner(1000, prepage=2, after_fault=10, run=4)
    plan.demand(500)
    plan.demand(100)
    runs = drain(plan)
    assert runs[:3] == [(502, 506), (506, 510), (510, 512)], "the older fault's window first, followed to its end"
    assert runs[3:6] == [(102, 106), (106, 110), (110, 112)]
    assert runs[6] == (0, 4)
    assert all(end - start <= 4 for start, end in runs)


def test_a_cover_skips_what_the_destination_has_and_restarts_the_cursor() -> None:
    plan = PushPlanner(16, run=8)
    plan.cover(bytes([1] * 4 + [0] * 4 + [1] * 4 + [0] * 4))
    assert drain(plan) == [(4, 8), (12, 16)]
    assert plan.unsent() == 0
    plan.cover(bytes(16))  # a new push session: nothing has arrived
    assert drain(plan) == [(0, 8), (8, 16)]


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300), st.lists(st.integers(0, 299), max_size=20), st.lists(st.booleans(), max_size=300),
       st.integers(1, 16), st.integers(1, 64), st.integers(1, 32))
def test_every_page_is_sent_exactly_once_per_session(pages: int, faults: list[int], present: list[bool],
                                                     prepage: int, after_fault: int, run: int) -> None:
    plan = PushPlanner(pages, prepage=prepage, after_fault=after_fault, run=run)
    cover = bytes(int(p) for p in (present + [False] * pages)[:pages])
    plan.cover(cover)
    sent = [0] * pages
    for i, page in enumerate(p for p in faults if p < pages):
        start, end = plan.demand(page)
        for n in range(start + (1 if cover[page] or sent[page] else 0), end):
            sent[n] += 1
        if not (cover[page] or sent[page]):
            sent[page] += 1
        if i % 2:
            run_ = plan.next_push()
            if run_:
                for n in range(*run_):
                    sent[n] += 1
    for start, end in drain(plan):
        for n in range(start, end):
            sent[n] += 1
    assert all(sent[n] == (0 if cover[n] else 1) for n in range(pages)), "a page sent twice, or never"


def test_a_planner_that_would_never_send_the_demanded_page_cannot_be_made() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        PushPlanner(64, prepage=0)
