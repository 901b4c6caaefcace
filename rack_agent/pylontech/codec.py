"""Pylontech LV RS-485 frames: encode requests and answers, decode and verify what arrives (pure).

Facts from public sources (the code is ours):

* "PYLON low voltage Protocol RS485" V3.3 (2018-08-21), the PDF shipped in Frankkkkk/python-pylontech
  (``RS485-protocol-pylon-low-voltage-V3.3-20180821.pdf``) and implemented by celsworth's fork in
  ``pylontech/pylontech.py``: the frame layout, CID1 0x46, the frame checksum and the LENGTH checksum.
* Tomcat42/pylontech-python, ``pylontech/pylontech_base.py`` (same checksum, "based on V3.3") and
  ``examples/1st_justSendAndReceive/output.txt``: request/answer pairs recorded from a US2000, used as
  test vectors in tests/agent/test_pylontech_codec.py.
* zivillian/esp32-pylontech ``pylontech.h``: the return codes (RTN) an answer carries.

A frame, every field ASCII hex between SOI ``~`` and EOI ``\\r``::

    VER(1 byte) ADR(1) CID1(1) CID2(1) LENGTH(2) INFO(LENID characters) CHKSUM(2)

* CID1 is 0x46 (lithium iron phosphate battery). In a request CID2 is the command; in an answer it
  is the return code RTN, 0 when the pack did what was asked.
* LENGTH: the low 12 bits (LENID) count the ASCII characters of INFO; the high nibble (LCHKSUM) is
  the two's complement, mod 16, of the sum of LENID's three nibbles (LENID 0 gives LCHKSUM 0).
* CHKSUM: the two's complement, mod 65536, of the sum of the ASCII codes of every character between
  SOI and CHKSUM.

Every way received bytes can fail to be a frame raises a typed error classified as the agent
classifies a Modbus RTU answer: a broken frame (checksum, LENGTH, framing) is a ``crc_error``, a
well-formed refusal (RTN other than 0) a ``modbus_exception`` with the RTN as its code, and a good
frame whose INFO cannot be read ``invalid_data``.
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass
from enum import IntEnum

from rack_agent.errors import CrcError, InvalidDataError, ModbusExceptionError

SOI = 0x7E  # "~"
EOI = 0x0D  # "\r"
CID1_BATTERY = 0x46
# The protocol version the recorded US2000/US3000/UP2500 frames carry (VER 0x20, "2.0").
PROTOCOL_VERSION = 0x20
HEADER_CHARS = 12  # VER, ADR, CID1, CID2 (2 characters each) and LENGTH (4)
CHECKSUM_CHARS = 4
MIN_FRAME_BYTES = 1 + HEADER_CHARS + CHECKSUM_CHARS + 1
LENID_MAX = 0x0FFF
MAX_FRAME_BYTES = MIN_FRAME_BYTES + LENID_MAX


class Command(IntEnum):
    """CID2 of a request (V3.3 §3)."""

    ANALOG_VALUES = 0x42  # cell voltages, temperatures, current, voltage, capacities (fixed point)
    ALARM_INFO = 0x44
    SYSTEM_PARAMETERS = 0x47
    PROTOCOL_VERSION = 0x4F
    MANUFACTURER_INFO = 0x51
    MANAGEMENT_INFO = 0x92  # charge/discharge management: CVL, DVL, CCL, DCL, enable flags
    SERIAL_NUMBER = 0x93


RETURN_CODES: dict[int, str] = {
    0x00: "normal",
    0x01: "VER error",
    0x02: "CHKSUM error",
    0x03: "LCHKSUM error",
    0x04: "CID2 invalid",
    0x05: "command format error",
    0x06: "invalid data",
    0x90: "ADR error",
    0x91: "internal communication error",
}


class FramingError(CrcError):
    """Bytes between SOI and EOI that are no frame: too short, not hex, INFO of odd length."""


class FrameChecksumError(CrcError):
    """The frame's CHKSUM does not match its characters (a corrupted frame)."""

    def __init__(self, detail: str, *, expected: int, received: int) -> None:
        super().__init__(detail)
        self.expected = expected
        self.received = received


