"""Operator commands: the signed request, the reply, and how both travel.

A request goes to ``Topics.command_request`` as a msgpack map::

    {"v": 1, "key_id": "<operator key id>", "body": <bytes>, "signature": <32 bytes>}

``body`` is the command itself (:class:`OperatorCommand`) as UTF-8 JSON, and ``signature`` is
HMAC-SHA256 over exactly those bytes with the operator's key. Signing the bytes as sent, not a
re-encoding of the parsed command, means sender and receiver never have to agree on a canonical form.
The body carries its own ``key_id`` (it must match the envelope's), the site it is meant for, the wall
time it was issued and a unique ``id``: the receiver refuses a stale or future timestamp, another
site's command and an ``id`` it has seen with other bytes (a replay), and answers a retransmission of
the same bytes with the reply it gave the first time.

The reply goes to ``Topics.command_reply(id)`` (msgpack :class:`CommandReply`), from the active
controller only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import msgpack
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, model_validator

from shared.models import SCHEMA_MAJOR, SCHEMA_MINOR, Byte, Identifier, Timestamp

COMMAND_VERSION = 1
KEY_BYTES = 32  # HMAC-SHA256 keys: 32 random bytes, written as 64 hex digits
SIGNATURE_BYTES = 32
MAX_REQUEST_BYTES = 64 * 1024
MAX_RACKS_PER_COMMAND = 1000
MAX_FORCE_CHARGE_S = 4 * 3600.0
# systemd's LoadCredential= puts the file here, under $CREDENTIALS_DIRECTORY.
CREDENTIAL_NAME = "bmslink-command-keys"

KeyId = Annotated[str, Strict(), Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
COMMAND_ID_PATTERN = r"^[A-Za-z0-9_-]{8,64}$"
CommandId = Annotated[str, Strict(), Field(pattern=COMMAND_ID_PATTERN)]
Text = Annotated[str, Strict()]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CommandAction(StrEnum):
    CLEAR_LATCHES = "clear_latches"  # release latched alarms whose condition has cleared
    FORCE_CHARGE = "force_charge"  # set the inverter's force-charge request for duration_s, then drop it
    MAINTENANCE_ON = "maintenance_on"  # take the named racks out of the bank for service
    MAINTENANCE_OFF = "maintenance_off"  # return them (through the re-admission hold and ramp)


MAINTENANCE_ACTIONS = frozenset({CommandAction.MAINTENANCE_ON, CommandAction.MAINTENANCE_OFF})


class OperatorCommand(_Frozen):
    """What an operator asks of the active controller (the signed body)."""

    id: CommandId
    key_id: KeyId
    site_id: Identifier
    issued_s: Timestamp  # wall clock of the sender
    action: CommandAction
    # The racks it applies to; empty: every rack on the roster.
    racks: Annotated[tuple[Identifier, ...], Field(max_length=MAX_RACKS_PER_COMMAND)] = ()
    # force_charge: how long the request stands (it expires by itself); no other command takes it.
    duration_s: Annotated[float, Strict(), Field(gt=0, le=MAX_FORCE_CHARGE_S, allow_inf_nan=False)] | None = (
        None)

    @model_validator(mode="after")
    def _duration(self) -> OperatorCommand:
        if (self.action is CommandAction.FORCE_CHARGE) != (self.duration_s is not None):
            raise ValueError("duration_s is required by force_charge and taken by no other command")
        if self.action is CommandAction.FORCE_CHARGE and self.racks:
            raise ValueError("force_charge is a request to the inverter for the whole bank: name no racks")
        if self.action in MAINTENANCE_ACTIONS and not self.racks:
            # "Every rack" is never meant: the whole bank out of service is a stop, not maintenance.
            raise ValueError(f"{self.action.value} needs the racks it applies to")
        return self


class LatchNote(_Frozen):
    rack_id: Identifier
    flag: Text
    why: Text = ""


class CommandReply(_Frozen):
    """The active controller's answer to one command."""

    schema_version: tuple[Byte, Byte] = (SCHEMA_MAJOR, SCHEMA_MINOR)
    id: Text
    node_id: Identifier
    accepted: Annotated[bool, Strict()]
    reason: Text = ""  # why it was refused, or what was done
    released: tuple[LatchNote, ...] = ()
    held: tuple[LatchNote, ...] = ()  # latches the clear did not release, each with why
    # Maintenance commands: the racks in maintenance after it, and those it returned to the bank.
    maintenance: tuple[Identifier, ...] = ()
    maintenance_ended: tuple[Identifier, ...] = ()
    retry: Annotated[bool, Strict()] = False  # refused for now only: the same command may be sent again
    replied_s: Timestamp = 0.0


