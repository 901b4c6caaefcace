"""ConsolidatedModbusServer under hostile and careless peers: raw sockets and pymodbus on 127.0.0.1.

What the Modbus Messaging on TCP/IP Implementation Guide (V1.0b) asks of a server, and what a
controller whose event loop also drives the inverter needs: an MBAP header that cannot be trusted
(protocol id not 0, a length outside 2..254 or at odds with the request) closes the connection; a
well-framed request the server refuses is answered with FC | 0x80 and the exception code; idle
connections time out and connections are capped, so no peer can hold the loop's sockets for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.constants import ExcCodes

from controller.modbus_server import SUNSPEC_BASE_ADDRESS, ConsolidatedModbusServer, answer, image_length
from shared.controller_config import ModbusServerConfig
from tests.controller.frames.states import state
from tests.sim.helpers import LOOPBACK, free_port, quiet_pymodbus, wait_until

OTHER_LOOPBACK = "127.0.0.2"  # Linux routes all of 127/8 to lo: a second client address without setup
CLIENT_TIMEOUT_S = 1.0
IDLE_S = 0.4  # idle_timeout_s of the servers here, unless a test says otherwise
# How long past its deadline a close may come: the loop is shared with the test and 2 cores with others.
SLACK_S = 1.5
# A reply the server owes arrives within this; a connection the server closes "at once" closes within it.
PROMPT_S = 1.0
END_ADDRESS = SUNSPEC_BASE_ADDRESS + image_length()  # first address past the map

ServerFactory = Callable[..., Awaitable[ConsolidatedModbusServer]]


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    with quiet_pymodbus():
        yield


@pytest.fixture
async def make_server() -> AsyncIterator[ServerFactory]:
    """Start servers on free 127.0.0.1 ports: ``await make_server(idle_timeout_s=..., ...)``."""
    made: list[ConsolidatedModbusServer] = []

    async def make(**overrides: Any) -> ConsolidatedModbusServer:
        fields: dict[str, Any] = {"enabled": True, "host": LOOPBACK, "port": free_port(),
                                  "allowed_clients": (LOOPBACK, OTHER_LOOPBACK), "idle_timeout_s": IDLE_S}
        fields.update(overrides)
        server = ConsolidatedModbusServer(ModbusServerConfig(**fields))
        made.append(server)
        await server.start()
        return server

    yield make
    for server in made:
        await server.stop()


# -- raw Modbus TCP -------------------------------------------------------------------------------
def frame(pdu: bytes, *, tid: int = 1, unit: int = 1, protocol: int = 0, length: int | None = None) -> bytes:
    """An MBAP frame around ``pdu``; ``length`` overrides the MBAP length field (a lying client)."""
    return struct.pack(">HHHB", tid, protocol, len(pdu) + 1 if length is None else length, unit) + pdu


def read_pdu(address: int, count: int, function_code: int = 3) -> bytes:
    return struct.pack(">BHH", function_code, address, count)


def exception_frame(function_code: int, code: int, *, tid: int = 1, unit: int = 1) -> bytes:
    """The exact reply the spec asks for: MBAP length 3, FC | 0x80, the exception code."""
    return frame(bytes([function_code | 0x80, code]), tid=tid, unit=unit)


class Raw:
    """One TCP connection speaking bytes, for what pymodbus's client would never send."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, source: str | None = None) -> Raw:
        reader, writer = await asyncio.open_connection(
            LOOPBACK, port, local_addr=(source, 0) if source else None)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            await self.writer.drain()

    async def reply(self, timeout_s: float = PROMPT_S) -> bytes:
        """One whole MBAP frame from the server (header and the bytes its length announces)."""
        header = await asyncio.wait_for(self.reader.readexactly(7), timeout_s)
        length = struct.unpack_from(">H", header, 4)[0]
        return header + await asyncio.wait_for(self.reader.readexactly(length - 1), timeout_s)

    async def closed_within(self, timeout_s: float) -> tuple[bytes, float]:
        """(every byte received until EOF, seconds it took); AssertionError if still open after timeout_s."""
        started = time.monotonic()
        received = b""
        try:
            while chunk := await asyncio.wait_for(self.reader.read(4096), timeout_s):
                received += chunk
        except (ConnectionResetError, BrokenPipeError):  # closed while we were still sending
            pass
        except TimeoutError:
            raise AssertionError(f"still open after {timeout_s} s (received {received.hex()})") from None
        return received, time.monotonic() - started

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            await self.writer.wait_closed()


