"""unless_client_leaves: the answer when the client stays, the work cancelled (and finished) when it
leaves, no cancel on a guess, and nothing left unretrieved when the request itself is cancelled."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest

from shardbento.api.disconnect import ClientGone, unless_client_leaves


class Connection:
    """An ASGI receive after the body: blocks until the test disconnects it (or makes it fail)."""

    def __init__(self) -> None:
        self.lost, self.failed = asyncio.Event(), asyncio.Event()
        self.broken: Exception | None = None

    async def receive(self) -> dict[str, Any]:
        await self.lost.wait()
        if self.broken is not None:
            self.failed.set()
            raise self.broken
        return {"type": "http.disconnect"}


class Work:
    """A generation that answers when released, and records how it ended."""

    def __init__(self, fail_on_cancel: bool = False) -> None:
        self.started, self.release, self.ended = asyncio.Event(), asyncio.Event(), ""
        self.fail_on_cancel = fail_on_cancel

    async def run(self) -> str:
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.ended = "cancelled"
            if self.fail_on_cancel:
                raise RuntimeError("cleanup failed") from None
            raise
        self.ended = "answered"
        return "answer"


def test_the_answer_when_the_client_stays() -> None:
    async def main() -> None:
        connection, work = Connection(), Work()
        work.release.set()
        assert await unless_client_leaves(connection.receive, work.run()) == "answer"

    asyncio.run(main())


@pytest.mark.parametrize("fail_on_cancel", [False, True])
def test_a_client_that_leaves_cancels_the_work_before_the_call_returns(fail_on_cancel: bool) -> None:
    async def main() -> None:
        connection, work = Connection(), Work(fail_on_cancel)
        call = asyncio.ensure_future(unless_client_leaves(connection.receive, work.run()))
        await work.started.wait()
        connection.lost.set()
        with pytest.raises(ClientGone):
            await call
        assert work.ended == "cancelled"  # the engine was told before the route answers

    asyncio.run(main())


def test_a_connection_that_cannot_be_watched_cancels_nothing() -> None:
    async def main() -> None:
        connection, work = Connection(), Work()
        call = asyncio.ensure_future(unless_client_leaves(connection.receive, work.run()))
        await work.started.wait()
        connection.broken = OSError("receive failed")
        connection.lost.set()
        await connection.failed.wait()
        for _ in range(3):  # the watch's task ends and the call sees it, before the work answers
            await asyncio.sleep(0)
        work.release.set()
        assert await call == "answer"

    asyncio.run(main())


def test_a_cancelled_request_cancels_its_work_and_leaves_no_error_unretrieved() -> None:
    unretrieved: list[dict[str, Any]] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: unretrieved.append(context))
        connection, work = Connection(), Work(fail_on_cancel=True)
        call = asyncio.ensure_future(unless_client_leaves(connection.receive, work.run()))
        await work.started.wait()
        call.cancel()  # a response timeout, or shutdown
        with pytest.raises(asyncio.CancelledError):
            await call
        for _ in range(3):
            await asyncio.sleep(0)
        assert work.ended == "cancelled"
        gc.collect()

    asyncio.run(main())
    gc.collect()
    assert not unretrieved
