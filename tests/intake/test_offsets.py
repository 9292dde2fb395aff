"""PartitionOffsets: the committed position only ever covers the contiguous prefix of finished records."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from webhookd.intake.offsets import PartitionOffsets


def tracking(*offsets: int) -> PartitionOffsets:
    partition = PartitionOffsets()
    for offset in offsets:
        partition.started(offset)
    return partition


def test_nothing_seen_means_nothing_to_commit() -> None:
    partition = PartitionOffsets()

    assert partition.commit_position() is None
    assert partition.needs_commit() is False
    assert partition.in_flight == 0


def test_commit_position_waits_for_the_lowest_unfinished_offset() -> None:
    partition = tracking(0, 1, 2, 3)

    assert partition.commit_position() == 0
    partition.finished(1)
    partition.finished(2)
    assert partition.commit_position() == 0
    partition.finished(0)
    assert partition.commit_position() == 3


def test_out_of_order_finishing_advances_only_over_the_finished_prefix() -> None:
    partition = tracking(10, 11, 12, 13, 14)

    partition.finished(13)
    assert partition.commit_position() == 10
    partition.finished(10)
    assert partition.commit_position() == 11
    partition.finished(12)
    assert partition.commit_position() == 11
    partition.finished(11)
    assert partition.commit_position() == 14
    partition.finished(14)
    assert partition.commit_position() == 15


def test_gaps_between_offsets_are_skipped_over() -> None:
    partition = tracking(0, 1, 5, 9)

    partition.finished(0)
    assert partition.commit_position() == 1
    partition.finished(5)
    assert partition.commit_position() == 1
    partition.finished(1)
    assert partition.commit_position() == 9
    partition.finished(9)
    assert partition.commit_position() == 10


def test_all_finished_commits_one_past_the_highest_offset() -> None:
    partition = tracking(3, 4, 8)
    for offset in (8, 3, 4):
        partition.finished(offset)

    assert partition.commit_position() == 9
    assert partition.in_flight == 0


def test_needs_commit_turns_off_once_the_position_is_committed_and_on_when_it_moves() -> None:
    partition = tracking(0, 1)
    assert partition.needs_commit() is True

    partition.committed = partition.commit_position()
    assert partition.needs_commit() is False

    partition.finished(1)  # behind the unfinished offset 0: the position does not move
    assert partition.needs_commit() is False

    partition.finished(0)
    assert partition.commit_position() == 2
    assert partition.needs_commit() is True
    partition.committed = 2
    assert partition.needs_commit() is False


def test_in_flight_counts_started_records_not_yet_finished() -> None:
    partition = tracking(0, 1, 2, 7)
    assert partition.in_flight == 4

    partition.finished(2)
    assert partition.in_flight == 3
    partition.finished(0)
    assert partition.in_flight == 2
    partition.finished(7)
    assert partition.in_flight == 1
    partition.finished(1)
    assert partition.in_flight == 0


@st.composite
def offsets_and_finishing_order(draw: st.DrawFn) -> tuple[list[int], list[int]]:
    first = draw(st.integers(min_value=0, max_value=10**12))
    steps = draw(st.lists(st.integers(min_value=1, max_value=20), min_size=1, max_size=60))
    offsets = [first]
    for step in steps[1:]:
        offsets.append(offsets[-1] + step)
    order = draw(st.permutations(offsets))
    return offsets, list(order)


@given(offsets_and_finishing_order())
def test_commit_position_is_always_the_smallest_unfinished_offset(case: tuple[list[int], list[int]]) -> None:
    offsets, order = case
    partition = tracking(*offsets)
    unfinished = set(offsets)

    for offset in order:
        partition.finished(offset)
        unfinished.discard(offset)
        expected = min(unfinished) if unfinished else offsets[-1] + 1
        position = partition.commit_position()
        assert position == expected
        assert position is not None
        assert position <= expected
        assert all(o >= position for o in unfinished)
        assert partition.in_flight == len(unfinished)


@given(offsets_and_finishing_order(), st.data())
def test_commit_position_never_passes_an_unfinished_offset_while_records_keep_arriving(
    case: tuple[list[int], list[int]], data: st.DataObject
) -> None:
    offsets, _ = case
    partition = PartitionOffsets()
    next_index = 0
    unfinished: list[int] = []

    while next_index < len(offsets) or unfinished:
        if next_index < len(offsets) and (not unfinished or data.draw(st.booleans())):
            partition.started(offsets[next_index])
            unfinished.append(offsets[next_index])
            next_index += 1
        else:
            offset = unfinished.pop(data.draw(st.integers(min_value=0, max_value=len(unfinished) - 1)))
            partition.finished(offset)
        expected = min(unfinished) if unfinished else offsets[next_index - 1] + 1
        assert partition.commit_position() == expected
        assert partition.in_flight == len(unfinished)
