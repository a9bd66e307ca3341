"""Free list of KV page ids. Page 0 is reserved (the worker uses it as padding)."""

from __future__ import annotations


class PageAllocator:
    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError(f"need at least 2 KV pages (page 0 is reserved), got {num_pages}")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, 0, -1))  # pop() hands out low ids first
        self._is_free = [False] + [True] * (num_pages - 1)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_usable(self) -> int:
        return self.num_pages - 1

    def alloc(self, n: int) -> list[int] | None:
        """n pages, or None (and nothing taken) when fewer are free."""
        if n > len(self._free):
            return None
        if n == 1:  # a decode into a new page: about one sequence in page_size every step
            page = self._free.pop()
            self._is_free[page] = False
            return [page]
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._is_free[p] = False
        return pages

    def free(self, pages: list[int]) -> None:
        """Return pages; all or nothing: a double free or an invalid id raises before any page is taken back."""
        if len(set(pages)) != len(pages) or any(
            p <= 0 or p >= self.num_pages or self._is_free[p] for p in pages
        ):
            raise ValueError(f"double free or invalid page among {pages}")
        for p in pages:
            self._is_free[p] = True
            self._free.append(p)