class CommandRefusedError(ValueError):
    """A request that is not a well-formed signed command; ``reason`` is a short metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class SignedRequest:
    """A request as received: the envelope parsed, the body not yet trusted."""

    key_id: str
    body: bytes
    signature: bytes

    def verify(self, key: bytes) -> bool:
        return hmac.compare_digest(sign(self.body, key), self.signature)

    def claimed_id(self) -> str | None:
        """The id the body names, trusted for nothing but where to send a refusal (None: no usable one)."""
        try:
            data = json.loads(self.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            return None
        claimed = data.get("id") if isinstance(data, dict) else None
        return claimed if isinstance(claimed, str) and re.fullmatch(COMMAND_ID_PATTERN, claimed) else None

    def command(self) -> OperatorCommand:
        """The body as a command (call only after :meth:`verify`)."""
        try:
            data = json.loads(self.body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise CommandRefusedError("malformed", f"body is not UTF-8 JSON: {exc}") from None
        try:
            command = OperatorCommand.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:5]
            )
            raise CommandRefusedError("malformed", f"body is not a valid command: {problems}") from None
        if command.key_id != self.key_id:
            raise CommandRefusedError(
                "malformed", f"body names key {command.key_id!r}, envelope {self.key_id!r}")
        return command


def sign(body: bytes, key: bytes) -> bytes:
    return hmac.new(key, body, hashlib.sha256).digest()


def body_bytes(command: OperatorCommand) -> bytes:
    return json.dumps(command.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode()


def encode_request(command: OperatorCommand, key: bytes) -> bytes:
    body = body_bytes(command)
    packed: bytes = msgpack.packb(
        {"v": COMMAND_VERSION, "key_id": command.key_id, "body": body, "signature": sign(body, key)},
        use_bin_type=True,
    )
    return packed


def decode_request(payload: bytes) -> SignedRequest:
    """The envelope of a request; CommandRefusedError when it is not one."""
    if len(payload) > MAX_REQUEST_BYTES:
        raise CommandRefusedError("malformed", f"request of {len(payload)} bytes exceeds {MAX_REQUEST_BYTES}")
    try:
        data: Any = msgpack.unpackb(payload, raw=False, strict_map_key=True, max_bin_len=MAX_REQUEST_BYTES)
    except Exception as exc:  # msgpack raises several types for bad input
        raise CommandRefusedError("malformed", f"not msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(data, dict):
        raise CommandRefusedError("malformed", f"request is a {type(data).__name__}, not a map")
    if data.get("v") != COMMAND_VERSION:
        raise CommandRefusedError(
            "unsupported_version", f"request version {data.get('v')!r}, this side speaks {COMMAND_VERSION}")
    key_id, body, signature = data.get("key_id"), data.get("body"), data.get("signature")
    if not isinstance(key_id, str) or not isinstance(body, bytes) or not isinstance(signature, bytes):
        raise CommandRefusedError("malformed", "request needs key_id (str), body (bin) and signature (bin)")
    unknown = set(data) - {"v", "key_id", "body", "signature"}
    if unknown:
        raise CommandRefusedError("malformed", f"request has unknown fields {sorted(map(str, unknown))}")
    if len(signature) != SIGNATURE_BYTES:
        raise CommandRefusedError(
            "bad_signature", f"signature of {len(signature)} bytes, expected {SIGNATURE_BYTES}")
    return SignedRequest(key_id=key_id, body=body, signature=signature)


def new_command(action: CommandAction, *, key_id: str, site_id: str, racks: Sequence[str] = (),
                issued_s: float | None = None, duration_s: float | None = None) -> OperatorCommand:
    return OperatorCommand(id=secrets.token_hex(16), key_id=key_id, site_id=site_id,
                           issued_s=time.time() if issued_s is None else issued_s, action=action,
                           racks=tuple(racks), duration_s=duration_s)


# -- keys --------------------------------------------------------------------------------------------


class KeyFileError(ValueError):
    """The key file cannot be used; the message says why, for the operator."""


def new_key() -> str:
    """A fresh key, as written in a key file (64 hex digits)."""
    return secrets.token_hex(KEY_BYTES)


def load_keys(path: Path) -> Mapping[str, bytes]:
    """The keys of a key file: TOML with a ``[keys]`` table of ``key_id = "<64 hex digits>"``.

    The file must be a regular file that neither its group nor others can read or write: a key anyone
    on the machine can read authorises anyone. KeyFileError, with what to do, otherwise.
    """
    try:
        info = path.stat()
    except OSError as exc:
        raise KeyFileError(f"key file {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise KeyFileError(f"key file {path} is not a regular file")
    if info.st_mode & 0o077:
        raise KeyFileError(f"key file {path} is readable or writable by others (mode "
                           f"{stat.S_IMODE(info.st_mode):04o}): run chmod 600 {path}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise KeyFileError(f"key file {path}: {exc}") from None
    table = data.get("keys")
    if not isinstance(table, dict) or not table or set(data) != {"keys"}:
        raise KeyFileError(f"key file {path}: expected one [keys] table of key_id = \"<64 hex digits>\"")
    keys: dict[str, bytes] = {}
    for key_id, value in table.items():
        try:
            KeyIdCheck.model_validate({"key_id": key_id})
            key = bytes.fromhex(value) if isinstance(value, str) else b""
        except (ValidationError, ValueError):
            key = b""
        if len(key) != KEY_BYTES:
            raise KeyFileError(f"key file {path}: key {key_id!r} must be {2 * KEY_BYTES} hex digits under a "
                               "key id of letters, digits, '_', '.' or '-'")
        keys[key_id] = key
    return keys


def credential_path(environ: Mapping[str, str] = os.environ) -> Path | None:
    """The key file systemd hands over with ``LoadCredential=bmslink-command-keys:…``, if any."""
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    path = Path(directory) / CREDENTIAL_NAME
    return path if path.exists() else None


class KeyIdCheck(_Frozen):
    key_id: KeyId
