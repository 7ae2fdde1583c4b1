"""A binary buddy allocator over the KV pool's blocks: contiguous power-of-two regions.

The paper's Orca baselines (core/reservation.py) keep each request's KV cache in one contiguous
region, placed by a buddy allocator as the paper assumes Orca does; this is what gives them
external fragmentation, which paged blocks cannot have.

  a region of order k   2**k blocks, starting at a multiple of 2**k
  its buddy             start ^ 2**k: the other half of the order k + 1 region holding both

Allocation takes the smallest order that has a free region (the lowest address among those)
and splits it down, leaving each upper half free; freeing merges a region with its buddy for
as long as the buddy is free. So no two free buddies ever coexist, and the free lists are a
function of the allocated regions alone. A pool whose size is not a power of two starts as the
largest aligned regions that tile it (80 blocks: [0, 64) and [64, 80)); a region whose buddy
would reach past the pool never merges.
"""

from __future__ import annotations


def order_of(num_blocks: int) -> int:
    """The smallest k with 2**k >= num_blocks."""
    assert num_blocks >= 1, num_blocks
    return (num_blocks - 1).bit_length()


class BuddyAllocator:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.max_order = num_blocks.bit_length() - 1
        self.free_lists: list[set[int]] = [set() for _ in range(self.max_order + 1)]
        self.allocated: dict[int, int] = {}  # start block -> order
        self.num_free_blocks = num_blocks
        start = 0
        while start < num_blocks:
            k = self.max_order
            while start % (1 << k) or start + (1 << k) > num_blocks:
                k -= 1
            self.free_lists[k].add(start)
            start += 1 << k

    def allocate(self, order: int) -> int | None:
        """The first block of a free region of 2**order blocks, or None (nothing changes)."""
        k = next((k for k in range(order, self.max_order + 1) if self.free_lists[k]), None)
        if k is None:
            return None
        start = min(self.free_lists[k])
        self.free_lists[k].remove(start)
        while k > order:  # split: keep the lower half, free the upper one
            k -= 1
            self.free_lists[k].add(start + (1 << k))
        self.allocated[start] = order
        self.num_free_blocks -= 1 << order
        return start

    def free(self, start: int) -> None:
        assert start in self.allocated, f"region at block {start} is not allocated"
        order = self.allocated.pop(start)
        self.num_free_blocks += 1 << order
        while order < self.max_order:
            buddy = start ^ (1 << order)
            if buddy not in self.free_lists[order]:
                break
            self.free_lists[order].remove(buddy)
            start, order = min(start, buddy), order + 1
        self.free_lists[order].add(start)

    def can_allocate(self, orders: list[int]) -> bool:
        """Whether regions of all these orders can be placed together right now."""
        placed = []
        try:
            for k in sorted(orders, reverse=True):  # largest first, as a packer would
                start = self.allocate(k)
                if start is None:
                    return False
                placed.append(start)
            return True
        finally:
            # Freeing undoes every split exactly: the free lists depend only on what is held.
            for start in reversed(placed):
                self.free(start)

    def largest_free_order(self) -> int | None:
        return next((k for k in range(self.max_order, -1, -1) if self.free_lists[k]), None)

    def free_regions(self) -> list[tuple[int, int]]:
        """(start, order) of every free region, by address."""
        return sorted((s, k) for k, starts in enumerate(self.free_lists) for s in starts)

    def check_integrity(self) -> None:
        """Free and allocated regions are aligned and tile the pool exactly, with no two free
        buddies left unmerged, and the free count adds up."""
        regions = [(s, k, False) for s, k in self.free_regions()]
        regions += [(s, k, True) for s, k in self.allocated.items()]
        pos = 0
        for start, k, _ in sorted(regions):
            assert start == pos, f"gap or overlap at block {pos} (next region starts at {start})"
            assert start % (1 << k) == 0, f"region at {start} of order {k} is not aligned"
            pos = start + (1 << k)
        assert pos == self.num_blocks, f"regions cover {pos} of {self.num_blocks} blocks"
        for start, k in self.free_regions():
            assert start ^ (1 << k) not in self.free_lists[k], f"free buddies at {start}, order {k}"
        free = sum(1 << k for _, k in self.free_regions())
        assert free == self.num_free_blocks, f"{free} blocks free, counted {self.num_free_blocks}"
