"""PageAllocator: the free list of KV page ids (page 0 reserved as padding)."""

from __future__ import annotations

import random

import pytest

from scheduler_svc.page_allocator import PageAllocator


def test_constructor_rejects_fewer_than_two_pages():
    for n in (-1, 0, 1):
        with pytest.raises(ValueError):
            PageAllocator(n)
    a = PageAllocator(2)  # the smallest legal pool: one usable page
    assert a.num_usable == 1
    assert a.num_free == 1
    assert a.alloc(1) == [1]
    assert a.alloc(1) is None


def test_fresh_allocator_counts():
    a = PageAllocator(10)
    assert a.num_pages == 10
    assert a.num_usable == 9
    assert a.num_free == 9


def test_alloc_hands_out_distinct_ids_never_zero():
    a = PageAllocator(17)
    got = a.alloc(16)
    assert got is not None
    assert len(got) == 16
    assert len(set(got)) == 16
    assert 0 not in got
    assert sorted(got) == list(range(1, 17))
    assert a.num_free == 0
    # exhausted: any further request fails, even a single page
    assert a.alloc(1) is None


def test_low_ids_first():
    a = PageAllocator(8)
    assert a.alloc(3) == [1, 2, 3]
    assert a.alloc(2) == [4, 5]


def test_alloc_zero_returns_empty_list():
    a = PageAllocator(4)
    assert a.alloc(0) == []
    assert a.num_free == 3


def test_alloc_beyond_capacity_returns_none_and_takes_nothing():
    a = PageAllocator(6)  # 5 usable
    assert a.alloc(6) is None
    assert a.num_free == 5
    first = a.alloc(3)
    assert first is not None and a.num_free == 2
    assert a.alloc(3) is None
    assert a.num_free == 2  # nothing taken by the failed request
    rest = a.alloc(2)
    assert rest is not None
    assert set(first) | set(rest) == {1, 2, 3, 4, 5}
    assert a.num_free == 0


def test_alloc_free_round_trip():
    a = PageAllocator(9)
    pages = a.alloc(8)
    a.free(pages)
    assert a.num_free == 8
    again = a.alloc(8)
    assert sorted(again) == list(range(1, 9))
    assert a.num_free == 0


def test_freed_pages_are_reused():
    a = PageAllocator(5)  # 4 usable
    x = a.alloc(4)
    a.free([x[2]])
    assert a.num_free == 1
    assert a.alloc(1) == [x[2]]
    assert a.alloc(1) is None


def test_num_free_bookkeeping_partial_frees():
    a = PageAllocator(11)
    p = a.alloc(7)
    assert a.num_free == 3
    a.free(p[:2])
    assert a.num_free == 5
    a.free(p[2:3])
    assert a.num_free == 6
    a.free([])
    assert a.num_free == 6
    a.free(p[3:])
    assert a.num_free == 10


def test_double_free_raises():
    a = PageAllocator(4)
    p = a.alloc(2)
    a.free([p[0]])
    with pytest.raises(ValueError):
        a.free([p[0]])
    assert a.num_free == 2  # the failed free did not add a second copy


def test_double_free_within_one_call_raises():
    a = PageAllocator(4)
    p = a.alloc(1)
    with pytest.raises(ValueError):
        a.free([p[0], p[0]])
    # never two copies of a page on the free list
    got = a.alloc(a.num_free)
    assert len(got) == len(set(got))


def test_free_of_never_allocated_page_raises():
    a = PageAllocator(4)
    with pytest.raises(ValueError):
        a.free([2])  # still free: never handed out
    assert a.num_free == 3


@pytest.mark.parametrize("bad", [0, -1, -5, 4, 100])
def test_free_invalid_ids_raise(bad):
    a = PageAllocator(4)
    a.alloc(3)
    with pytest.raises(ValueError):
        a.free([bad])
    assert a.num_free == 0


def test_reserved_page_never_handed_out_after_churn():
    rng = random.Random(1234)
    a = PageAllocator(13)
    held: set[int] = set()
    for _ in range(2000):
        if held and rng.random() < 0.5:
            k = rng.randint(1, len(held))
            out = rng.sample(sorted(held), k)
            a.free(out)
            held -= set(out)
        else:
            n = rng.randint(0, 14)
            got = a.alloc(n)
            if n > a.num_usable - len(held):
                assert got is None
            else:
                assert got is not None and len(got) == n
                assert 0 not in got
                assert not (set(got) & held), "a page handed out twice"
                assert len(set(got)) == n
                held |= set(got)
        assert a.num_free == a.num_usable - len(held)
        assert all(1 <= p < 13 for p in held)
