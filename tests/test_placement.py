"""Striping arithmetic and replica placement, checked against brute-force models."""

from __future__ import annotations

import functools
import itertools
import random
from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctl.placement import default_extent_count, layout_extents, map_range, place
from ctl.registry.errors import InsufficientCapacityError, RegistryError
from ctl.registry.model import (
    SERVER_ACTIVE,
    SERVER_DRAINING,
    Server,
    reserved_bytes,
)

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
SLAB = 16 * MiB


# Brute-force models: follow one byte at a time from the definition of the
# layout (stripe s goes to extent s % N at offset (s // N) * unit).


def byte_home(byte: int, unit: int, extents: int) -> tuple[int, int]:
    stripe = byte // unit
    return stripe % extents, (stripe // extents) * unit + byte % unit


def model_extent_sizes(size: int, unit: int, extents: int) -> list[int]:
    """Whole stripe units each extent needs to hold every byte sent to it."""
    highest = [-1] * extents
    for byte in range(size):
        extent, offset = byte_home(byte, unit, extents)
        highest[extent] = max(highest[extent], offset)
    return [-(-(top + 1) // unit) * unit for top in highest]


def model_pieces(
    offset: int, length: int, unit: int, extents: int
) -> list[tuple[int, int, int, int]]:
    """Bytes of the range in order, glued while they stay contiguous in one extent."""
    pieces: list[list[int]] = []
    for byte in range(offset, offset + length):
        extent, where = byte_home(byte, unit, extents)
        last = pieces[-1] if pieces else None
        if last and last[0] == extent and last[1] + last[2] == where:
            last[2] += 1
        else:
            pieces.append([extent, where, 1, byte])
    return [(e, o, n, v) for e, o, n, v in pieces]


# layout_extents


@settings(max_examples=60, deadline=None)
@given(
    pages=st.integers(1, 24),
    unit_shift=st.integers(0, 2),
    extents=st.integers(1, 24),
)
def test_layout_matches_the_byte_model(
    pages: int, unit_shift: int, extents: int
) -> None:
    size, unit = pages * 4096, 4096 << unit_shift
    stripes = -(-size // unit)
    extents = min(extents, stripes)
    sizes = layout_extents(size, unit, extents)
    assert sizes == model_extent_sizes(size, unit, extents)
    assert all(s % unit == 0 and s > 0 for s in sizes)
    assert max(sizes) - min(sizes) <= unit


def test_layout_of_even_and_uneven_stripes() -> None:
    assert layout_extents(GiB, 64 * KiB, 4) == [256 * MiB] * 4
    # 10 stripes over 4 extents: extents 0 and 1 take the last two.
    assert layout_extents(640 * KiB, 64 * KiB, 4) == [192 * KiB] * 2 + [128 * KiB] * 2
    # A final partial stripe still takes a whole unit on its extent.
    assert layout_extents(68 * KiB, 64 * KiB, 2) == [64 * KiB, 64 * KiB]
    assert layout_extents(4096, 4096, 1) == [4096]


@pytest.mark.parametrize(
    ("size", "unit", "extents", "message"),
    [
        (0, 4096, 1, "volume size 0 is not a positive multiple of 4096"),
        (-4096, 4096, 1, "volume size -4096 is not a positive multiple of 4096"),
        (4097, 4096, 1, "volume size 4097 is not a positive multiple of 4096"),
        (MiB, 2048, 1, "stripe unit 2048 is not a power of two of at least 4096"),
        (MiB, 12288, 1, "stripe unit 12288 is not a power of two of at least 4096"),
        (MiB, 0, 1, "stripe unit 0 is not a power of two"),
        (MiB, 4096, 0, "a volume needs at least 1 extent, not 0"),
        (MiB, 4096, -3, "a volume needs at least 1 extent, not -3"),
        (
            128 * KiB,
            64 * KiB,
            3,
            "a 128 KiB volume has only 2 stripe units of 64 KiB, too few for 3 "
            "extents: use at most 2 extents or a smaller stripe unit",
        ),
        (
            4096,
            64 * KiB,
            2,
            "a 4 KiB volume has only 1 stripe unit of 64 KiB, too few for 2 extents",
        ),
    ],
)
def test_layout_refuses_bad_geometry(
    size: int, unit: int, extents: int, message: str
) -> None:
    with pytest.raises(ValueError) as caught:
        layout_extents(size, unit, extents)
    assert message in str(caught.value)


# map_range


@settings(max_examples=150, deadline=None)
@given(
    unit_shift=st.integers(0, 6),
    extents=st.integers(1, 9),
    offset=st.integers(0, 5000),
    length=st.integers(0, 3000),
)
def test_map_range_matches_the_byte_model_over_many_stripes(
    unit_shift: int, extents: int, offset: int, length: int
) -> None:
    # Units of 1 to 64 bytes let one range cross hundreds of stripes while the
    # model still walks every byte; the arithmetic does not depend on scale.
    unit = 1 << unit_shift
    assert map_range(offset, length, unit, extents) == model_pieces(
        offset, length, unit, extents
    )


@settings(max_examples=40, deadline=None)
@given(
    unit_shift=st.integers(0, 1),
    extents=st.integers(1, 6),
    stripe=st.integers(0, 1 << 28),
    within=st.integers(0, 8191),
    length=st.integers(0, 20000),
)
def test_map_range_matches_the_byte_model_at_real_units_and_offsets(
    unit_shift: int, extents: int, stripe: int, within: int, length: int
) -> None:
    unit = 4096 << unit_shift
    offset = stripe * unit + within % unit  # up to a TiB into the volume
    assert map_range(offset, length, unit, extents) == model_pieces(
        offset, length, unit, extents
    )


@settings(max_examples=150, deadline=None)
@given(
    pages=st.integers(1, 4096),
    unit_shift=st.integers(0, 6),
    extents=st.integers(1, 16),
    start=st.floats(0, 1),
    beyond=st.integers(-3 * 4096, 3 * 4096),
)
def test_ranges_up_to_the_volume_end_stay_inside_the_extents(
    pages: int, unit_shift: int, extents: int, start: float, beyond: int
) -> None:
    size, unit = pages * 4096, 4096 << unit_shift
    stripes = -(-size // unit)
    extents = min(extents, stripes)
    sizes = layout_extents(size, unit, extents)
    # Ranges of at least a byte end near the volume's end: before it, on it
    # or past it.
    end = max(1, size + beyond)
    offset = min(int(start * end), end - 1)
    pieces = map_range(offset, end - offset, unit, extents)

    assert sum(piece[2] for piece in pieces) == end - offset
    inside = all(o + n <= sizes[e] for e, o, n, _ in pieces)
    # The extents hold exactly the volume rounded up to a whole stripe: a
    # range fits in them if and only if it ends within that.
    assert inside == (end <= stripes * unit)
    if end <= size:
        assert inside


def test_whole_volume_covers_every_extent_byte_once() -> None:
    size, unit, extents = 10 * 64 * KiB + 8192, 64 * KiB, 4
    sizes = layout_extents(size, unit, extents)
    covered: dict[int, list[tuple[int, int]]] = {e: [] for e in range(extents)}
    whole_stripes = -(-size // unit) * unit
    for extent, offset, length, _ in map_range(0, whole_stripes, unit, extents):
        covered[extent].append((offset, offset + length))
    for extent, spans in covered.items():
        spans.sort()
        assert spans[0][0] == 0
        assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
        assert spans[-1][1] == sizes[extent]


def test_map_range_on_one_extent_is_one_piece() -> None:
    assert map_range(5 * MiB + 17, 3 * MiB, 64 * KiB, 1) == [
        (0, 5 * MiB + 17, 3 * MiB, 5 * MiB + 17)
    ]
    assert map_range(123, 0, 64 * KiB, 1) == []
    assert map_range(123, 0, 64 * KiB, 3) == []


def test_map_range_splits_at_stripe_boundaries() -> None:
    unit = 64 * KiB
    # Starts 4 KiB before the end of stripe 5 (extent 1, row 1) and runs into
    # stripe 7 (extent 0, row 2).
    assert map_range(6 * unit - 4096, unit + 8192, unit, 3) == [
        (2, unit + unit - 4096, 4096, 6 * unit - 4096),
        (0, 2 * unit, unit, 6 * unit),
        (1, 2 * unit, 4096, 7 * unit),
    ]


@pytest.mark.parametrize(
    ("offset", "length", "unit", "extents", "message"),
    [
        (-1, 10, 4096, 2, "bad range: offset -1, length 10"),
        (0, -5, 4096, 2, "bad range: offset 0, length -5"),
        (0, 10, 0, 2, "stripe unit 0 is not a power of two"),
        (0, 10, 3000, 2, "stripe unit 3000 is not a power of two"),
        (0, 10, 4096, 0, "a volume needs at least 1 extent, not 0"),
    ],
)
def test_map_range_refuses_bad_arguments(
    offset: int, length: int, unit: int, extents: int, message: str
) -> None:
    with pytest.raises(ValueError) as caught:
        map_range(offset, length, unit, extents)
    assert str(caught.value) == message


# default_extent_count


def server(
    name: str,
    free: int,
    zone: str | None = None,
    *,
    slab: int = SLAB,
    reserved: int = 0,
    state: str = SERVER_ACTIVE,
) -> Server:
    return Server(
        name=name,
        control_url=f"http://127.0.0.1:1/{name}",
        nbd_address="127.0.0.1:10809",
        capacity=free + reserved,
        slab_size=slab,
        zone=zone,
        state=state,
        reserved=reserved,
    )


def pool_of(count: int, free: int = GiB) -> list[Server]:
    return [server(f"ms{i}", free) for i in range(1, count + 1)]


def test_default_extent_count_is_one_per_group_of_replicas() -> None:
    assert default_extent_count(GiB, 64 * KiB, 2, pool_of(6)) == 3
    assert default_extent_count(GiB, 64 * KiB, 2, pool_of(7)) == 3
    assert default_extent_count(GiB, 64 * KiB, 3, pool_of(6)) == 2
    assert default_extent_count(GiB, 64 * KiB, 1, pool_of(5)) == 5


def test_default_extent_count_counts_only_active_servers() -> None:
    draining = [server(f"old{i}", GiB, state=SERVER_DRAINING) for i in (1, 2)]
    assert default_extent_count(GiB, 64 * KiB, 2, [*pool_of(4), *draining]) == 2


def test_default_extent_count_is_at_least_one() -> None:
    assert default_extent_count(GiB, 64 * KiB, 3, pool_of(2)) == 1
    assert default_extent_count(GiB, 64 * KiB, 2, []) == 1


def test_default_extent_count_never_exceeds_the_stripe_units() -> None:
    assert default_extent_count(128 * KiB, 64 * KiB, 1, pool_of(10)) == 2
    # 68 KiB is one whole stripe and a partial one: two units.
    assert default_extent_count(68 * KiB, 64 * KiB, 1, pool_of(10)) == 2
    assert default_extent_count(4096, 64 * KiB, 1, pool_of(10)) == 1


def test_default_extent_count_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="at least 1 replica, not 0"):
        default_extent_count(GiB, 64 * KiB, 0, pool_of(3))
    with pytest.raises(ValueError, match="volume size 100 is not a positive multiple"):
        default_extent_count(100, 64 * KiB, 1, pool_of(3))
    with pytest.raises(ValueError, match="stripe unit 1000 is not a power of two"):
        default_extent_count(GiB, 1000, 1, pool_of(3))


# place: invariants over random pools


def zone_key(s: Server) -> str:
    return s.zone if s.zone is not None else "\0" + s.name


def check_placement(
    placement: list[list[str]],
    extent_sizes: Sequence[int],
    replicas: int,
    servers: Sequence[Server],
) -> None:
    """Every rule of placement, checked from the outside."""
    by_name = {s.name: s for s in servers}
    active = [s for s in servers if s.state == SERVER_ACTIVE]
    by_zone = len({zone_key(s) for s in active}) >= replicas
    assert len(placement) == len(extent_sizes)
    used: Counter[str] = Counter()
    for names, size in zip(placement, extent_sizes, strict=True):
        assert len(names) == replicas
        assert len(set(names)) == replicas, names
        assert all(by_name[n].state == SERVER_ACTIVE for n in names)
        if by_zone:
            assert len({zone_key(by_name[n]) for n in names}) == replicas, names
        for n in names:
            used[n] += reserved_bytes(size, by_name[n].slab_size)
    for name, total in used.items():
        assert total <= by_name[name].free, (name, total, by_name[name].free)


def feasible(extent_sizes: Sequence[int], replicas: int, servers: list[Server]) -> bool:
    """Whether any placement at all exists: tries every combination."""
    active = [s for s in servers if s.state == SERVER_ACTIVE]
    labelled = any(s.zone is not None for s in active)
    by_zone = labelled and len({zone_key(s) for s in active}) >= replicas
    groups = [
        group
        for group in itertools.combinations(range(len(active)), replicas)
        if not by_zone or len({zone_key(active[i]) for i in group}) == replicas
    ]

    @functools.cache
    def search(index: int, left: tuple[int, ...]) -> bool:
        if index == len(extent_sizes):
            return True
        need = [reserved_bytes(extent_sizes[index], s.slab_size) for s in active]
        for group in groups:
            if all(left[i] >= need[i] for i in group):
                after = list(left)
                for i in group:
                    after[i] -= need[i]
                if search(index + 1, tuple(after)):
                    return True
        return False

    return search(0, tuple(s.free for s in active))


@st.composite
def pools(draw: st.DrawFn, max_servers: int = 7) -> list[Server]:
    count = draw(st.integers(1, max_servers))
    servers = []
    for i in range(count):
        slab = draw(st.sampled_from([2 * MiB, SLAB]))
        capacity = draw(st.integers(0, 12)) * SLAB
        reserved = draw(st.integers(0, capacity // slab)) * slab
        servers.append(
            Server(
                name=f"ms{i}",
                control_url=f"http://127.0.0.1:1/ms{i}",
                nbd_address="127.0.0.1:10809",
                capacity=capacity,
                slab_size=slab,
                zone=draw(st.sampled_from([None, "a", "b", "c"])),
                state=draw(st.sampled_from([SERVER_ACTIVE] * 4 + [SERVER_DRAINING])),
                reserved=reserved,
            )
        )
    return servers


@settings(max_examples=300, deadline=None)
@given(
    servers=pools(),
    pages=st.integers(1, 12 * 4096),
    unit_shift=st.integers(0, 10),
    extents=st.integers(1, 6),
    replicas=st.integers(1, 4),
    seed=st.integers(0, 2**32),
)
def test_placements_keep_every_rule_on_random_pools(
    servers: list[Server],
    pages: int,
    unit_shift: int,
    extents: int,
    replicas: int,
    seed: int,
) -> None:
    size, unit = pages * 4096, 4096 << unit_shift
    sizes = layout_extents(size, unit, min(extents, -(-size // unit)))
    try:
        placement = place(sizes, replicas, servers, random.Random(seed))
    except InsufficientCapacityError as error:
        message = str(error)
        assert message.startswith(
            (
                "cannot place ",
                f"replicas must be on {replicas} distinct servers",
                "a replica needs an active server",
            )
        ), message
        active = {s.name: s for s in servers if s.state == SERVER_ACTIVE}
        for name, short in error.missing.items():
            # Short of room for one extent, by no more than that extent needs.
            assert 0 < short <= reserved_bytes(max(sizes), active[name].slab_size)
            assert f"{name} " in message or " more)" in message
    else:
        check_placement(placement, sizes, replicas, servers)


@st.composite
def tight_pools(draw: st.DrawFn, extent: int) -> list[Server]:
    """Pools where each server holds a few extents at most: placement is tight."""
    servers = []
    for i in range(draw(st.integers(1, 6))):
        slab = draw(st.sampled_from([2 * MiB, SLAB]))
        need = reserved_bytes(extent, slab)
        free = (
            draw(st.integers(0, 4)) * need
            + draw(st.integers(0, need // slab - 1)) * slab
        )
        servers.append(
            server(
                f"ms{i}",
                free,
                draw(st.sampled_from([None, "a", "b", "c"])),
                slab=slab,
                state=draw(st.sampled_from([SERVER_ACTIVE] * 5 + [SERVER_DRAINING])),
            )
        )
    return servers


@settings(max_examples=400, deadline=None)
@given(
    data=st.data(),
    extent=st.sampled_from([SLAB, 20 * MiB, 64 * MiB]),
    extents=st.integers(1, 5),
    replicas=st.integers(1, 3),
    seed=st.integers(0, 2**32),
)
def test_equal_extents_fail_only_when_no_placement_exists(
    data: st.DataObject, extent: int, extents: int, replicas: int, seed: int
) -> None:
    servers = data.draw(tight_pools(extent))
    sizes = [extent] * extents
    possible = feasible(sizes, replicas, servers)
    try:
        placement = place(sizes, replicas, servers, random.Random(seed))
    except InsufficientCapacityError:
        assert not possible
    else:
        check_placement(placement, sizes, replicas, servers)
        assert possible


# place: the rules on chosen pools


def test_replicas_go_to_distinct_zones_when_there_are_enough() -> None:
    servers = [
        server(f"{zone}{i}", GiB, zone) for zone in ("a", "b", "c") for i in (1, 2)
    ]
    for seed in range(50):
        placement = place([64 * MiB] * 4, 3, servers, random.Random(seed))
        for names in placement:
            assert sorted(name[0] for name in names) == ["a", "b", "c"]


def test_a_server_without_a_zone_is_a_zone_of_its_own() -> None:
    servers = [server("a1", GiB, "a"), server("a2", GiB, "a")]
    servers += [server("loose1", GiB), server("loose2", GiB)]
    for seed in range(50):
        for names in place([SLAB] * 3, 3, servers, random.Random(seed)):
            # Three zones: a, loose1, loose2; so both loose servers every time.
            assert {"loose1", "loose2"} < set(names)
            assert len([n for n in names if n.startswith("a")]) == 1


def test_too_few_zones_fall_back_to_distinct_servers() -> None:
    servers = [server(f"a{i}", GiB, "a") for i in (1, 2, 3)] + [server("b1", GiB, "b")]
    seen: set[tuple[str, ...]] = set()
    for seed in range(50):
        placement = place([SLAB] * 2, 3, servers, random.Random(seed))
        check_placement(placement, [SLAB] * 2, 3, servers)
        seen.update(tuple(sorted(names)) for names in placement)
    # Some extents sit in zone a alone: zones were not required.
    assert ("a1", "a2", "a3") in seen


def test_draining_servers_take_nothing() -> None:
    servers = [*pool_of(3), server("ms9", 100 * GiB, state=SERVER_DRAINING)]
    for seed in range(30):
        placement = place([SLAB] * 5, 2, servers, random.Random(seed))
        assert all("ms9" not in names for names in placement)


def test_later_extents_see_what_earlier_ones_took() -> None:
    # Each server holds two 64 MiB extents; three replicas of two extents fit,
    # the whole pool, and a third extent does not.
    servers = pool_of(3, free=128 * MiB)
    placement = place([64 * MiB] * 2, 3, servers, random.Random(1))
    assert [sorted(names) for names in placement] == [["ms1", "ms2", "ms3"]] * 2
    with pytest.raises(InsufficientCapacityError):
        place([64 * MiB] * 3, 3, servers, random.Random(1))


def test_slab_rounding_is_counted() -> None:
    # A 20 MiB extent takes two 16 MiB slabs: 32 MiB, so 48 MiB holds one.
    servers = [server("ms1", 48 * MiB), server("ms2", 64 * MiB)]
    assert place([20 * MiB] * 2, 1, servers, random.Random(3)) in (
        [["ms1"], ["ms2"]],
        [["ms2"], ["ms1"]],
    )
    with pytest.raises(InsufficientCapacityError):
        place([20 * MiB] * 4, 1, servers, random.Random(3))


def test_a_tight_pool_is_still_placed_whatever_the_draws() -> None:
    # Every extent must use the big server; random draws that skip it early
    # would strand the last extent, so placement has to recover.
    servers = [server("big", 3 * SLAB)] + [server(f"small{i}", SLAB) for i in (1, 2, 3)]
    for seed in range(100):
        placement = place([SLAB] * 3, 2, servers, random.Random(seed))
        check_placement(placement, [SLAB] * 3, 2, servers)
        assert all("big" in names for names in placement)


def test_a_tight_zone_is_spent_before_roomier_looking_servers() -> None:
    # Both extents need zone a, whose two servers hold one extent each; b1 and
    # c1 have more bytes free but room for one extent each too.  Taking b1
    # and c1 for the first extent (the emptiest servers, and first by name)
    # would leave the second only zone a.
    servers = [
        server("z1", 64 * MiB, "a"),
        server("z2", 64 * MiB, "a"),
        server("b1", 96 * MiB, "b"),
        server("c1", 96 * MiB, "c"),
    ]
    for seed in range(100):
        placement = place([64 * MiB] * 2, 2, servers, random.Random(seed))
        check_placement(placement, [64 * MiB] * 2, 2, servers)
        assert sorted(n for names in placement for n in names if n[0] == "z") == [
            "z1",
            "z2",
        ]


def test_the_same_seed_gives_the_same_placement() -> None:
    servers = pool_of(12)
    runs = {
        str(place([SLAB] * 8, 2, servers, random.Random(seed))) for seed in (7, 7, 7)
    }
    assert len(runs) == 1
    others = {str(place([SLAB] * 8, 2, servers, random.Random(s))) for s in range(20)}
    assert len(others) > 1
    # Without an rng it still follows the rules.
    check_placement(place([SLAB] * 8, 2, servers), [SLAB] * 8, 2, servers)


# place: balance


def uniform_choice(
    extent: int, replicas: int, servers: list[Server], rng: random.Random
) -> list[str]:
    """The baseline: any servers with room, equally likely."""
    roomy = [s for s in servers if s.free >= reserved_bytes(extent, s.slab_size)]
    return [s.name for s in rng.sample(roomy, replicas)]


def fill(
    servers: list[Server],
    volumes: int,
    chooser: str,
    rng: random.Random,
) -> Counter[str]:
    """Place ``volumes`` one-slab, two-replica volumes, reserving as we go."""
    by_name = {s.name: s for s in servers}
    got: Counter[str] = Counter()
    for _ in range(volumes):
        if chooser == "place":
            names = place([SLAB], 2, servers, rng)[0]
        else:
            names = uniform_choice(SLAB, 2, servers, rng)
        for name in names:
            by_name[name].reserved += SLAB
            got[name] += 1
    return got


def test_two_choices_spread_load_more_evenly_than_uniform_random() -> None:
    spreads = {}
    for chooser in ("place", "uniform"):
        servers = pool_of(20, free=1000 * SLAB)
        fill(servers, 2000, chooser, random.Random(11))
        reserved = [s.reserved // SLAB for s in servers]
        spreads[chooser] = max(reserved) - min(reserved)
    # Each server ends with about 200 slabs; random choice scatters that by
    # tens, two choices by a handful.
    assert spreads["place"] * 4 <= spreads["uniform"], spreads
    assert spreads["place"] <= 8, spreads


def test_emptier_servers_are_chosen_more_often() -> None:
    counts = {}
    for chooser in ("place", "uniform"):
        full = [server(f"full{i}", 40 * SLAB, reserved=80 * SLAB) for i in range(5)]
        empty = [server(f"empty{i}", 100 * SLAB) for i in range(5)]
        got = fill(full + empty, 150, chooser, random.Random(5))
        counts[chooser] = sum(got[s.name] for s in empty)
    # 300 replicas, and room for all of them on either half.  Uniform gives
    # the empty half about 150; two choices lose to a fuller server only when
    # both draws are fuller ones (2 in 9).
    assert counts["place"] >= 210, counts
    assert counts["uniform"] <= 180, counts


# place: errors


def test_too_few_active_servers() -> None:
    servers = [*pool_of(2), server("ms3", GiB, state=SERVER_DRAINING)]
    with pytest.raises(InsufficientCapacityError) as caught:
        place([64 * MiB], 3, servers)
    assert str(caught.value) == (
        "replicas must be on 3 distinct servers but only 2 are active "
        "(ms3 is draining); add memservers or ask for fewer replicas"
    )
    assert caught.value.missing == {}
    assert isinstance(caught.value, RegistryError)


def test_no_active_server_at_all() -> None:
    with pytest.raises(InsufficientCapacityError) as caught:
        place([64 * MiB], 1, [])
    assert str(caught.value) == (
        "a replica needs an active server but none is active; "
        "add memservers or ask for fewer replicas"
    )
    with pytest.raises(InsufficientCapacityError, match="only 1 is active"):
        place([64 * MiB], 2, pool_of(1))


def test_short_of_space_names_each_server_and_the_shortfall() -> None:
    servers = [
        server("ms1", 128 * MiB),
        server("ms2", 96 * MiB, reserved=32 * MiB),
        server("ms3", 16 * MiB, reserved=240 * MiB),
    ]
    with pytest.raises(InsufficientCapacityError) as caught:
        place([64 * MiB], 3, servers, random.Random(0))
    assert str(caught.value) == (
        "cannot place 3 replicas of a 64 MiB extent: only 2 active servers have "
        "64 MiB free (ms1: 128 MiB, ms2: 96 MiB; ms3 has 16 MiB free, short by "
        "48 MiB); add a memserver, free space on one of these, or use fewer replicas"
    )
    assert caught.value.missing == {"ms3": 48 * MiB}


def test_short_of_space_on_a_later_extent_says_after_which_extents() -> None:
    servers = pool_of(3, free=128 * MiB)
    with pytest.raises(InsufficientCapacityError) as caught:
        place([64 * MiB] * 3, 3, servers, random.Random(0))
    assert str(caught.value) == (
        "cannot place 3 replicas of extent 2 of 3 (64 MiB): after extents 0-1, "
        "no active server has 64 MiB free (ms1 has 0 B free, short by 64 MiB; "
        "ms2 has 0 B free, short by 64 MiB; ms3 has 0 B free, short by 64 MiB); "
        "add a memserver, free space on one of these, or use fewer replicas"
    )
    assert caught.value.missing == {f"ms{i}": 64 * MiB for i in (1, 2, 3)}

    servers = [server("ms1", 128 * MiB), server("ms2", 64 * MiB)]
    with pytest.raises(InsufficientCapacityError) as caught:
        place([64 * MiB] * 2, 2, servers, random.Random(0))
    assert str(caught.value).startswith(
        "cannot place 2 replicas of extent 1 of 2 (64 MiB): after extent 0, "
        "only 1 active server has 64 MiB free (ms1: 64 MiB; ms2 has 0 B free, "
        "short by 64 MiB)"
    )
    assert caught.value.missing == {"ms2": 64 * MiB}


def test_short_of_space_in_zones_names_the_zones_that_lack_it() -> None:
    servers = [
        server("a1", GiB, "a"),
        server("a2", GiB, "a"),
        server("b1", 64 * MiB, "b"),
        server("c1", 16 * MiB, "c"),
        server("c2", 32 * MiB, "c"),
        server("b2", 0, "b"),
    ]
    with pytest.raises(InsufficientCapacityError) as caught:
        place([64 * MiB], 3, servers, random.Random(0))
    # Zone a could take two replicas, but three zones exist: they must differ.
    assert str(caught.value) == (
        "cannot place 3 replicas of a 64 MiB extent in 3 distinct zones: only 2 "
        "zones have a server with 64 MiB free (a1 (zone a): 1 GiB, a2 (zone a): "
        "1 GiB, b1 (zone b): 64 MiB; c1 (zone c) has 16 MiB free, short by 48 MiB; "
        "c2 (zone c) has 32 MiB free, short by 32 MiB); add a memserver in another "
        "zone or free space in one of these"
    )
    # b2 has no room either, but b1 does: only zone c's servers are short.
    assert caught.value.missing == {"c1": 48 * MiB, "c2": 32 * MiB}


def test_a_server_without_a_zone_is_labelled_so() -> None:
    servers = [server("a1", GiB, "a"), server("lone", 0), server("b1", GiB, "b")]
    with pytest.raises(InsufficientCapacityError) as caught:
        place([SLAB], 3, servers, random.Random(0))
    assert "only 2 zones have a server with 16 MiB free" in str(caught.value)
    assert "lone (no zone) has 0 B free, short by 16 MiB" in str(caught.value)
    assert caught.value.missing == {"lone": SLAB}


def test_different_slab_sizes_ask_for_room_rather_than_one_size() -> None:
    # 20 MiB is 32 MiB in 16 MiB slabs but 20 MiB in 2 MiB slabs.
    servers = [server("ms1", 30 * MiB), server("ms2", 24 * MiB, slab=2 * MiB)]
    with pytest.raises(InsufficientCapacityError) as caught:
        place([20 * MiB], 2, servers, random.Random(0))
    assert str(caught.value) == (
        "cannot place 2 replicas of a 20 MiB extent: only 1 active server has "
        "room for it (ms2: 24 MiB; ms1 has 30 MiB free, short by 2 MiB); add a "
        "memserver, free space on one of these, or use fewer replicas"
    )
    assert caught.value.missing == {"ms1": 2 * MiB}


def test_one_replica_and_a_long_list_of_short_servers() -> None:
    servers = pool_of(11, free=4 * MiB)
    with pytest.raises(InsufficientCapacityError) as caught:
        place([SLAB], 1, servers, random.Random(0))
    message = str(caught.value)
    assert message.startswith(
        "cannot place 1 replica of a 16 MiB extent: no active server has 16 MiB "
        "free (ms1 has 4 MiB free, short by 12 MiB; ms10 has"
    )
    # Names sort as text; eight are listed.
    assert "ms6 has 4 MiB free, short by 12 MiB and 3 more); add a memserver" in (
        message
    )
    assert len(caught.value.missing) == 11


@pytest.mark.parametrize(
    ("sizes", "replicas", "servers", "message"),
    [
        ([SLAB], 0, pool_of(2), "a volume needs at least 1 replica, not 0"),
        ([], 1, pool_of(2), "a volume needs at least 1 extent, none were given"),
        ([SLAB, 0], 1, pool_of(2), "extent size 0 is not positive"),
        (
            [SLAB],
            1,
            [server("ms1", GiB), server("ms1", GiB)],
            "server names must be unique; repeated: ms1",
        ),
    ],
)
def test_place_refuses_bad_arguments(
    sizes: list[int], replicas: int, servers: list[Server], message: str
) -> None:
    with pytest.raises(ValueError) as caught:
        place(sizes, replicas, servers)
    assert str(caught.value) == message
