"""A loopback TCP proxy that can make the server behind it hang, and recover.

Put it between otpgate and PostgreSQL to play a database that stops answering (a network
partition, a stuck server): :meth:`TcpProxy.hang` keeps every connection open but passes no
byte either way, and new connections are accepted and then left hanging too;
:meth:`TcpProxy.recover` drops the hanging connections and passes traffic again.
"""

from __future__ import annotations

import asyncio
import contextlib


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._passing = asyncio.Event()
        self._passing.set()
        self._connections: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def hang(self) -> None:
        self._passing.clear()

    def recover(self) -> None:
        """Drop the connections that hung (their peers see them reset) and pass again."""
        for task in list(self._connections):
            task.cancel()
        self._passing.set()

    async def aclose(self) -> None:
        self.recover()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._connections):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            await self._passing.wait()
            upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
            await asyncio.gather(
                self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer)
            )
        except (OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # dropped by recover(): end quietly, the peers see the connection close
        finally:
            self._connections.discard(task)
            for w in (writer, upstream_writer):
                if w is not None:
                    w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                writer.close()
                return
            await self._passing.wait()  # while hanging, bytes wait here: nobody answers
            writer.write(data)
            await writer.drain()
