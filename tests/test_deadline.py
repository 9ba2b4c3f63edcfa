"""relay.deadline: one lazily re-armed timer serves a connection's many waits."""

import asyncio

from relay.deadline import Deadline


def test_expires_a_wait_that_outlives_its_deadline_and_only_that():
    async def go():
        loop = asyncio.get_running_loop()
        fired: list[float] = []
        d = Deadline(loop, lambda: fired.append(loop.time()))
        # Waits that end in time never fire, however many there are.
        for _ in range(50):
            d.start(loop.time() + 0.2)
            await asyncio.sleep(0.002)
            d.stop()
        assert fired == []
        # One that outlives its deadline fires once, not before the deadline.
        start = loop.time()
        d.start(start + 0.15)
        await asyncio.sleep(0.4)
        assert len(fired) == 1 and fired[0] >= start + 0.149
        d.close()
    asyncio.run(go())


def test_a_later_deadline_reuses_the_timer_an_earlier_one_rearms_it():
    async def go():
        loop = asyncio.get_running_loop()
        fired: list[str] = []
        d = Deadline(loop, lambda: fired.append("x"))
        d.start(loop.time() + 0.1)
        d.stop()
        t = loop.time()
        d.start(t + 0.3)          # later than the armed timer: it fires early, re-arms
        await asyncio.sleep(0.2)
        assert fired == []
        await asyncio.sleep(0.2)
        assert fired == ["x"]
        d.start(loop.time() + 5)  # armed far out...
        d.stop()
        d.start(loop.time() + 0.05)   # ...an earlier deadline must not wait for it
        await asyncio.sleep(0.2)
        assert fired == ["x", "x"]
        d.close()
    asyncio.run(go())


def test_close_leaves_nothing_armed():
    async def go():
        loop = asyncio.get_running_loop()
        fired: list[int] = []
        d = Deadline(loop, lambda: fired.append(1))
        d.start(loop.time() + 0.05)
        d.close()
        await asyncio.sleep(0.15)
        assert fired == []
    asyncio.run(go())