class LengthChecksumError(CrcError):
    """LENGTH's own checksum nibble (LCHKSUM) does not match its LENID."""

    def __init__(self, detail: str, *, lenid: int, expected: int, received: int) -> None:
        super().__init__(detail)
        self.lenid = lenid
        self.expected = expected
        self.received = received


class LengthMismatchError(CrcError):
    """LENID says one INFO length, the frame carries another."""

    def __init__(self, detail: str, *, declared_chars: int, actual_chars: int) -> None:
        super().__init__(detail)
        self.declared_chars = declared_chars
        self.actual_chars = actual_chars


class ReturnCodeError(ModbusExceptionError):
    """The pack answered with a return code (RTN) other than 0: it refuses the request. ``code`` is
    the RTN; reported as ``modbus_exception``, the wire's class for a device's refusal."""

    label = "Pack Refusal"

    def __init__(self, detail: str, *, rtn: int, address: int, command: int) -> None:
        super().__init__(detail, code=rtn)
        self.rtn = rtn
        self.address = address
        self.command = command


class InfoFormatError(InvalidDataError):
    """A well-formed answer whose INFO does not hold what the command's answer must."""


def frame_checksum(chars: bytes) -> int:
    """CHKSUM of the characters between SOI and CHKSUM."""
    return (-sum(chars)) & 0xFFFF


def length_checksum(lenid: int) -> int:
    """LCHKSUM of a LENID (0..4095)."""
    return (-((lenid & 0xF) + ((lenid >> 4) & 0xF) + ((lenid >> 8) & 0xF))) & 0xF


def length_field(info_chars: int) -> int:
    """The LENGTH field for an INFO of ``info_chars`` ASCII characters."""
    if not 0 <= info_chars <= LENID_MAX:
        raise ValueError(f"INFO of {info_chars} characters does not fit LENID (0..{LENID_MAX})")
    return (length_checksum(info_chars) << 12) | info_chars