@contextlib.asynccontextmanager
async def raw(server: ConsolidatedModbusServer, source: str | None = None) -> AsyncIterator[Raw]:
    conn = await Raw.connect(server.config.port, source)
    try:
        yield conn
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def client_of(
    server: ConsolidatedModbusServer, source: str | None = None
) -> AsyncIterator[AsyncModbusTcpClient]:
    client = AsyncModbusTcpClient(
        LOOPBACK, port=server.config.port, timeout=CLIENT_TIMEOUT_S, retries=0, reconnect_delay=0,
        source_address=(source, 0) if source else None,
    )
    try:
        assert await client.connect()
        yield client
    finally:
        client.close()


async def read_ok(client: AsyncModbusTcpClient) -> bool:
    response = await client.read_holding_registers(SUNSPEC_BASE_ADDRESS, count=2, device_id=1)
    return not response.isError() and list(response.registers) == [0x5375, 0x6E53]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- idle connections -----------------------------------------------------------------------------
async def test_an_idle_connection_is_closed_after_idle_timeout(make_server: ServerFactory) -> None:
    server = await make_server()
    server.update(state())
    async with raw(server) as conn:
        received, took = await conn.closed_within(IDLE_S + SLACK_S)
    assert received == b""
    assert took >= IDLE_S * 0.9  # not at once: the timeout, not some other rule, closed it
    assert server.counters["idle_timeouts"] == 1


async def test_requests_keep_a_connection_open_past_the_idle_timeout(make_server: ServerFactory) -> None:
    server = await make_server()
    server.update(state())
    async with client_of(server) as client:
        for _ in range(8):  # 8 × IDLE_S / 4 = twice the timeout
            assert await read_ok(client)
            await asyncio.sleep(IDLE_S / 4)
        assert client.connected
    assert server.counters["idle_timeouts"] == 0


async def test_a_frame_trickled_slower_than_the_idle_timeout_is_closed(make_server: ServerFactory) -> None:
    """Bytes that never make a whole request are no activity: a slow-drip client cannot hold a slot."""
    server = await make_server()
    server.update(state())
    request = frame(read_pdu(SUNSPEC_BASE_ADDRESS, 2))
    async with raw(server) as conn:
        started = time.monotonic()
        for byte in request[:-1]:
            await conn.send(bytes([byte]))
            await asyncio.sleep(IDLE_S / 5)
        received, _ = await conn.closed_within(IDLE_S + SLACK_S)
        took = time.monotonic() - started
    assert received == b""
    assert took < (len(request) - 1) * IDLE_S / 5 + SLACK_S
    assert server.counters["idle_timeouts"] == 1
    assert server.counters["reads"] == 0


async def test_500_idle_sockets_are_all_closed_after_the_timeout(make_server: ServerFactory) -> None:
    idle_s = 1.0
    server = await make_server(idle_timeout_s=idle_s, max_connections=256)
    server.update(state())
    before = open_fds()
    conns = [await Raw.connect(server.config.port) for _ in range(500)]
    try:
        # The server's side of every connection is gone: only our 500 client sockets remain open.
        await wait_until(lambda: open_fds() == before + 500, idle_s + 10.0,
                         "the server to close all 500 connections")
        assert server.open_connections == 0
        for conn in conns:
            received, _ = await conn.closed_within(PROMPT_S)  # each one saw EOF
            assert received == b""
    finally:
        for conn in conns:
            await conn.close()
    # The first 256 were admitted and timed out, the rest closed at once (a few more may have
    # been admitted if an early one timed out while the test was still connecting).
    assert server.counters["connections"] + server.counters["over_limit"] == 500
    assert server.counters["idle_timeouts"] == server.counters["connections"] >= 256
    assert open_fds() == before


async def test_a_peer_that_never_reads_its_replies_is_dropped(make_server: ServerFactory) -> None:
    """Replies pile up unread beyond every buffer: the server stops reading, then times the peer out."""
    server = await make_server()
    server.update(state())
    count = 80_000  # ~20 MB of replies: more than the loopback socket buffers hold
    requests = b"".join(frame(read_pdu(SUNSPEC_BASE_ADDRESS, 125), tid=i & 0xFFFF) for i in range(count))
    conn = await Raw.connect(server.config.port)
    try:
        conn.writer.write(requests)  # never drained, and nothing is ever read
        await wait_until(lambda: server.counters["reads"] > 0, PROMPT_S, "the first read")
        await wait_until(lambda: server.open_connections == 0, 2 * IDLE_S + 3 * SLACK_S,
                         "the server to drop the peer")
    finally:
        conn.writer.transport.abort()
    assert 0 < server.counters["reads"] < count  # it stopped reading requests it could not answer
    assert server.counters["idle_timeouts"] == 1


