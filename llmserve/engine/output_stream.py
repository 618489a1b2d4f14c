"""One request's outputs on their way from the API server's output handler to whoever reads them.

The handler (:meth:`~llmserve.engine.async_engine.AsyncLLMEngine._on_core_output`) ``put``s each output as a
step's message is processed. A reader either iterates the stream (a task that wakes once per output) or
hands it a callback (:meth:`OutputStream.deliver_to`), which the handler then calls in place: a streaming
HTTP response writes its events from there, so a streamed token costs no task wake-up, no queue and no
chain of async generators on its way to the socket.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Union

from llmserve.outputs import EmbeddingRequestOutput, RequestOutput

StreamItem = Union[RequestOutput, EmbeddingRequestOutput, BaseException]


class OutputStream:
    """Iterated: each output in order, a finished one last; an exception put on the stream is raised. A
    reader that stops before the request finished aborts it itself (``AsyncLLMEngine.abort``)."""

    __slots__ = ("_items", "_waiter", "_callback", "_ended")

    def __init__(self) -> None:
        self._items: deque[StreamItem] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._callback: Callable[[StreamItem], None] | None = None
        self._ended = False

    def put(self, item: StreamItem) -> None:
        if self._callback is not None:
            self._callback(item)
            return
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def deliver_to(self, callback: Callable[[StreamItem], None]) -> None:
        """From now on hand each item to ``callback`` when it is put (on the event loop, synchronously), the
        items already waiting first. The stream is no longer iterated."""
        self._callback = callback
        while self._items:
            callback(self._items.popleft())

    def __aiter__(self) -> OutputStream:
        return self

    async def __anext__(self) -> RequestOutput | EmbeddingRequestOutput:
        if self._ended:
            raise StopAsyncIteration
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._items.popleft()
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        self._ended = item.finished
        return item
