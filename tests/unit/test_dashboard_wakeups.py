"""The dashboard's wake-ups: a stream never misses a notice that arrives while it reads."""

from __future__ import annotations

import time

import anyio

from pgml_tuned.dashboard.server import Wakeups, sse


def test_a_notice_during_a_read_is_not_missed() -> None:
    async def go() -> None:
        w = Wakeups()
        seen = w.count
        w.wake()  # arrives while the stream was reading rows
        t0 = time.monotonic()
        assert await w.wait(seen, 30) == seen + 1  # at once, not after 30 s
        assert time.monotonic() - t0 < 1
        # nothing new: it waits for the next notice, or gives up after at_most seconds
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: _wake_later(w, 0.05))
            assert await w.wait(w.count, 30) == seen + 2
        t0 = time.monotonic()
        assert await w.wait(w.count, 0.05) == seen + 2
        assert time.monotonic() - t0 >= 0.05

    anyio.run(go)


async def _wake_later(w: Wakeups, delay: float) -> None:
    await anyio.sleep(delay)
    w.wake()


def test_an_event_is_one_line_of_json() -> None:
    assert sse("logs", {"text": "a\nb"}) == 'event: logs\ndata: {"text":"a\\nb"}\n\n'
