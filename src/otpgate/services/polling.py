"""The loop shared by the outboxes of outbound calls (LabsMobile ackurl callbacks, webhook
events): claim what is due, send it, and sleep until the next poll or a wake-up."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging

from otpgate.errors import Unavailable

log = logging.getLogger(__name__)


class PollingSender(abc.ABC):
    """Runs :meth:`send_due` in a task until stopped: again at once while it claims something,
    otherwise after ``poll_seconds`` or a :meth:`wake`. Storage being down, or any one bad row,
    never ends the loop. Subclasses set ``task_name`` and ``what`` (for logs)."""

    task_name = "otpgate-poller"
    what = "deliveries"

    def __init__(self, *, poll_seconds: float) -> None:
        self._poll_seconds = poll_seconds
        self._runner: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    @abc.abstractmethod
    async def send_due(self) -> int:
        """Claim what is due and send it; how many were claimed."""

    def start(self) -> None:
        if self._runner is None:
            self._runner = asyncio.create_task(self._run(), name=self.task_name)

    async def stop(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None

    def wake(self) -> None:
        """Something was queued: look now rather than at the next poll."""
        self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                self._wake.clear()
                if not await self.send_due():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self._poll_seconds):
                            await self._wake.wait()
            except asyncio.CancelledError:
                raise
            except Unavailable:
                log.warning("storage unavailable; %s resume shortly", self.what)
                await asyncio.sleep(self._poll_seconds)
            except Exception:  # the loop must outlive any one bad row
                log.exception("%s loop error", self.what)
                await asyncio.sleep(self._poll_seconds)
