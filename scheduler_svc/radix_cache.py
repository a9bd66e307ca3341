"""Radix tree over token keys at page granularity: the prefix cache (RadixAttention-style).

Keys are token ids, with every placeholder token of an image replaced by a value derived from the image's
content key, so equal text with different images never matches. Each node holds whole pages. Nodes referenced
by live sequences are locked (reference counts up to the root); unlocked leaves are evicted least recently used
first.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Sequence

_clock = itertools.count()


class TreeNode:
    __slots__ = ("children", "parent", "key", "pages", "lock_ref", "last_access")

    def __init__(self, parent: TreeNode | None = None, key: tuple = (), pages: list[int] | None = None):
        self.children: dict[tuple, TreeNode] = {}
        self.parent = parent
        self.key = key  # tokens, a multiple of page_size long
        self.pages = pages or []
        self.lock_ref = 0
        self.last_access = next(_clock)


class RadixCache:
    def __init__(self, page_size: int, free_pages: Callable[[list[int]], None], enabled: bool = True):
        self.page_size = page_size
        self.free_pages = free_pages
        self.enabled = enabled
        self.root = TreeNode()
        self.root.lock_ref = 1  # never evicted
        self.num_cached_pages = 0  # pages held by the tree
        self.num_locked_pages = 0  # pages in locked nodes

    @property
    def num_evictable_pages(self) -> int:
        return self.num_cached_pages - self.num_locked_pages

    def _first(self, key: Sequence, i: int) -> tuple:
        return tuple(key[i : i + self.page_size])

    def match_prefix(self, key: Sequence) -> tuple[list[int], TreeNode]:
        """Pages of the longest cached page-aligned prefix of `key`, and the deepest node of the match."""
        if not self.enabled:
            return [], self.root
        node, pages, i = self.root, [], 0
        ps = self.page_size
        n = len(key) // ps * ps
        while i < n:
            child = node.children.get(self._first(key, i))
            if child is None:
                break
            matched = self._match_len(child.key, key, i)
            if matched < len(child.key):
                child = self._split(child, matched)
            child.last_access = next(_clock)
            pages.extend(child.pages)
            node = child
            i += matched
            if matched < len(child.key):
                break
        return pages, node

    def _match_len(self, node_key: tuple, key: Sequence, start: int) -> int:
        ps = self.page_size
        limit = min(len(node_key), (len(key) - start) // ps * ps)
        j = 0
        while j < limit and tuple(key[start + j : start + j + ps]) == node_key[j : j + ps]:
            j += ps
        return j

    def _split(self, child: TreeNode, at: int) -> TreeNode:
        """Cut `child` after `at` tokens; returns the new upper node."""
        ps = self.page_size
        upper = TreeNode(child.parent, child.key[:at], child.pages[: at // ps])
        upper.lock_ref = child.lock_ref
        upper.last_access = child.last_access
        child.parent.children[self._first(child.key, 0)] = upper
        child.key, child.pages, child.parent = child.key[at:], child.pages[at // ps :], upper
        upper.children[self._first(child.key, 0)] = child
        return upper

    def insert(self, key: Sequence, pages: Sequence[int]) -> int:
        """Cache `pages` (one per page of `key`, page-aligned). Returns how many leading tokens were already
        cached: the caller's pages for that span are duplicates the caller still owns."""
        if not self.enabled:
            return 0
        ps = self.page_size
        n = min(len(key) // ps, len(pages)) * ps
        node, i = self.root, 0
        while i < n:
            child = node.children.get(self._first(key, i))
            if child is None:
                new = TreeNode(node, tuple(key[i:n]), list(pages[i // ps : n // ps]))
                node.children[self._first(key, i)] = new
                self.num_cached_pages += len(new.pages)
                return i
            matched = self._match_len(child.key, key[:n], i)
            if matched < len(child.key):
                child = self._split(child, matched)
            child.last_access = next(_clock)
            node = child
            i += matched
        return n

    def lock(self, node: TreeNode) -> None:
        while node is not self.root:
            if node.lock_ref == 0:
                self.num_locked_pages += len(node.pages)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: TreeNode) -> None:
        while node is not self.root:
            if node.lock_ref <= 0:
                raise RuntimeError("unlock of an unlocked radix node")
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self.num_locked_pages -= len(node.pages)
            node = node.parent

    def evict(self, num_pages: int) -> int:
        """Free at least `num_pages` pages from unlocked leaves, least recently used first. Returns pages freed."""
        heap = [(n.last_access, id(n), n) for n in self._leaves() if n.lock_ref == 0]
        heapq.heapify(heap)
        freed = 0
        while freed < num_pages and heap:
            _, _, node = heapq.heappop(heap)
            self.free_pages(node.pages)
            freed += len(node.pages)
            self.num_cached_pages -= len(node.pages)
            parent = node.parent
            del parent.children[self._first(node.key, 0)]
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        return freed

    def _leaves(self) -> list[TreeNode]:
        out, stack = [], [self.root]
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif node is not self.root:
                out.append(node)
        return out

    def reset(self) -> int:
        """Drop every unlocked node (flush_cache, a restarted worker); returns the pages freed."""
        return self.evict(self.num_cached_pages)
