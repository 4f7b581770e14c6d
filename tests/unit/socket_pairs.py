"""Both ends of a Unix socket pair as asyncio streams, as a supervisor and a worker hold them."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator


@contextlib.asynccontextmanager
async def channel() -> AsyncIterator[
    tuple[asyncio.StreamReader, asyncio.StreamWriter, asyncio.StreamReader, asyncio.StreamWriter]
]:
    """Both ends of a socket pair as streams: (reader, writer) of one side, then the other's."""
    ours, theirs = socket.socketpair()
    our_reader, our_writer = await asyncio.open_unix_connection(sock=ours)
    their_reader, their_writer = await asyncio.open_unix_connection(sock=theirs)
    try:
        yield our_reader, our_writer, their_reader, their_writer
    finally:
        for writer in (our_writer, their_writer):
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
