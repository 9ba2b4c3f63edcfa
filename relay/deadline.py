"""One lazily re-armed timer per connection for the timeouts of its waits.

Takes an event loop and what to do when a wait outlives its deadline; used by the
inbound connection (relay.smtp.connection) and the outbound one (relay.delivery.client)
around each read or drain. A loop timer per wait (call_at, then cancel) cost more than
parsing the command it guarded, and a session waits several times per message. Here a
wait only records its deadline; the one timer is armed for the earliest deadline and,
when it fires early (the connection has moved on to a later deadline), re-armed once.
So a busy connection arms about one timer per timeout period, not one per command.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Deadline:
    __slots__ = ("_loop", "_expire", "_when", "_timer", "_armed_for")

    def __init__(self, loop: asyncio.AbstractEventLoop, expire: Callable[[], None]):
        self._loop = loop
        self._expire = expire
        self._when: float | None = None       # the current wait's deadline (loop time)
        self._timer: asyncio.TimerHandle | None = None
        self._armed_for = 0.0

    def start(self, when: float) -> None:
        """A wait begins that must end by `when`."""
        self._when = when
        if self._timer is None or self._armed_for > when:
            if self._timer is not None:
                self._timer.cancel()
            self._arm(when)

    def stop(self) -> None:
        """The wait ended in time (the timer stays armed for the next one)."""
        self._when = None

    def close(self) -> None:
        self._when = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self, when: float) -> None:
        self._timer = self._loop.call_at(when, self._fire)
        self._armed_for = when

    def _fire(self) -> None:
        self._timer = None
        when = self._when
        if when is None:
            return                  # no wait in progress: the next one arms again
        # A millisecond of slack: loop timers may run a hair before loop.time() says.
        if self._loop.time() + 0.001 >= when:
            self._when = None
            self._expire()
        else:
            self._arm(when)
