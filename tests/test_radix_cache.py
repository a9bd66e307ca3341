"""RadixCache: the page-granular prefix cache (insert / match / split / lock / LRU eviction).

Unit tests first, then a Hypothesis state machine that drives the cache together with a real PageAllocator the way
the scheduler does and checks it against a reference model (a dict from page-aligned token prefixes to page ids).
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from scheduler_svc.page_allocator import PageAllocator
from scheduler_svc.radix_cache import RadixCache, TreeNode

# ---------------------------------------------------------------- helpers


class FreeLog:
    """free_pages callback that records every batch (and optionally forwards to an allocator)."""

    def __init__(self, allocator: PageAllocator | None = None):
        self.batches: list[list[int]] = []
        self.allocator = allocator

    def __call__(self, pages: list[int]) -> None:
        self.batches.append(list(pages))
        if self.allocator is not None:
            self.allocator.free(pages)

    @property
    def pages(self) -> list[int]:
        return [p for b in self.batches for p in b]


def make(page_size: int = 2, enabled: bool = True) -> tuple[RadixCache, FreeLog]:
    log = FreeLog()
    return RadixCache(page_size, log, enabled=enabled), log


def nodes(cache: RadixCache) -> list[TreeNode]:
    out, stack = [], [cache.root]
    while stack:
        n = stack.pop()
        if n is not cache.root:
            out.append(n)
        stack.extend(n.children.values())
    return out


def path(cache: RadixCache, node: TreeNode) -> tuple[tuple, list[int]]:
    """Concatenated key and pages from the root down to `node`."""
    keys, pages = [], []
    while node is not cache.root:
        keys.append(node.key)
        pages.append(node.pages)
        node = node.parent
    return tuple(t for k in reversed(keys) for t in k), [p for ps in reversed(pages) for p in ps]


def attached(cache: RadixCache, node: TreeNode) -> bool:
    while node is not cache.root:
        parent = node.parent
        if parent is None or parent.children.get(node.key[: cache.page_size]) is not node:
            return False
        node = parent
    return True


def check_structure(cache: RadixCache) -> None:
    ps = cache.page_size
    all_nodes = nodes(cache)
    for n in all_nodes:
        assert len(n.pages) >= 1
        assert len(n.key) == len(n.pages) * ps
        assert n.parent is not None and n.parent.children[n.key[:ps]] is n
        assert n.lock_ref >= 0
        for k, c in n.children.items():
            assert c.key[:ps] == k
    tree_pages = [p for n in all_nodes for p in n.pages]
    assert len(tree_pages) == len(set(tree_pages)), "a page is held by two nodes"
    assert cache.num_cached_pages == len(tree_pages)
    assert cache.num_locked_pages == sum(len(n.pages) for n in all_nodes if n.lock_ref > 0)
    assert cache.num_evictable_pages == cache.num_cached_pages - cache.num_locked_pages
    assert cache.root.lock_ref == 1
    for n in all_nodes:  # a node is locked at least as often as all its children together (locks go up)
        assert n.lock_ref >= sum(c.lock_ref for c in n.children.values())


# ---------------------------------------------------------------- insert / match


def test_empty_cache_matches_nothing():
    cache, _ = make(2)
    pages, node = cache.match_prefix([1, 2, 3, 4])
    assert pages == [] and node is cache.root
    assert cache.num_cached_pages == 0


def test_insert_then_exact_match():
    cache, log = make(2)
    assert cache.insert([1, 2, 3, 4, 5, 6], [10, 11, 12]) == 0
    assert cache.num_cached_pages == 3
    pages, node = cache.match_prefix([1, 2, 3, 4, 5, 6])
    assert pages == [10, 11, 12]
    assert node is not cache.root
    assert path(cache, node) == ((1, 2, 3, 4, 5, 6), [10, 11, 12])
    assert log.batches == []
    check_structure(cache)


def test_match_accepts_tuple_and_list_keys():
    cache, _ = make(2)
    cache.insert((7, 8, 9, 10), [3, 4])
    assert cache.match_prefix([7, 8, 9, 10])[0] == [3, 4]
    assert cache.match_prefix((7, 8, 9, 10))[0] == [3, 4]


def test_partial_match_longer_key():
    cache, _ = make(2)
    cache.insert([1, 2, 3, 4], [10, 11])
    pages, node = cache.match_prefix([1, 2, 3, 4, 5, 6, 7, 8])
    assert pages == [10, 11]
    assert path(cache, node)[0] == (1, 2, 3, 4)


def test_partial_match_diverging_key():
    cache, _ = make(2)
    cache.insert([1, 2, 3, 4, 5, 6], [10, 11, 12])
    pages, node = cache.match_prefix([1, 2, 3, 9, 5, 6])  # the second page differs
    assert pages == [10]
    assert path(cache, node) == ((1, 2), [10])
    # differing inside the first page: nothing
    pages, node = cache.match_prefix([1, 3, 3, 4])
    assert pages == [] and node is cache.root
    check_structure(cache)


def test_match_is_page_aligned():
    cache, _ = make(4)
    cache.insert(list(range(12)), [1, 2, 3])
    # 7 tokens: only the first full page can match, although 7 tokens agree with the cached key
    pages, node = cache.match_prefix(list(range(7)))
    assert pages == [1]
    assert path(cache, node)[0] == (0, 1, 2, 3)
    # 11 tokens: two pages
    assert cache.match_prefix(list(range(11)))[0] == [1, 2]
    # shorter than a page: nothing
    pages, node = cache.match_prefix([0, 1, 2])
    assert pages == [] and node is cache.root
    assert cache.match_prefix([])[0] == []
    for n in [7, 11, 3, 12, 13]:
        pages, _ = cache.match_prefix(list(range(n)))
        assert len(pages) * 4 <= n
    check_structure(cache)


def test_insert_unaligned_key_caches_only_full_pages():
    cache, _ = make(4)
    # 10 tokens, 3 pages offered: only 2 full pages can be cached, the third page stays with the caller
    assert cache.insert(list(range(10)), [5, 6, 7]) == 0
    assert cache.num_cached_pages == 2
    assert cache.match_prefix(list(range(12)))[0] == [5, 6]
    assert 7 not in [p for n in nodes(cache) for p in n.pages]
    check_structure(cache)


def test_insert_fewer_pages_than_key():
    cache, _ = make(2)
    assert cache.insert([1, 2, 3, 4, 5, 6], [9]) == 0
    assert cache.num_cached_pages == 1
    assert cache.match_prefix([1, 2, 3, 4, 5, 6])[0] == [9]
    check_structure(cache)


def test_insert_shorter_than_a_page_is_noop():
    cache, _ = make(4)
    assert cache.insert([1, 2, 3], [5]) == 0
    assert cache.num_cached_pages == 0
    assert cache.root.children == {}


# ---------------------------------------------------------------- insert return value / branches


def test_insert_returns_already_cached_length_and_keeps_original_pages():
    cache, _ = make(2)
    assert cache.insert([1, 2, 3, 4], [10, 11]) == 0
    # extends the cached key: 4 tokens already there, pages 20, 21 are the caller's duplicates
    assert cache.insert([1, 2, 3, 4, 5, 6], [20, 21, 22]) == 4
    assert cache.num_cached_pages == 3
    assert cache.match_prefix([1, 2, 3, 4, 5, 6])[0] == [10, 11, 22]
    held = {p for n in nodes(cache) for p in n.pages}
    assert held == {10, 11, 22}
    check_structure(cache)


def test_insert_same_key_twice():
    cache, _ = make(2)
    cache.insert([1, 2, 3, 4], [10, 11])
    assert cache.insert([1, 2, 3, 4], [30, 31]) == 4
    assert cache.num_cached_pages == 2
    assert cache.match_prefix([1, 2, 3, 4])[0] == [10, 11]
    check_structure(cache)


def test_insert_prefix_of_cached_key_splits_and_returns_full_length():
    cache, _ = make(2)
    cache.insert([1, 2, 3, 4, 5, 6], [10, 11, 12])
    assert cache.insert([1, 2, 3, 4], [40, 41]) == 4
    assert cache.num_cached_pages == 3
    (top,) = cache.root.children.values()
    assert top.key == (1, 2, 3, 4) and top.pages == [10, 11]
    (low,) = top.children.values()
    assert low.key == (5, 6) and low.pages == [12] and low.parent is top
    check_structure(cache)


def test_insert_diverging_branch():
    cache, _ = make(2)
    cache.insert([1, 2, 3, 4, 5, 6], [10, 11, 12])
    assert cache.insert([1, 2, 3, 4, 7, 8, 9, 9], [20, 21, 22, 23]) == 4
    assert cache.num_cached_pages == 5
    (shared,) = cache.root.children.values()
    assert shared.key == (1, 2, 3, 4) and shared.pages == [10, 11]
    assert set(shared.children) == {(5, 6), (7, 8)}
    assert shared.children[(7, 8)].pages == [22, 23]
    assert cache.match_prefix([1, 2, 3, 4, 5, 6])[0] == [10, 11, 12]
    assert cache.match_prefix([1, 2, 3, 4, 7, 8, 9, 9])[0] == [10, 11, 22, 23]
    # a branch diverging at the root
    assert cache.insert([9, 9, 1, 2], [30, 31]) == 0
    assert set(cache.root.children) == {(1, 2), (9, 9)}
    assert cache.num_cached_pages == 7
    check_structure(cache)


def test_diverging_inside_first_page_is_a_new_root_branch():
    cache, _ = make(4)
    cache.insert([1, 2, 3, 4, 5, 6, 7, 8], [10, 11])
    assert cache.insert([1, 2, 3, 9, 5, 6, 7, 8], [20, 21]) == 0  # same 3 tokens, but not a whole page
    assert set(cache.root.children) == {(1, 2, 3, 4), (1, 2, 3, 9)}
    assert cache.match_prefix([1, 2, 3, 9, 5, 6, 7, 8])[0] == [20, 21]
    check_structure(cache)


# ---------------------------------------------------------------- split


def test_match_ending_inside_node_splits_it():
    cache, _ = make(2)
    cache.insert([1, 2, 3, 4, 5, 6], [10, 11, 12])
    (orig,) = cache.root.children.values()
    pages, node = cache.match_prefix([1, 2, 3, 4])
    assert pages == [10, 11]
    assert node.key == (1, 2, 3, 4) and node.pages == [10, 11]
    assert node.parent is cache.root and cache.root.children[(1, 2)] is node
    # the original node object becomes the lower half
    assert orig.key == (5, 6) and orig.pages == [12] and orig.parent is node
    assert node.children == {(5, 6): orig}
    assert cache.num_cached_pages == 3
    assert cache.match_prefix([1, 2, 3, 4, 5, 6])[0] == [10, 11, 12]
    check_structure(cache)


def test_split_by_diverging_match():
    cache, _ = make(2)
    cache.insert([1, 2, 3, 4, 5, 6], [10, 11, 12])
    pages, node = cache.match_prefix([1, 2, 9, 9])
    assert pages == [10]
    assert node.key == (1, 2) and list(node.children) == [(3, 4)]
    assert node.children[(3, 4)].pages == [11, 12]
    check_structure(cache)


def test_split_of_locked_node_keeps_lock_counts():
    cache, log = make(2)
    cache.insert([1, 2, 3, 4, 5, 6], [10, 11, 12])
    _, leaf = cache.match_prefix([1, 2, 3, 4, 5, 6])
    cache.lock(leaf)
    cache.lock(leaf)
    assert cache.num_locked_pages == 3
    _, upper = cache.match_prefix([1, 2])  # splits the locked node
    assert upper is not leaf and leaf.parent is upper
    assert upper.pages == [10] and leaf.pages == [11, 12]
    assert upper.lock_ref == 2 and leaf.lock_ref == 2
    assert cache.num_locked_pages == 3 and cache.num_evictable_pages == 0
    check_structure(cache)
    assert cache.evict(10) == 0
    cache.lock(upper)
    assert upper.lock_ref == 3
    cache.unlock(leaf)
    cache.unlock(leaf)
    assert leaf.lock_ref == 0 and upper.lock_ref == 1
    assert cache.num_locked_pages == 1
    assert cache.num_evictable_pages == 2
    check_structure(cache)
    assert cache.evict(10) == 2
    assert log.pages == [11, 12]
    cache.unlock(upper)
    assert cache.num_locked_pages == 0
    assert cache.evict(10) == 1
    assert sorted(log.pages) == [10, 11, 12]
    assert cache.num_cached_pages == 0
    check_structure(cache)


def test_split_of_ancestor_of_locked_leaf():
    cache, _ = make(2)
    cache.insert([1, 2, 3, 4], [10, 11])
    cache.insert([1, 2, 3, 4, 5, 6], [0, 0, 12])
    _, leaf = cache.match_prefix([1, 2, 3, 4, 5, 6])
    cache.lock(leaf)
    assert cache.num_locked_pages == 3
    _, upper = cache.match_prefix([1, 2])  # splits the (locked) ancestor (1,2,3,4)
    assert upper.lock_ref == 1 and upper.pages == [10]
    mid = leaf.parent
    assert mid.parent is upper and mid.pages == [11] and mid.lock_ref == 1
    assert cache.num_locked_pages == 3
    check_structure(cache)
    cache.unlock(leaf)
    assert cache.num_locked_pages == 0
    assert all(n.lock_ref == 0 for n in nodes(cache))


# ---------------------------------------------------------------- lock / unlock


def test_lock_counts_up_to_root_and_unlock():
    cache, _ = make(2)
    cache.insert([1, 2, 3, 4], [10, 11])
    cache.insert([1, 2, 3, 4, 5, 6], [0, 0, 12])
    _, leaf = cache.match_prefix([1, 2, 3, 4, 5, 6])
    parent = leaf.parent
    assert parent is not cache.root
    cache.lock(leaf)
    assert leaf.lock_ref == 1 and parent.lock_ref == 1 and cache.root.lock_ref == 1
    assert cache.num_locked_pages == 3 and cache.num_evictable_pages == 0
    cache.lock(leaf)
    assert leaf.lock_ref == 2 and parent.lock_ref == 2
    assert cache.num_locked_pages == 3  # pages counted once however often locked
    cache.unlock(leaf)
    assert cache.num_locked_pages == 3
    cache.unlock(leaf)
    assert leaf.lock_ref == 0 and parent.lock_ref == 0
    assert cache.num_locked_pages == 0 and cache.num_evictable_pages == 3
    check_structure(cache)


def test_lock_and_unlock_of_root_are_noops():
    cache, _ = make(2)
    cache.lock(cache.root)
    cache.unlock(cache.root)
    cache.unlock(cache.root)
    assert cache.root.lock_ref == 1
    assert cache.num_locked_pages == 0


def test_unlock_below_zero_raises():
    cache, _ = make(2)
    cache.insert([1, 2], [5])
    _, node = cache.match_prefix([1, 2])
    with pytest.raises(RuntimeError):
        cache.unlock(node)
    cache.lock(node)
    cache.unlock(node)
    with pytest.raises(RuntimeError):
        cache.unlock(node)
    assert cache.num_locked_pages == 0


def test_locked_leaf_and_its_ancestors_are_never_evicted():
    cache, log = make(2)
    cache.insert([1, 2, 3, 4], [10, 11])
    cache.insert([1, 2, 3, 4, 5, 6], [0, 0, 12])
    cache.insert([1, 2, 7, 7], [0, 13])
    cache.insert([8, 8], [14])
    _, leaf = cache.match_prefix([1, 2, 3, 4, 5, 6])
    cache.lock(leaf)
    locked = {p for p in path(cache, leaf)[1]}
    assert locked == {10, 11, 12}
    freed = cache.evict(100)
    assert freed == 2
    assert sorted(log.pages) == [13, 14]
    assert {p for n in nodes(cache) for p in n.pages} == locked
    assert cache.match_prefix([1, 2, 3, 4, 5, 6])[0] == [10, 11, 12]
    cache.unlock(leaf)
    assert cache.evict(100) == 3
    assert sorted(log.pages) == [10, 11, 12, 13, 14]
    assert cache.root.children == {}
    check_structure(cache)


def test_locked_inner_node_survives_after_its_children_are_evicted():
    cache, log = make(2)
    cache.insert([1, 2, 3, 4], [10, 11])
    _, upper = cache.match_prefix([1, 2])  # split; lock only the upper half
    cache.lock(upper)
    assert cache.evict(100) == 1
    assert log.pages == [11]
    assert upper.children == {} and cache.root.children[(1, 2)] is upper
    assert cache.evict(100) == 0
    cache.unlock(upper)
    assert cache.evict(100) == 1
    assert log.pages == [11, 10]


# ---------------------------------------------------------------- eviction


def test_lru_eviction_order_follows_match_recency():
    cache, log = make(2)
    cache.insert([1, 1], [10])
    cache.insert([2, 2], [20])
    cache.insert([3, 3], [30])
    cache.match_prefix([1, 1, 9])  # touches [1, 1]: now the most recent
    assert cache.evict(1) == 1
    assert log.batches == [[20]]
    assert cache.evict(1) == 1
    assert log.batches == [[20], [30]]
    assert cache.evict(1) == 1
    assert log.batches == [[20], [30], [10]]
    assert cache.evict(1) == 0


def test_lru_without_access_is_insertion_order():
    cache, log = make(2)
    for t in (5, 3, 4, 1):
        cache.insert([t, t, t, t], [t * 10, t * 10 + 1])
    assert cache.evict(3) == 4  # whole leaves: two nodes of 2 pages
    assert log.batches == [[50, 51], [30, 31]]


def test_insert_refreshes_recency_of_its_path():
    cache, log = make(2)
    cache.insert([1, 1], [10])
    cache.insert([2, 2], [20])
    assert cache.insert([1, 1], [99]) == 2  # re-insert touches [1, 1]
    cache.evict(1)
    assert log.batches == [[20]]


def test_eviction_cascades_to_parent_that_becomes_leaf():
    cache, log = make(2)
    cache.insert([1, 1, 2, 2], [10, 11])
    cache.insert([1, 1, 3, 3], [0, 12])  # splits into P=[1,1] with children [2,2] and [3,3]
    cache.insert([9, 9], [90])  # the most recent leaf
    assert cache.num_cached_pages == 4
    freed = cache.evict(3)
    assert freed == 3
    assert sorted(log.batches[:2]) == [[11], [12]]
    assert log.batches[2] == [10]  # the parent, a leaf now and older than [9, 9]
    assert cache.match_prefix([9, 9])[0] == [90]
    assert set(cache.root.children) == {(9, 9)}
    check_structure(cache)


def test_evict_cascade_of_a_chain_in_one_call():
    cache, log = make(2)
    cache.insert([1, 1], [10])
    cache.insert([1, 1, 2, 2], [0, 11])
    cache.insert([1, 1, 2, 2, 3, 3], [0, 0, 12])
    assert len(nodes(cache)) == 3
    assert cache.evict(3) == 3
    assert log.batches == [[12], [11], [10]]  # leaf first, then each parent as it becomes a leaf
    assert cache.root.children == {}
    assert cache.num_cached_pages == 0


def test_evict_frees_whole_nodes_and_returns_count():
    cache, log = make(2)
    cache.insert([1, 1, 2, 2, 3, 3], [10, 11, 12])
    cache.insert([4, 4], [40])
    freed = cache.evict(1)  # the oldest leaf holds 3 pages: all go
    assert freed == 3
    assert log.batches == [[10, 11, 12]]
    assert cache.num_cached_pages == 1
    check_structure(cache)


def test_evict_calls_free_pages_with_exactly_the_evicted_pages():
    alloc = PageAllocator(16)
    log = FreeLog(alloc)
    cache = RadixCache(2, log)
    p1 = alloc.alloc(3)
    cache.insert([1, 1, 2, 2, 3, 3], p1)
    p2 = alloc.alloc(2)
    cache.insert([5, 5, 6, 6], p2)
    before = alloc.num_free
    freed = cache.evict(4)
    assert freed == len(log.pages) == 5
    assert sorted(log.pages) == sorted(p1 + p2)
    assert alloc.num_free == before + 5 == alloc.num_usable
    assert cache.num_cached_pages == 0


def test_evict_zero_and_evict_nothing():
    cache, log = make(2)
    assert cache.evict(5) == 0
    cache.insert([1, 1], [10])
    assert cache.evict(0) == 0
    assert log.batches == []
    assert cache.num_cached_pages == 1
    assert cache.evict(100) == 1
    assert cache.evict(100) == 0
    assert log.batches == [[10]]


def test_evict_stops_once_enough_is_freed():
    cache, log = make(2)
    for i in range(1, 6):
        cache.insert([i, i], [i * 10])
    assert cache.evict(2) == 2
    assert log.batches == [[10], [20]]
    assert cache.num_cached_pages == 3


def test_reset_drops_only_unlocked_nodes():
    cache, log = make(2)
    cache.insert([1, 1, 2, 2], [10, 11])
    cache.insert([3, 3], [30])
    _, node = cache.match_prefix([1, 1, 2, 2])
    cache.lock(node)
    cache.reset()
    assert log.pages == [30]
    assert cache.num_cached_pages == 2 == cache.num_locked_pages


# ---------------------------------------------------------------- disabled cache


def test_disabled_cache_match_and_insert():
    cache, log = make(2, enabled=False)
    cache.insert([1, 2, 3, 4], [10, 11])
    pages, node = cache.match_prefix([1, 2, 3, 4])
    assert pages == [] and node is cache.root
    assert cache.num_cached_pages == 0
    assert cache.num_locked_pages == 0
    assert cache.root.children == {}
    cache.lock(node)
    cache.unlock(node)
    assert cache.evict(10) == 0
    assert log.batches == []


def test_disabling_a_populated_cache_makes_match_return_nothing():
    cache, _ = make(2)
    cache.insert([1, 2, 3, 4], [10, 11])
    cache.enabled = False
    assert cache.match_prefix([1, 2, 3, 4]) == ([], cache.root)
    assert cache.insert([1, 2, 3, 4, 5, 6], [0, 0, 12]) == 0
    assert cache.num_cached_pages == 2
    cache.enabled = True
    assert cache.match_prefix([1, 2, 3, 4, 5, 6])[0] == [10, 11]


def test_disabled_cache_insert_takes_no_pages():
    """A disabled cache's insert is a no-op returning 0: it frees nothing and holds nothing, so every page stays
    the caller's to free (the scheduler's _release skips insert when the cache is off; 0 would otherwise read as
    "the tree took all of them")."""
    alloc = PageAllocator(8)
    log = FreeLog(alloc)
    cache = RadixCache(2, log, enabled=False)
    pages = alloc.alloc(3)
    assert cache.insert([1, 2, 3, 4, 5, 6], pages) == 0
    assert nodes(cache) == [] and cache.num_cached_pages == 0
    assert log.batches == []
    alloc.free(pages)  # still ours: no double free
    assert alloc.num_free == alloc.num_usable


# ---------------------------------------------------------------- negative (image placeholder) tokens


def test_negative_token_keys():
    cache, _ = make(2)
    img_a = [-101, -102, -103, -104]
    img_b = [-201, -202, -203, -204]
    assert cache.insert([5, 6] + img_a + [7, 8], [10, 11, 12, 13]) == 0
    # same text, different image: only the text page before the image matches
    assert cache.match_prefix([5, 6] + img_b + [7, 8])[0] == [10]
    assert cache.insert([5, 6] + img_b + [7, 8], [0, 21, 22, 23]) == 2
    assert cache.match_prefix([5, 6] + img_a + [7, 8])[0] == [10, 11, 12, 13]
    assert cache.match_prefix([5, 6] + img_b + [7, 8])[0] == [10, 21, 22, 23]
    # -1 and 1 are different tokens
    cache.insert([-1, -1], [30])
    assert cache.match_prefix([1, 1])[0] == []
    assert cache.match_prefix([-1, -1, 4])[0] == [30]
    check_structure(cache)


# ---------------------------------------------------------------- property-based: a state machine

ALPHABET = st.sampled_from([0, 1, -7])  # small, so prefixes collide; -7 stands for an image placeholder


class RadixCacheMachine(RuleBasedStateMachine):
    """Drives RadixCache + PageAllocator like the scheduler and checks both against a reference model:
    `model` maps every cached page-aligned token prefix to the page that holds its last page."""

    @initialize(page_size=st.sampled_from([2, 4]), num_pages=st.integers(4, 40))
    def setup(self, page_size, num_pages):
        self.ps = page_size
        self.alloc = PageAllocator(num_pages)
        self.log = FreeLog(self.alloc)
        self.cache = RadixCache(page_size, self.log)
        self.model: dict[tuple, int] = {}
        self.locks: list[tuple[TreeNode, tuple, list[int]]] = []  # (node, its path key, its path pages)
        self.history: list[list[int]] = []  # keys seen so far, to derive colliding keys from

    def draw_key(self, data) -> list[int]:
        """Mostly a prefix of an earlier key (cut anywhere, also inside a page) plus a random tail, so that
        inserts and matches share prefixes, diverge inside nodes and split them."""
        base: list[int] = []
        if self.history and data.draw(st.integers(0, 3)) > 0:
            base = data.draw(st.sampled_from(self.history))
            base = base[: data.draw(st.integers(0, len(base)))]
        key = (base + data.draw(st.lists(ALPHABET, max_size=12)))[:24]
        self.history.append(key)
        return key

    # -- the reference model

    def expected_match(self, key) -> list[int]:
        ps, out = self.ps, []
        for j in range(1, len(key) // ps + 1):
            page = self.model.get(tuple(key[: j * ps]))
            if page is None:
                break
            out.append(page)
        return out

    def apply_evictions(self, since: int) -> list[int]:
        freed = [p for b in self.log.batches[since:] for p in b]
        assert len(freed) == len(set(freed)), "a page freed twice by one evict"
        gone = {k for k, p in self.model.items() if p in set(freed)}
        assert len(gone) == len(freed), "evict freed pages the tree did not hold"
        for k in gone:
            del self.model[k]
        locked = {k[: j * self.ps] for _, k, _ in self.locks for j in range(1, len(k) // self.ps + 1)}
        assert not (gone & locked), "a locked prefix was evicted"
        for k in self.model:  # still prefix-closed: a parent is never evicted before its children
            assert all(k[: j * self.ps] in self.model for j in range(1, len(k) // self.ps))
        return freed

    def evict(self, n: int) -> int:
        evictable = self.cache.num_evictable_pages
        unlocked_leaves = [x for x in nodes(self.cache) if not x.children and x.lock_ref == 0]
        since = len(self.log.batches)
        freed = self.cache.evict(n)
        got = self.apply_evictions(since)
        assert freed == len(got)
        assert freed >= min(n, evictable), "evict stopped early although more was evictable"
        if freed:
            first = self.log.batches[since]
            oldest = min(x.last_access for x in unlocked_leaves)
            assert first in [x.pages for x in unlocked_leaves if x.last_access == oldest], "not the LRU leaf"
            assert freed - len(self.log.batches[-1]) < n, "evict kept going after freeing enough"
        return freed

    # -- rules

    @rule(data=st.data(), extra=st.integers(0, 3), short=st.sampled_from([0, 0, 0, 1, 2]))
    def insert(self, data, extra, short):
        tokens = self.draw_key(data)
        ps = self.ps
        n = max(0, len(tokens) // ps - short)  # short > 0: fewer pages than the key has full pages
        key = tokens if short else tokens[: n * ps + extra % ps]  # extra: sometimes an unaligned tail
        if self.alloc.num_free < n:
            self.evict(n - self.alloc.num_free)
        pages = self.alloc.alloc(n)
        if pages is None:
            return
        expected = len(self.expected_match(key[: n * ps]))
        existing = self.cache.insert(key, pages)
        assert existing == expected * ps
        for j in range(expected, n):
            self.model[tuple(key[: (j + 1) * ps])] = pages[j]
        self.alloc.free(pages[:expected])  # the caller's duplicates, as the scheduler frees them

    @rule(data=st.data(), lock=st.booleans())
    def match(self, data, lock):
        tokens = self.draw_key(data)
        expected = self.expected_match(tokens)
        pages, node = self.cache.match_prefix(tokens)
        assert pages == expected
        assert len(pages) * self.ps <= len(tokens)
        key, path_pages = path(self.cache, node)
        assert path_pages == pages
        assert key == tuple(tokens[: len(pages) * self.ps])
        assert (node is self.cache.root) == (not pages)
        if lock:
            self.cache.lock(node)
            self.locks.append((node, key, pages))

    @precondition(lambda self: self.locks)
    @rule(data=st.data())
    def unlock(self, data):
        i = data.draw(st.integers(0, len(self.locks) - 1))
        node, _, _ = self.locks.pop(i)
        self.cache.unlock(node)

    @precondition(lambda self: self.locks)
    @rule(data=st.data())
    def locked_key_still_matches(self, data):
        node, key, pages = data.draw(st.sampled_from(self.locks))
        got, got_node = self.cache.match_prefix(list(key) + [1] * data.draw(st.integers(0, 3)))
        assert got[: len(pages)] == pages
        if len(got) == len(pages):
            assert got_node is node

    @rule(n=st.integers(0, 12))
    def evict_some(self, n):
        self.evict(n)

    @rule()
    def evict_all(self):
        self.evict(self.cache.num_cached_pages + 1)
        assert self.cache.num_cached_pages == self.cache.num_locked_pages

    # -- invariants

    @invariant()
    def tree_matches_model(self):
        check_structure(self.cache)
        tree = {}
        for x in nodes(self.cache):
            key, pages = path(self.cache, x)
            for j in range(1, len(x.pages) + 1):
                depth = len(pages) - len(x.pages) + j
                tree[key[: depth * self.ps]] = pages[depth - 1]
        assert tree == self.model

    @invariant()
    def every_page_free_or_in_exactly_one_node(self):
        tree_pages = [p for x in nodes(self.cache) for p in x.pages]
        assert len(tree_pages) == len(set(tree_pages))
        # read the free list through the public API, then put it back in the same order
        free = self.alloc.alloc(self.alloc.num_free)
        self.alloc.free(list(reversed(free)))
        assert len(free) == len(set(free))
        assert not (set(free) & set(tree_pages)), "a page both free and cached"
        assert set(free) | set(tree_pages) == set(range(1, self.alloc.num_pages)), "a page was lost"
        assert self.cache.num_cached_pages == len(tree_pages)

    @invariant()
    def lock_refs_match_held_locks(self):
        want: dict[int, int] = {}
        for node, key, pages in self.locks:
            assert attached(self.cache, node), "a locked node fell out of the tree"
            assert path(self.cache, node) == (key, pages), "a locked node's path changed"
            while node is not self.cache.root:
                want[id(node)] = want.get(id(node), 0) + 1
                node = node.parent
        all_nodes = nodes(self.cache)
        for x in all_nodes:
            assert x.lock_ref == want.get(id(x), 0)
        assert self.cache.num_locked_pages == sum(len(x.pages) for x in all_nodes if x.lock_ref > 0)


TestRadixCacheMachine = RadixCacheMachine.TestCase
TestRadixCacheMachine.settings = settings(
    max_examples=100, stateful_step_count=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
