"""A gRPC ADS stream as Envoy drives it, for the protocol tests: requests in, responses out."""

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any


class StreamClient:
    def __init__(self, open_stream: Callable[[AsyncIterator[Any]], Any]) -> None:
        self.requests: asyncio.Queue[Any] = asyncio.Queue()
        self.call = open_stream(self._requests())
        self.responses: asyncio.Queue[Any] = asyncio.Queue()
        # One reader for the stream's life: cancelling a pending read would cancel the whole call.
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for response in self.call:
                await self.responses.put(response)
        except Exception as error:
            await self.responses.put(error)

    async def _requests(self) -> AsyncIterator[Any]:
        while (request := await self.requests.get()) is not None:
            yield request

    async def receive(self, timeout_s: float = 2.0) -> Any:
        item = await asyncio.wait_for(self.responses.get(), timeout_s)
        if isinstance(item, Exception):
            raise item
        return item

    async def nothing_within(self, seconds: float) -> bool:
        """True if no response arrives in `seconds` (absence has no event to wait on)."""
        try:
            await asyncio.wait_for(self.responses.get(), seconds)
        except TimeoutError:
            return True
        return False

    async def close(self) -> None:
        await self.requests.put(None)
        self.reader.cancel()
