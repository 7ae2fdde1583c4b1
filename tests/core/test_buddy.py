"""Exact tests of the buddy allocator behind the Orca baselines: splits, merges, alignment."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pagedllm.core.buddy import BuddyAllocator, order_of


def test_order_of():
    assert [order_of(n) for n in (1, 2, 3, 4, 5, 8, 9, 128, 129)] == [0, 1, 2, 2, 3, 3, 4, 7, 8]


def test_allocation_splits_down_and_freeing_merges_back():
    b = BuddyAllocator(16)
    assert b.free_regions() == [(0, 4)]
    assert b.allocate(0) == 0  # 16 -> 8 + 8 -> 4 + 4 -> 2 + 2 -> 1 + 1: the upper halves stay free
    assert b.free_regions() == [(1, 0), (2, 1), (4, 2), (8, 3)]
    assert b.allocate(1) == 2  # an exact fit is taken before splitting a larger region
    assert b.allocate(0) == 1
    assert b.free_regions() == [(4, 2), (8, 3)] and b.num_free_blocks == 12
    b.free(0)  # its buddy (1) is held: no merge
    assert b.free_regions() == [(0, 0), (4, 2), (8, 3)]
    b.free(1)  # 0 + 1 -> [0, 2); its buddy [2, 4) is held
    assert b.free_regions() == [(0, 1), (4, 2), (8, 3)]
    b.free(2)  # [0, 2) + [2, 4) -> [0, 4) + [4, 8) -> [0, 8) + [8, 16) -> the whole pool
    assert b.free_regions() == [(0, 4)] and b.num_free_blocks == 16
    b.check_integrity()


def test_lowest_address_among_the_smallest_fitting_order():
    b = BuddyAllocator(16)
    starts = [b.allocate(2) for _ in range(4)]
    assert starts == [0, 4, 8, 12] and b.allocate(0) is None
    b.free(12)
    b.free(4)
    assert b.free_regions() == [(4, 2), (12, 2)]
    assert b.allocate(1) == 4  # order 2 is the smallest free order; 4 is its lowest address
    b.check_integrity()


def test_a_pool_that_is_not_a_power_of_two_never_merges_past_its_end():
    b = BuddyAllocator(80)
    assert b.free_regions() == [(0, 6), (64, 4)]
    assert b.allocate(6) == 0
    assert b.allocate(5) is None  # 16 blocks free, but no region of 32
    assert b.allocate(4) == 64
    b.free(64)
    assert b.free_regions() == [(64, 4)]  # its buddy [80, 96) is past the pool
    b.check_integrity()


def test_external_fragmentation_half_the_pool_free_in_pieces():
    b = BuddyAllocator(16)
    for _ in range(4):
        b.allocate(2)
    b.free(0)
    b.free(8)  # 8 blocks free, but [0, 4) and [8, 12) are not buddies
    assert b.num_free_blocks == 8 and b.largest_free_order() == 2
    assert not b.can_allocate([3])
    assert b.can_allocate([2, 2]) and not b.can_allocate([2, 2, 0])
    assert b.free_regions() == [(0, 2), (8, 2)]  # the trial placements were undone
    b.check_integrity()


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 100), st.lists(st.tuples(st.booleans(), st.integers(0, 7)), max_size=60))
def test_random_operations_keep_integrity(num_blocks, ops):
    """Integrity after every operation, and an allocation fails exactly when no free region of
    its order or larger exists (checked against a scan of the free map)."""
    b = BuddyAllocator(num_blocks)
    held: list[int] = []
    for alloc, k in ops:
        if alloc or not held:
            fits = any(o >= k for _, o in b.free_regions())
            start = b.allocate(k)
            assert (start is not None) == fits
            if start is not None:
                assert start % (1 << k) == 0
                held.append(start)
        else:
            b.free(held.pop(k % len(held)))
        b.check_integrity()
    for start in held:
        b.free(start)
    b.check_integrity()
    assert b.num_free_blocks == num_blocks and len(b.free_regions()) == bin(num_blocks).count("1")
