"""The channel between a supervisor and a worker: every message crosses a real socket pair
whole and in order, and a frame that is cut off, undecodable or not a message says so."""

from __future__ import annotations

import asyncio
import pickle
from typing import get_args

import pytest
from configs import guarded
from socket_pairs import channel

from proxy.control.channel import (
    ChannelError,
    Configure,
    Draining,
    Message,
    Ready,
    Report,
    States,
    Sync,
    Synced,
    UnknownMessage,
    receive,
    send,
)
from proxy.dataplane.outcomes import VersionStats

CONFIG = guarded("127.0.0.1:0")


def two_responses() -> VersionStats:
    stats = VersionStats()
    stats.observe(200, 0.01)
    stats.observe(503, 0.2)
    return stats


def examples() -> list[Message]:
    """One of each message (two of those with a field that may be None)."""
    delta = two_responses().since(VersionStats())
    assert delta is not None
    return [
        Configure(config=CONFIG, states={"shop": (1000, False, 1)}, listen=CONFIG.listen),
        Configure(config=CONFIG, states={}, listen=None),
        States(states={"shop": (0, True, 7)}),
        Sync(number=3),
        Ready(pid=1234),
        Draining(),
        Report(
            stats=[("shop", "canary", 2, delta)],
            rejected={400: 1},
            tallies=[("shop", 7, True, 2, 1, ((22, 2),))],
            connections=3,
        ),
        Synced(number=3),
    ]


def frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def test_the_examples_hold_every_kind_of_message() -> None:
    assert {type(message) for message in examples()} == set(get_args(Message))


async def test_every_message_crosses_a_socket_pair_whole_equal_and_in_order() -> None:
    messages = examples()
    async with channel() as (_, writer, reader, _):
        for message in messages:
            send(writer, message)
        received = [await asyncio.wait_for(receive(reader), timeout=5) for _ in messages]
    assert received == messages
    assert [type(message) for message in received] == [type(message) for message in messages]


async def test_a_message_larger_than_one_read_of_the_socket_arrives_whole() -> None:
    large = States(states={f"route{i:06}": (i, False, i) for i in range(100_000)})
    async with channel() as (_, writer, reader, _):
        send(writer, large)
        send(writer, Sync(number=1))
        assert await asyncio.wait_for(receive(reader), timeout=5) == large
        assert await asyncio.wait_for(receive(reader), timeout=5) == Sync(number=1)


def test_messages_are_frozen() -> None:
    sync = Sync(number=1)
    with pytest.raises(AttributeError):
        sync.number = 2  # type: ignore[misc]


async def test_receiving_from_a_side_that_has_gone_raises_incomplete_read() -> None:
    async with channel() as (_, writer, reader, _):
        send(writer, States(states={}))
        writer.close()
        assert await receive(reader) == States(states={})
        with pytest.raises(asyncio.IncompleteReadError):
            await receive(reader)


@pytest.mark.parametrize(
    "cut",
    [
        pytest.param(frame(b"x" * 100)[:13], id="mid-body"),
        pytest.param(b"\x00\x00", id="mid-length"),
    ],
)
async def test_a_message_cut_off_mid_frame_is_an_incomplete_read(cut: bytes) -> None:
    async with channel() as (_, writer, reader, _):
        writer.write(cut)
        writer.close()
        with pytest.raises(asyncio.IncompleteReadError):
            await receive(reader)


@pytest.mark.parametrize(
    ("body", "error", "says"),
    [
        pytest.param(
            pickle.dumps(("states", {})), UnknownMessage, "a tuple, not a message", id="a-tuple"
        ),
        pytest.param(pickle.dumps(None), UnknownMessage, "a NoneType, not a message", id="none"),
        pytest.param(b"not a pickle", ChannelError, "12 bytes that cannot be decoded", id="junk"),
        pytest.param(b"", ChannelError, "0 bytes that cannot be decoded", id="empty"),
    ],
)
async def test_a_frame_that_is_not_a_message_is_refused_and_the_next_one_is_read(
    body: bytes, error: type[ChannelError], says: str
) -> None:
    async with channel() as (_, writer, reader, _):
        writer.write(frame(body))
        send(writer, Ready(pid=1))
        with pytest.raises(error, match=says):
            await receive(reader)
        assert await receive(reader) == Ready(pid=1)  # still in step
