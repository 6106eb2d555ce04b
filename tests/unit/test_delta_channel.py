"""DeltaChannel: a whole step's Deltas reach their event loops at once; a closed loop is reported."""

from __future__ import annotations

import asyncio

from shardbento.engine.base import Delta, DeltaChannel


def test_delta_channel_emit_all_delivers_and_reports_closed_loops() -> None:
    async def channels() -> tuple[DeltaChannel, DeltaChannel]:
        return DeltaChannel(), DeltaChannel()

    loop = asyncio.new_event_loop()
    first, second = loop.run_until_complete(channels())
    gone_loop = asyncio.new_event_loop()
    orphan = gone_loop.run_until_complete(channels())[0]
    gone_loop.close()
    items = [(first, Delta("a", finish_reason="stop")), (second, Delta("b", finish_reason="stop"))]
    assert DeltaChannel.emit_all([*items, (orphan, Delta("c"))]) == [orphan]

    async def drain() -> list[str]:
        return ["".join([d.text async for d in channel.deltas()]) for channel in (first, second)]

    assert loop.run_until_complete(drain()) == ["a", "b"]
    loop.close()