# -- the connection cap ---------------------------------------------------------------------------
async def test_a_connection_beyond_max_connections_is_closed_and_counted(make_server: ServerFactory) -> None:
    server = await make_server(max_connections=2, idle_timeout_s=30.0)
    server.update(state())
    async with client_of(server) as first, client_of(server, OTHER_LOOPBACK) as second:
        assert await read_ok(first)
        assert await read_ok(second)
        async with raw(server) as third:
            await third.send(frame(read_pdu(SUNSPEC_BASE_ADDRESS, 2)))
            received, _ = await third.closed_within(PROMPT_S)  # at once, not after the 30 s timeout
        assert received == b""
        assert server.counters["over_limit"] == 1
        assert await read_ok(first)  # the two admitted clients are untouched
        assert await read_ok(second)
        assert server.open_connections == 2
    await wait_until(lambda: server.open_connections == 0, PROMPT_S, "the server to see both leave")
    async with client_of(server) as again:  # a freed slot is taken by the next client
        assert await read_ok(again)
    assert server.counters["connections"] == 3


async def test_refused_clients_take_no_slot(make_server: ServerFactory) -> None:
    server = await make_server(max_connections=1, allowed_clients=(OTHER_LOOPBACK,), idle_timeout_s=30.0)
    server.update(state())
    for _ in range(3):
        async with raw(server) as refused:
            received, _ = await refused.closed_within(PROMPT_S)
        assert received == b""
    async with client_of(server, OTHER_LOOPBACK) as client:
        assert await read_ok(client)
    assert (server.counters["refused_clients"], server.counters["over_limit"]) == (3, 0)


# -- MBAP framing ---------------------------------------------------------------------------------
READ = read_pdu(SUNSPEC_BASE_ADDRESS, 2)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(frame(READ, protocol=1), id="protocol-id-1"),
        pytest.param(frame(READ, protocol=0xFFFF), id="protocol-id-ffff"),
        pytest.param(frame(READ, length=0), id="length-0"),
        pytest.param(frame(b"", length=1), id="length-1-unit-only"),
        pytest.param(frame(READ + bytes(250), length=255), id="length-255-pdu-over-253"),
        pytest.param(frame(READ, length=0xFFFF), id="length-ffff"),
        pytest.param(frame(READ[:2], length=3), id="fc3-length-short"),
        pytest.param(frame(READ + b"\x00", length=7), id="fc3-length-long"),
        pytest.param(frame(read_pdu(SUNSPEC_BASE_ADDRESS, 2, 4)[:4]), id="fc4-pdu-short"),
        pytest.param(frame(b"\x00"), id="function-code-0"),
        pytest.param(frame(b"\x83\x02"), id="function-code-0x83"),
    ],
)
async def test_an_mbap_frame_that_cannot_be_trusted_closes_the_connection(
    make_server: ServerFactory, data: bytes
) -> None:
    server = await make_server(idle_timeout_s=30.0)  # a close must come from the framing rule
    server.update(state())
    async with raw(server) as conn:
        await conn.send(data)
        received, _ = await conn.closed_within(PROMPT_S)
    assert received == b""
    assert server.counters["malformed"] == 1
    assert server.counters["reads"] == 0


async def test_a_length_announcing_more_than_is_sent_never_hangs(make_server: ServerFactory) -> None:
    """length 20 within the limit, but 6 bytes follow: the server waits for the rest, then times out."""
    server = await make_server()
    server.update(state())
    async with raw(server) as conn:
        await conn.send(frame(READ, length=20))
        received, _ = await conn.closed_within(IDLE_S + SLACK_S)
    assert received == b""
    assert server.counters["idle_timeouts"] == 1


async def test_a_bad_frame_after_good_ones_is_answered_up_to_the_bad_one(make_server: ServerFactory) -> None:
    server = await make_server(idle_timeout_s=30.0)
    server.update(state())
    async with raw(server) as conn:
        await conn.send(frame(READ, tid=7) + frame(READ, tid=8, protocol=5) + frame(READ, tid=9))
        received, _ = await conn.closed_within(PROMPT_S)
    assert received == frame(bytes([3, 4, 0x53, 0x75, 0x6E, 0x53]), tid=7)
    assert (server.counters["reads"], server.counters["malformed"]) == (1, 1)


