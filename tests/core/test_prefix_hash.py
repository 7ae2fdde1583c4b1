"""Prefix-cache keys: sha256 over the documented block encoding, and cache_salt isolation."""

from __future__ import annotations

import hashlib

from pagedllm.core.block_manager import BlockManager
from pagedllm.core.block_pool import ROOT_BLOCK_HASH, hash_block_tokens
from pagedllm.core.sequence import Sequence, SequenceGroup


def encode(parent: bytes, tokens: list[int], salt: str | None) -> bytes:
    """The encoding documented in core/block_pool.py, written out independently."""
    out = parent + len(tokens).to_bytes(4, "little")
    for t in tokens:
        out += t.to_bytes(8, "little", signed=True)
    if salt is None:
        return out + b"\x00"
    raw = salt.encode("utf-8")
    return out + b"\x01" + len(raw).to_bytes(4, "little") + raw


def test_first_and_chained_block_digests_are_pinned():
    assert ROOT_BLOCK_HASH == b"\x00" * 32
    first = list(range(1, 17))
    second = list(range(17, 33))
    h0 = hash_block_tokens(None, tuple(first))
    assert h0 == hashlib.sha256(encode(b"\x00" * 32, first, None)).digest()
    h1 = hash_block_tokens(h0, tuple(second))
    assert h1 == hashlib.sha256(encode(h0, second, None)).digest()
    assert len(h0) == len(h1) == 32 and h0 != h1


def test_salted_first_block_digest_is_pinned():
    tokens = list(range(1, 17))
    h = hash_block_tokens(None, tuple(tokens), "tenant-é")
    assert h == hashlib.sha256(encode(b"\x00" * 32, tokens, "tenant-é")).digest()
    # No salt, an empty salt and a salt are three different keys.
    keys = {hash_block_tokens(None, tuple(tokens), s) for s in (None, "", "tenant-é")}
    assert len(keys) == 3


def test_encoding_is_unambiguous_at_field_boundaries():
    # Token ids wider than 32 bits and negative ids do not spill into their neighbours.
    assert hash_block_tokens(None, (1 << 32, 0)) != hash_block_tokens(None, (0, 1))
    assert hash_block_tokens(None, (-1,)) != hash_block_tokens(None, ((1 << 64) - 1 >> 1,))
    # A shorter block is not a prefix of a longer one's encoding.
    assert hash_block_tokens(None, (1, 2)) != hash_block_tokens(None, (1, 2, 0))


def prefill(bm: BlockManager, s: Sequence) -> None:
    """What the scheduler does for a new sequence: take prefix hits, compute the rest, publish."""
    hits = bm.get_computed_blocks(s)
    s.num_computed_tokens = len(hits) * bm.block_size
    assert bm.allocate_slots(s, s.num_tokens - s.num_computed_tokens, hits) is not None
    s.num_computed_tokens = s.num_tokens
    bm.cache_blocks(s)


def test_salt_isolation_exact_block_ids():
    bm = BlockManager(num_blocks=16, block_size=4)
    prompt = list(range(100, 110))  # 2 full blocks + 2 tokens

    a = Sequence(0, prompt, cache_salt="tenant-a")
    assert bm.get_computed_blocks(a) == []
    prefill(bm, a)
    assert bm.get_block_ids(0) == [0, 1, 2]

    b = Sequence(1, prompt, cache_salt="tenant-b")
    assert bm.get_computed_blocks(b) == []  # same tokens, other tenant: no prefix hit
    prefill(bm, b)
    assert bm.get_block_ids(1) == [3, 4, 5]

    a2 = Sequence(2, prompt, cache_salt="tenant-a")
    assert [h.block_id for h in bm.get_computed_blocks(a2)] == [0, 1]
    prefill(bm, a2)
    assert bm.get_block_ids(2) == [0, 1, 6]

    n1 = Sequence(3, prompt)
    assert bm.get_computed_blocks(n1) == []  # no salt shares with no salt only
    prefill(bm, n1)
    assert bm.get_block_ids(3) == [7, 8, 9]
    n2 = Sequence(4, prompt)
    assert [h.block_id for h in bm.get_computed_blocks(n2)] == [7, 8]

    # Salted and unsalted chains differ in every block, not only the first.
    ha, hb, hn = bm.block_hashes(a), bm.block_hashes(b), bm.block_hashes(n1)
    assert all(x != y and y != z and x != z for x, y, z in zip(ha, hb, hn, strict=True))
    assert bm.pool.blocks[0].ref_cnt == 2 and bm.pool.blocks[3].ref_cnt == 1
    bm.check_integrity()


def test_group_salt_reaches_its_sequences_and_their_forks():
    s = Sequence(0, list(range(8)))
    group = SequenceGroup("r", [s], None, cache_salt="tenant-a")
    assert group.cache_salt == s.cache_salt == "tenant-a"
    assert s.fork(1).cache_salt == "tenant-a"
    assert SequenceGroup("q", [Sequence(2, [1])], None).seqs[0].cache_salt is None

    bm = BlockManager(num_blocks=8, block_size=4)
    prefill(bm, s)
    child = s.fork(1)
    bm.fork(s, child)
    assert bm.block_hashes(child) == bm.block_hashes(s)
    salted_twin = Sequence(2, list(range(8)) + [9], cache_salt="tenant-a")
    assert [h.block_id for h in bm.get_computed_blocks(salted_twin)] == [0, 1]
    assert bm.get_computed_blocks(Sequence(3, list(range(8)) + [9])) == []
    bm.check_integrity()
