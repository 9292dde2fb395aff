"""A TCP proxy the chaos run controls: it forwards a port to the broker and can cut every connection for a while.

Kafka clients connect to the address the broker advertises, not only to the bootstrap address, so the broker is
started advertising the proxy's port: every byte between the daemon and the broker then passes through here.
"""

from __future__ import annotations

import asyncio
import contextlib


class TcpProxy:
    """Forwards 127.0.0.1:`listen_port` to 127.0.0.1:`target_port`; `cut` severs and refuses for a time."""

    def __init__(self, listen_port: int, target_port: int) -> None:
        self.listen_port = listen_port
        self.target_port = target_port
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._refusing = False

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.listen_port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self._sever()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def cut(self, seconds: float) -> None:
        """Close every connection at once and refuse new ones for `seconds`, as a network partition would."""
        self._refusing = True
        self._sever()
        try:
            await asyncio.sleep(seconds)
        finally:
            self._refusing = False

    def _sever(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        if self._refusing:
            client_writer.transport.abort()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_writer.transport.abort()
            return
        self._writers |= {client_writer, upstream_writer}
        pipes = [
            asyncio.create_task(self._pipe(client_reader, upstream_writer)),
            asyncio.create_task(self._pipe(upstream_reader, client_writer)),
        ]
        self._pipes.update(pipes)
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for writer in (client_writer, upstream_writer):
                writer.transport.abort()
                self._writers.discard(writer)
            for pipe in pipes:
                pipe.cancel()
                self._pipes.discard(pipe)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while chunk := await reader.read(65536):
                writer.write(chunk)
                await writer.drain()