async def test_a_torn_frame_is_answered(make_server: ServerFactory) -> None:
    server = await make_server(idle_timeout_s=5.0)
    server.update(state())
    requests = frame(READ, tid=0x1234) + frame(read_pdu(SUNSPEC_BASE_ADDRESS + 2, 2, 4), tid=0x1235)
    async with raw(server) as conn:
        start = 0
        for cut in (1, 2, 5, 7, 8, 12, 14, 20, len(requests)):  # pieces across both frames' fields
            await conn.send(requests[start:cut])
            start = cut
            await asyncio.sleep(0.02)
        assert await conn.reply() == frame(bytes([3, 4, 0x53, 0x75, 0x6E, 0x53]), tid=0x1234)
        assert await conn.reply() == frame(bytes([4, 4, 0, 1, 0, 66]), tid=0x1235)
    assert server.counters["reads"] == 2


async def test_pipelined_requests_are_answered_in_order_even_when_the_reader_lags(
    make_server: ServerFactory,
) -> None:
    """Replies far beyond the socket buffers: the server stops reading while its replies back up."""
    server = await make_server(idle_timeout_s=5.0)
    server.update(state())
    count = 2000
    requests = b"".join(frame(read_pdu(SUNSPEC_BASE_ADDRESS, 125), tid=i) for i in range(count))
    async with raw(server) as conn:
        sending = asyncio.create_task(conn.send(requests), name="pipelined-send")
        await asyncio.sleep(0.2)  # let the replies pile up unread
        tids = [struct.unpack_from(">H", await conn.reply(5.0))[0] for _ in range(count)]
        await sending
    assert tids == list(range(count))
    assert server.counters["reads"] == count


# -- refused requests: FC | 0x80 and the right exception code ------------------------------------
@pytest.mark.parametrize(
    "pdu",
    [
        pytest.param(bytes([0x2B, 0x0E, 0x01, 0x00]), id="0x2B-read-device-identification"),
        pytest.param(bytes([0x11]), id="0x11-report-server-id"),
        pytest.param(bytes([0x07]), id="0x07-read-exception-status"),
        pytest.param(bytes([0x08, 0x00, 0x00, 0x12, 0x34]), id="0x08-diagnostics"),
        pytest.param(bytes([0x41, 0x01, 0x02]), id="0x41-user-defined"),
        pytest.param(bytes([0x7F]), id="0x7F"),
        pytest.param(read_pdu(SUNSPEC_BASE_ADDRESS, 2, 1), id="0x01-read-coils"),
        pytest.param(bytes([0x06, 0x9C, 0x40, 0x00, 0x01]), id="0x06-write-register"),
    ],
)
async def test_an_unsupported_function_is_illegal_function_with_fc_or_0x80(
    make_server: ServerFactory, pdu: bytes
) -> None:
    server = await make_server(idle_timeout_s=30.0)
    server.update(state())
    async with raw(server) as conn:
        await conn.send(frame(pdu, tid=0xBEEF))
        assert await conn.reply() == exception_frame(pdu[0], 1, tid=0xBEEF)
        await conn.send(frame(READ, tid=2))  # the connection stays usable
        assert await conn.reply() == frame(bytes([3, 4, 0x53, 0x75, 0x6E, 0x53]), tid=2)
    assert server.counters["functions_refused"] + server.counters["writes_refused"] == 1


async def test_pymodbus_sees_fc_or_0x80_for_refused_functions(make_server: ServerFactory) -> None:
    server = await make_server(idle_timeout_s=30.0)
    server.update(state())
    async with client_of(server) as client:
        responses = {
            0x2B: await client.read_device_information(),
            0x11: await client.report_device_id(),
            0x07: await client.read_exception_status(),
        }
    for function_code, response in responses.items():
        assert response.isError(), (function_code, response)
        assert (response.function_code, response.exception_code) == (
            function_code | 0x80, ExcCodes.ILLEGAL_FUNCTION)
    assert server.counters["functions_refused"] == 3


@pytest.mark.parametrize("function_code", [3, 4])
@pytest.mark.parametrize("count", [0, 126, 0xFFFF])
async def test_a_bad_quantity_is_illegal_data_value(
    make_server: ServerFactory, function_code: int, count: int
) -> None:
    server = await make_server(idle_timeout_s=30.0)
    server.update(state())
    async with raw(server) as conn:
        await conn.send(frame(read_pdu(SUNSPEC_BASE_ADDRESS, count, function_code), unit=1, tid=9))
        assert await conn.reply() == exception_frame(function_code, 3, tid=9)
    assert server.counters["reads_invalid"] == 1


