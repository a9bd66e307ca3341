"""The encoder cache's pages (Llama 3.2 Vision's cross-attention K/V, one image per page), keyed by the image's
content key and reference-counted: sequences showing the same image share its page, the last holder frees it."""

from __future__ import annotations


class EncoderPages:
    def __init__(self, num_pages: int):
        self.free_pages = list(range(num_pages - 1, 0, -1))  # page 0 is never handed out
        self.pages: dict[str, int] = {}  # content key -> its page
        self.refs: dict[str, int] = {}  # content key -> holders

    @property
    def num_free(self) -> int:
        return len(self.free_pages)

    def holds(self, key: str) -> bool:
        return key in self.pages

    def acquire(self, keys: list[str]) -> list[int] | None:
        """A page per key (in order), shared with earlier holders of the same key; None, taking nothing, when the
        free pages do not cover the keys not held yet."""
        fresh = {k for k in keys if k not in self.pages}
        if len(fresh) > len(self.free_pages):
            return None
        for k in fresh:
            self.pages[k] = self.free_pages.pop()
        for k in keys:
            self.refs[k] = self.refs.get(k, 0) + 1
        return [self.pages[k] for k in keys]

    def release(self, keys: list[str]) -> None:
        for k in keys:
            self.refs[k] -= 1
            if self.refs[k] == 0:
                del self.refs[k]
                self.free_pages.append(self.pages.pop(k))