def return_code_text(rtn: int) -> str:
    return RETURN_CODES.get(rtn, "unknown return code")


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame; ``cid2`` is the command in a request and the return code (RTN) in an answer.
    ``info`` holds the INFO bytes (the hex already decoded)."""

    address: int
    cid2: int
    info: bytes = b""
    version: int = PROTOCOL_VERSION
    cid1: int = CID1_BATTERY


def encode_frame(frame: Frame) -> bytes:
    """The bytes of ``frame`` on the wire, SOI to EOI."""
    info = frame.info.hex().upper().encode("ascii")
    body = (
        f"{frame.version:02X}{frame.address:02X}{frame.cid1:02X}{frame.cid2:02X}"
        f"{length_field(len(info)):04X}"
    ).encode("ascii") + info
    return bytes([SOI]) + body + f"{frame_checksum(body):04X}".encode("ascii") + bytes([EOI])


def encode_request(
    address: int, command: int, info: bytes = b"", *, version: int = PROTOCOL_VERSION
) -> bytes:
    return encode_frame(Frame(address, command, info, version))


def _hex_field(chars: bytes, what: str) -> int:
    try:
        return int(chars, 16)
    except ValueError:
        raise FramingError(f"{what} {chars!r} is not hexadecimal") from None


def decode_frame(raw: bytes) -> Frame:
    """Verify and decode one frame from SOI to EOI inclusive.

    Checked in this order, each with its own error: SOI/EOI and minimum length (framing), CHKSUM,
    LCHKSUM, LENID against the INFO actually carried, INFO being hex of whole bytes.
    """
    if len(raw) < MIN_FRAME_BYTES or raw[0] != SOI or raw[-1] != EOI:
        raise FramingError(
            f"{len(raw)} bytes are no frame (need SOI ... EOI, at least {MIN_FRAME_BYTES} bytes)"
        )
    body, checksum_chars = raw[1:-1 - CHECKSUM_CHARS], raw[-1 - CHECKSUM_CHARS:-1]
    received = _hex_field(checksum_chars, "CHKSUM")
    expected = frame_checksum(body)
    if received != expected:
        raise FrameChecksumError(
            f"frame checksum {received:04X}, its characters sum to {expected:04X}",
            expected=expected, received=received,
        )
    version, address, cid1, cid2 = (_hex_field(body[i:i + 2], "header") for i in range(0, 8, 2))
    length = _hex_field(body[8:12], "LENGTH")
    lenid, lchksum = length & LENID_MAX, length >> 12
    if lchksum != length_checksum(lenid):
        raise LengthChecksumError(
            f"LENGTH {length:04X}: LCHKSUM {lchksum:X} does not fit LENID {lenid} "
            f"(expected {length_checksum(lenid):X})",
            lenid=lenid, expected=length_checksum(lenid), received=lchksum,
        )
    info_chars = body[HEADER_CHARS:]
    if lenid != len(info_chars):
        raise LengthMismatchError(
            f"LENID says {lenid} INFO characters, the frame carries {len(info_chars)}",
            declared_chars=lenid, actual_chars=len(info_chars),
        )
    if lenid % 2:
        raise FramingError(f"INFO of {lenid} characters is no whole number of bytes")
    try:
        info = binascii.unhexlify(info_chars)
    except (binascii.Error, ValueError):
        raise FramingError("INFO is not hexadecimal") from None
    return Frame(address, cid2, info, version, cid1)


def answer_info(frame: Frame, *, address: int, command: int) -> bytes:
    """The INFO of the pack's answer to ``command``, or :class:`ReturnCodeError` if it refused."""
    if frame.cid2 != 0:
        raise ReturnCodeError(
            f"pack {address} refused command {command:#04x}: RTN {frame.cid2:#04x} "
            f"({return_code_text(frame.cid2)})",
            rtn=frame.cid2, address=address, command=command,
        )
    if frame.cid1 != CID1_BATTERY:
        raise InfoFormatError(
            f"answer of pack {address} carries CID1 {frame.cid1:#04x}, not {CID1_BATTERY:#04x}"
        )
    return frame.info


class FrameAssembler:
    """Cuts a byte stream into candidate frames (SOI ... EOI); pure, fed by the serial line.

    Bytes outside a frame (line noise, a frame's tail after a restart) are counted in
    :attr:`stray_bytes` and dropped; a frame that grows past :data:`MAX_FRAME_BYTES` without its
    EOI is dropped too, so a babbling line cannot grow the buffer without bound. A new SOI inside an
    unfinished frame starts the frame again (the earlier start was noise or a frame cut short).
    """

    def __init__(self) -> None:
        self._partial = bytearray()
        self.stray_bytes = 0

    @property
    def pending_bytes(self) -> int:
        """Bytes of a frame begun but not yet ended."""
        return len(self._partial)

    def reset(self) -> None:
        self.stray_bytes += len(self._partial)
        self._partial.clear()

    def feed(self, data: bytes) -> list[bytes]:
        """Complete frames found in ``data`` (with what came before it), oldest first."""
        frames: list[bytes] = []
        start = 0
        while start < len(data):
            if not self._partial:
                soi = data.find(SOI, start)
                if soi < 0:
                    self.stray_bytes += len(data) - start
                    break
                self.stray_bytes += soi - start
                start = soi
            eoi = data.find(EOI, start)
            restart = data.find(SOI, start + (0 if self._partial else 1))
            if restart >= 0 and (eoi < 0 or restart < eoi):
                # A new SOI before this frame's EOI: what was gathered so far was no frame.
                self.stray_bytes += len(self._partial) + restart - start
                self._partial.clear()
                start = restart
                continue
            if eoi < 0:
                self._partial += data[start:]
                if len(self._partial) > MAX_FRAME_BYTES:
                    self.reset()
                break
            self._partial += data[start:eoi + 1]
            frames.append(bytes(self._partial))
            self._partial.clear()
            start = eoi + 1
        return frames