@pytest.mark.parametrize("function_code", [3, 4])
@pytest.mark.parametrize(
    ("address", "count"),
    [(0, 1), (SUNSPEC_BASE_ADDRESS - 1, 2), (END_ADDRESS - 1, 2), (END_ADDRESS, 1), (0xFFFF, 125)],
)
async def test_an_address_outside_the_map_is_illegal_data_address(
    make_server: ServerFactory, function_code: int, address: int, count: int
) -> None:
    server = await make_server(idle_timeout_s=30.0)
    server.update(state())
    async with raw(server) as conn:
        await conn.send(frame(read_pdu(address, count, function_code), tid=3))
        assert await conn.reply() == exception_frame(function_code, 2, tid=3)
        # The whole map, and its last register, are in it.
        await conn.send(frame(read_pdu(END_ADDRESS - 1, 1, function_code), tid=4))
        assert await conn.reply() == frame(bytes([function_code, 2, 0, 0]), tid=4)
    assert (server.counters["reads_invalid"], server.counters["reads"]) == (1, 1)


async def test_pymodbus_sees_the_exception_codes_of_bad_reads(make_server: ServerFactory) -> None:
    server = await make_server(idle_timeout_s=30.0)
    server.update(state())
    async with client_of(server) as client:  # (pymodbus's client refuses to send a bad quantity)
        below = await client.read_holding_registers(0, count=2)
        outside = await client.read_input_registers(END_ADDRESS - 1, count=2)
        foreign = await client.read_holding_registers(SUNSPEC_BASE_ADDRESS, count=2, device_id=9)
    assert (below.function_code, below.exception_code) == (0x83, ExcCodes.ILLEGAL_ADDRESS)
    assert (outside.function_code, outside.exception_code) == (0x84, ExcCodes.ILLEGAL_ADDRESS)
    assert (foreign.function_code, foreign.exception_code) == (0x83, ExcCodes.GATEWAY_NO_RESPONSE)
    assert (server.counters["reads_invalid"], server.counters["foreign_unit"]) == (2, 1)


async def test_device_busy_and_foreign_unit_replies_carry_fc_or_0x80(make_server: ServerFactory) -> None:
    server = await make_server(idle_timeout_s=30.0, device_id=5)
    async with raw(server) as conn:
        await conn.send(frame(read_pdu(SUNSPEC_BASE_ADDRESS, 2, 4), unit=5, tid=1))
        assert await conn.reply() == exception_frame(4, 6, unit=5, tid=1)  # before the first update
        server.update(state())
        await conn.send(frame(read_pdu(SUNSPEC_BASE_ADDRESS, 2, 4), unit=6, tid=2))
        assert await conn.reply() == exception_frame(4, 0x0B, unit=6, tid=2)
        await conn.send(frame(bytes([0x2B, 0x0E, 0x01, 0x00]), unit=6, tid=3))
        assert await conn.reply() == exception_frame(0x2B, 0x0B, unit=6, tid=3)
    assert (server.counters["reads_busy"], server.counters["foreign_unit"]) == (1, 2)


# -- the order of the rules (pure) ---------------------------------------------------------------
IMAGE = list(range(image_length()))


@pytest.mark.parametrize(
    ("unit", "pdu", "image", "expected"),
    [
        # A PDU that breaks framing is untrusted whoever it is for.
        (9, read_pdu(SUNSPEC_BASE_ADDRESS, 2) + b"\x00", IMAGE, (None, "malformed")),
        (1, b"\x80", IMAGE, (None, "malformed")),
        # Another unit: the gateway answer, whatever the function or its fields.
        (9, read_pdu(0, 0), IMAGE, (b"\x83\x0b", "foreign_unit")),
        (9, b"\x2b\x0e\x01\x00", IMAGE, (b"\xab\x0b", "foreign_unit")),
        (1, b"\x10\x9c\x40\x00\x01\x02\x00\x01", IMAGE, (b"\x90\x01", "writes_refused")),
        (1, b"\x2b\x0e\x01\x00", IMAGE, (b"\xab\x01", "functions_refused")),
        # The quantity before the address, the address before busy.
        (1, read_pdu(0, 126), IMAGE, (b"\x83\x03", "reads_invalid")),
        (1, read_pdu(0, 1, 4), None, (b"\x84\x02", "reads_invalid")),
        (1, read_pdu(SUNSPEC_BASE_ADDRESS, 1, 4), None, (b"\x84\x06", "reads_busy")),
        (1, read_pdu(SUNSPEC_BASE_ADDRESS + 1, 2, 4), IMAGE, (b"\x04\x04\x00\x01\x00\x02", "reads")),
    ],
)
def test_each_request_is_answered_by_the_first_rule_it_breaks(
    unit: int, pdu: bytes, image: list[int] | None, expected: tuple[bytes | None, str]
) -> None:
    reply = answer(unit, pdu, device_id=1, image=image, map_length=image_length())
    assert (reply.pdu, reply.outcome) == expected
