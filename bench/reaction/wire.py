"""What the bench's racks put on the wire, and the bank limit the answer must carry.

The payload is the real contract (``shared.codec.encode`` of a ``RackTelemetry``), encoded once per rack;
``seq`` and the charge current limit are sentinels whose msgpack encodings have a fixed width, so they
are patched in place for every message without encoding again. Lowerings follow a ladder of rack limits
that each take 1 A off the bank (policy ``n_times_min``), so every lowering is identifiable in 0x351.
"""

from __future__ import annotations

import struct

SITE = "bench"
PREFIX = "bmslink"
POLL_INTERVAL_MS = 500  # what the payload says (2 Hz): the controller's stale limit is 3 × this
SEQ_SENTINEL = 2**63 - 1  # packs as uint64 (0xcf + 8 bytes): patched in place
CCL_SENTINEL = 1234.56789  # packs as float64 (0xcb + 8 bytes): patched in place
BANK_BASE_A = 3000.0  # bank CCL with every rack at its base limit (base = BANK_BASE_A / N)
LADDER_STEPS = 400  # lowerings of 1 A on the bank before the racks are restored
ID_LIMITS = 0x351


def rack_ids(n: int) -> list[str]:
    """The rack ids of a roster of ``n``."""
    return [f"rack-{i:04d}" for i in range(n)]


def bank_a(rack_limit_a: float, n: int) -> float:
    """The bank CCL the controller sends for N racks at this minimum (its own rounding)."""
    from controller.core.bounds import current_down_da  # noqa: PLC0415

    return current_down_da(rack_limit_a * n) / 10.0


def ladder_value(n: int, step: int) -> float:
    """Rack limit of ladder step ``step`` (0 = base): each step takes 1 A off the bank."""
    return (BANK_BASE_A - step) / n


def telemetry_template(rack_id: str) -> tuple[bytes, int, int]:
    """(payload, seq offset, CCL offset): a valid RackTelemetry with patchable seq and CCL."""
    from shared.codec import encode  # noqa: PLC0415
    from shared.models import (  # noqa: PLC0415
        ContactorState,
        LinkStatus,
        ProtectionFlags,
        RackCommState,
        RackMeasurements,
        RackTelemetry,
        UnitLink,
    )

    telemetry = RackTelemetry(
        site_id=SITE,
        rack_id=rack_id,
        stream_id="be4c000000000001",
        seq=SEQ_SENTINEL,
        timestamp_s=1_790_000_000.25,
        poll_interval_ms=POLL_INTERVAL_MS,
        comm_state=RackCommState.OK,
        measurements=RackMeasurements(
            pack_voltage_v=52.8, current_a=12.5, soc_pct=64.0, soh_pct=98.0,
            cell_voltage_max_v=3.31, cell_voltage_max_location="cell 4",
            cell_voltage_min_v=3.29, cell_voltage_min_location="cell 9",
            temperature_max_c=27.5, temperature_min_c=24.0,
            charge_current_limit_a=CCL_SENTINEL, discharge_current_limit_a=200.0,
            charge_voltage_limit_v=55.2, discharge_voltage_limit_v=46.4,
            alarms=ProtectionFlags(), warnings=ProtectionFlags(),
            contactor=ContactorState.CLOSED, capacity_ah=280.0,
        ),
        units=(UnitLink(unit="bms", status=LinkStatus.OK),),
    )
    payload = encode(telemetry)
    seq_mark = b"\xcf" + struct.pack(">Q", SEQ_SENTINEL)
    ccl_mark = b"\xcb" + struct.pack(">d", CCL_SENTINEL)
    assert payload.count(seq_mark) == 1 and payload.count(ccl_mark) == 1
    return payload, payload.index(seq_mark) + 1, payload.index(ccl_mark) + 1


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(text: str) -> bytes:
    raw = text.encode()
    return struct.pack(">H", len(raw)) + raw


def connect_packet(client_id: str) -> bytes:
    """MQTT 3.1.1 CONNECT, clean session, keep-alive off (the publisher never goes quiet)."""
    body = _utf8("MQTT") + bytes([4, 0x02]) + struct.pack(">H", 0) + _utf8(client_id)
    return b"\x10" + _remaining_length(len(body)) + body


def publish_packet(topic: str, payload: bytes) -> tuple[bytearray, int]:
    """MQTT 3.1.1 PUBLISH QoS 0, and the offset of the payload inside it."""
    head = _utf8(topic)
    fixed = b"\x30" + _remaining_length(len(head) + len(payload))
    return bytearray(fixed + head + payload), len(fixed) + len(head)


def subscribe_packet(topic: str) -> bytes:
    """MQTT 3.1.1 SUBSCRIBE (packet id 1) to one filter at QoS 0."""
    body = struct.pack(">H", 1) + _utf8(topic) + b"\x00"
    return b"\x82" + _remaining_length(len(body)) + body
