"""A request whose client has gone stops: its work is cancelled, so a queued request never takes a slot
and a running one leaves the batch at the next step, its KV room freed.

A streamed answer is watched by the streaming response itself once it starts. Before that (the prompt
queued, chunked or prefilled until every choice's first token), and for the whole of a non-streamed
answer, nothing reads the connection, so this watches it: once the body is read, the next ASGI message
can only be `http.disconnect`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
Receive = Callable[[], Awaitable[dict[str, Any]]]

CLIENT_CLOSED_REQUEST = 499  # nginx's status for it; nobody reads it


class ClientGone(Exception):
    """The client disconnected before its answer was ready; its work was cancelled."""


async def unless_client_leaves(receive: Receive, work: Awaitable[T]) -> T:
    """`work`'s result, or ClientGone once the client disconnects first (`receive`: the request's ASGI
    receive, its body already read). `work` is then cancelled and waited for, so the engine has been
    told to drop the request before this returns. Cancelled itself (a timeout, shutdown), it cancels
    `work` too."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(receive))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # a timeout or shutdown: the work goes too, its cleanup in its own time
        task.cancel()
        task.add_done_callback(_retrieve)
        gone.cancel()
        raise
    left = gone.done() and not gone.cancelled() and gone.exception() is None
    gone.cancel()
    if task.done() or not left:
        return await task  # the answer; or the connection could not be watched: no cancel on a guess
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    logger.info("the client disconnected before its answer: its generation is cancelled")
    raise ClientGone()


async def unless_typed_client_leaves(work: Awaitable[T]) -> T:
    """unless_client_leaves for the typed API request being served (BentoML keeps the request in a
    context variable that every ServiceContext reads)."""
    import bentoml

    return await unless_client_leaves(bentoml.Context().request.receive, work)


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Take a cancelled work's last exception (a failed cleanup), so asyncio does not report it unretrieved."""
    if not task.cancelled() and task.exception() is not None:
        logger.debug("a cancelled request's work failed while stopping", exc_info=task.exception())


async def _disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
