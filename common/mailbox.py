"""A single-consumer inbox for asyncio: producers append without awaiting, the consumer takes everything queued at
once (a list and one future per wake-up, lighter than an asyncio.Queue's per-item waiters)."""

from __future__ import annotations

import asyncio


class Mailbox:
    __slots__ = ("items", "waiter")

    def __init__(self):
        self.items: list = []
        self.waiter: asyncio.Future | None = None

    def put_nowait(self, item) -> None:
        self.items.append(item)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def take_all(self) -> list:
        """Everything queued (waiting for the first item if there is none)."""
        while not self.items:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        items, self.items = self.items, []
        return items
