"""Slab allocation and size parsing, including a model check of the allocator."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memserver.slabs import (
    DEFAULT_SLAB_SIZE,
    PoolExhaustedError,
    SlabAllocator,
    check_slab_size,
    format_size,
    parse_size,
    slab_runs,
)

MiB = 1 << 20
GiB = 1 << 30


def test_default_slab_size_is_16_mib() -> None:
    assert format_size(DEFAULT_SLAB_SIZE) == "16 MiB"
    assert check_slab_size(DEFAULT_SLAB_SIZE) == DEFAULT_SLAB_SIZE


@pytest.mark.parametrize("size", [2 * MiB, 4 * MiB, 64 * MiB, GiB])
def test_slab_sizes_that_are_powers_of_two_from_2_mib_are_accepted(size: int) -> None:
    assert check_slab_size(size) == size


@pytest.mark.parametrize("size", [0, -2 * MiB, MiB, 3 * MiB, 2 * MiB + 4096, 24 * MiB])
def test_other_slab_sizes_are_refused(size: int) -> None:
    with pytest.raises(ValueError, match="power of two of at least 2 MiB"):
        check_slab_size(size)
    with pytest.raises(ValueError, match="power of two"):
        SlabAllocator(8, size)


def test_allocator_refuses_an_empty_arena() -> None:
    with pytest.raises(ValueError, match="at least one slab, got 0"):
        SlabAllocator(0)


def test_first_allocations_are_contiguous_and_counted() -> None:
    pool = SlabAllocator(16)
    assert pool.allocate(4) == [0, 1, 2, 3]
    assert pool.allocate(3) == [4, 5, 6]
    assert (pool.total_slabs, pool.used_slabs, pool.free_slabs) == (16, 7, 9)
    assert pool.slab_size == DEFAULT_SLAB_SIZE


def test_best_fit_picks_the_smallest_free_run_that_fits() -> None:
    pool = SlabAllocator(16)
    pool.allocate(4)  # 0-3
    middle = pool.allocate(2)  # 4-5
    pool.allocate(4)  # 6-9, leaving 10-15 free
    pool.free(middle)
    # Free runs: 4-5 (2 slabs) and 10-15 (6 slabs).
    assert pool.allocate(2) == [4, 5]
    assert pool.allocate(3) == [10, 11, 12]
    assert pool.free_slabs == 3


def test_fragmented_pool_fills_from_the_largest_runs_first() -> None:
    pool = SlabAllocator(10)
    singles = [pool.allocate(1)[0] for _ in range(10)]
    assert singles == list(range(10))
    pool.free([1, 2, 4, 7, 8, 9])
    # Free runs: 1-2, 4, 7-9; none holds five slabs.
    assert pool.allocate(5) == [7, 8, 9, 1, 2]
    assert pool.free_slabs == 1
    assert pool.allocate(1) == [4]


def test_exhaustion_says_what_was_asked_and_what_is_free() -> None:
    pool = SlabAllocator(10, 16 * MiB)
    pool.allocate(6)
    with pytest.raises(PoolExhaustedError) as caught:
        pool.allocate(6)
    error = caught.value
    assert "asked for 96 MiB (6 slabs) but only 64 MiB (4 slabs) is free" in str(error)
    assert (error.requested_slabs, error.free_slabs) == (6, 4)
    assert (error.requested_bytes, error.free_bytes) == (96 * MiB, 64 * MiB)
    assert pool.free_slabs == 4  # the failed request took nothing


def test_exhaustion_message_uses_the_singular_for_one_slab() -> None:
    pool = SlabAllocator(2, 2 * MiB)
    pool.allocate(1)
    with pytest.raises(
        PoolExhaustedError, match=r"4 MiB \(2 slabs\) but only 2 MiB \(1 slab\)"
    ):
        pool.allocate(2)


@pytest.mark.parametrize("count", [0, -1])
def test_allocate_refuses_non_positive_counts(count: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        SlabAllocator(4).allocate(count)


def test_double_free_and_bad_slabs_are_refused_without_changing_anything() -> None:
    pool = SlabAllocator(8)
    taken = pool.allocate(4)
    pool.free(taken[:2])
    with pytest.raises(ValueError, match=r"slab 0 is not allocated \(double free\?\)"):
        pool.free([0])
    with pytest.raises(ValueError, match="slab 3 is listed twice"):
        pool.free([3, 2, 3])
    with pytest.raises(ValueError, match="slab 8 does not exist"):
        pool.free([2, 8])
    with pytest.raises(ValueError, match="slab -1 does not exist"):
        pool.free([-1])
    # A partly bad request frees none of its good slabs.
    with pytest.raises(ValueError, match="slab 5 is not allocated"):
        pool.free([2, 3, 5])
    assert pool.used_slabs == 2
    pool.free([2, 3])
    assert pool.used_slabs == 0


def test_freed_neighbours_merge_back_into_one_run() -> None:
    pool = SlabAllocator(12)
    a, b, c = pool.allocate(4), pool.allocate(4), pool.allocate(4)
    pool.free(b)
    pool.free(a)
    pool.free(c)
    assert pool.allocate(12) == list(range(12))


@settings(max_examples=200, deadline=None)
@given(
    total=st.integers(min_value=1, max_value=40),
    steps=st.lists(
        st.tuples(st.booleans(), st.integers(min_value=1, max_value=12)), max_size=60
    ),
)
def test_allocator_agrees_with_a_simple_model(
    total: int, steps: list[tuple[bool, int]]
) -> None:
    """Random allocate/free sequences against a set-based model of free slabs."""
    pool = SlabAllocator(total, 2 * MiB)
    free = set(range(total))
    held: list[list[int]] = []
    for do_allocate, number in steps:
        if do_allocate or not held:
            if number > len(free):
                with pytest.raises(PoolExhaustedError):
                    pool.allocate(number)
                continue
            slabs = pool.allocate(number)
            assert len(slabs) == number == len(set(slabs))
            assert set(slabs) <= free
            fitting = _model_runs_at_least(free, number)
            if fitting:
                # A run long enough existed: the result is one run, the best fit.
                assert slabs == list(range(slabs[0], slabs[0] + number))
                assert _model_run_length(free, slabs[0]) == min(fitting)
            free -= set(slabs)
            held.append(slabs)
        else:
            pool.free(held.pop(number % len(held)))
            free = set(range(total)) - {slab for slabs in held for slab in slabs}
        assert pool.free_slabs == len(free)
        assert pool.used_slabs == total - len(free)


def _model_runs_at_least(free: set[int], number: int) -> list[int]:
    lengths = []
    for slab in free:
        if slab - 1 not in free:
            length = _model_run_length(free, slab)
            if length >= number:
                lengths.append(length)
    return lengths


def _model_run_length(free: set[int], first: int) -> int:
    length = 0
    while first + length in free:
        length += 1
    return length


def test_slab_runs_merge_neighbours_in_export_order() -> None:
    s = 16 * MiB
    assert slab_runs([3, 4, 5, 1, 2, 8], s) == [(3 * s, 3 * s), (s, 2 * s), (8 * s, s)]
    assert slab_runs([5, 4], s) == [(5 * s, s), (4 * s, s)]
    assert slab_runs([0], s) == [(0, s)]
    assert slab_runs([], s) == []
    with pytest.raises(ValueError, match="must not be negative"):
        slab_runs([1, -1], s)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        ("0", 0),
        ("512M", 512 * MiB),
        ("512m", 512 * MiB),
        ("64MiB", 64 * MiB),
        ("64 MiB", 64 * MiB),
        ("16MB", 16 * MiB),
        ("1G", GiB),
        ("4g", 4 * GiB),
        ("1.5G", 3 * GiB // 2),
        ("2T", 2 << 40),
        ("8K", 8192),
        ("100B", 100),
        ("  2G  ", 2 * GiB),
    ],
)
def test_parse_size_accepts_common_spellings(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text", ["", "G", "-1G", "1X", "1GG", "1 G B", "1iB", "ten", "1,5G"]
)
def test_parse_size_explains_bad_input(text: str) -> None:
    with pytest.raises(ValueError, match="size must be like 512M, 4G or a byte count"):
        parse_size(text)


def test_parse_size_refuses_fractions_of_a_byte() -> None:
    with pytest.raises(ValueError, match="not a whole number of bytes"):
        parse_size("0.3K")


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1 KiB"),
        (1536, "1.5 KiB"),
        (16 * MiB, "16 MiB"),
        (96 * MiB, "96 MiB"),
        (GiB + GiB // 4, "1.25 GiB"),
        (3 << 40, "3 TiB"),
        (-2 * MiB, "-2 MiB"),
    ],
)
def test_format_size_uses_iec_units(size: int, text: str) -> None:
    assert format_size(size) == text


@given(st.integers(min_value=0, max_value=1023), st.integers(min_value=0, max_value=5))
def test_format_then_parse_is_exact_for_whole_units(number: int, exponent: int) -> None:
    size = number * 1024**exponent
    assert parse_size(format_size(size)) == size


@given(st.integers(min_value=1024, max_value=1 << 60))
def test_format_size_rounds_to_within_half_a_percent_of_a_unit(size: int) -> None:
    text = format_size(size)
    number, unit = text.split()
    unit_bytes = parse_size("1" + unit)
    assert 1 <= float(number) <= 1024
    assert abs(float(number) * unit_bytes - size) <= unit_bytes * 0.005
