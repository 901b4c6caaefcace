"""msgpack encoding of the wire contract, with a typed, counted rejection path.

A decoder never raises anything but :class:`DecodeError`; every rejection is
counted by its :class:`RejectReason` on the decoder instance (no global state).
"""

from __future__ import annotations

from collections import Counter
from enum import StrEnum
from typing import Any, Generic, TypeVar

import msgpack
from pydantic import BaseModel, ValidationError

from shared.models import SCHEMA_MAJOR, RackTelemetry

DEFAULT_MAX_PAYLOAD_BYTES = 64 * 1024

M = TypeVar("M", bound=BaseModel)


class RejectReason(StrEnum):
    OVERSIZED = "oversized"
    MALFORMED = "malformed"
    UNSUPPORTED_VERSION = "unsupported_version"
    INVALID = "invalid"


class DecodeError(ValueError):
    """A payload was rejected. ``reason`` says which class of defect; ``detail`` says what exactly."""

    def __init__(self, reason: RejectReason, detail: str, topic: str | None = None) -> None:
        self.reason = reason
        self.detail = detail
        self.topic = topic
        where = f" on {topic}" if topic else ""
        super().__init__(f"rejected payload{where}: {reason.value}: {detail}")


def encode(model: BaseModel) -> bytes:
    """Pack a contract model; enums become their string values, tuples become arrays."""
    packed: bytes = msgpack.packb(model.model_dump(mode="json"), use_bin_type=True)  # msgpack is untyped
    return packed


def _summarise(error: ValidationError) -> str:
    parts = []
    for item in error.errors()[:3]:
        loc = ".".join(str(p) for p in item["loc"]) or "<root>"
        parts.append(f"{loc}: {item['msg']}")
    more = error.error_count() - len(parts)
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


class Decoder(Generic[M]):
    """Validating decoder for one contract model with per-reason rejection counters."""

    def __init__(self, model: type[M], max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> None:
        self._model = model
        self.max_payload_bytes = max_payload_bytes
        self.accepted = 0
        self.rejected: Counter[RejectReason] = Counter()

    def decode(self, payload: bytes, topic: str | None = None) -> M:
        try:
            result = self._decode(payload, topic)
        except DecodeError as exc:
            self.rejected[exc.reason] += 1
            raise
        self.accepted += 1
        return result

    def _decode(self, payload: bytes, topic: str | None) -> M:
        if len(payload) > self.max_payload_bytes:
            raise DecodeError(
                RejectReason.OVERSIZED, f"{len(payload)} bytes > limit {self.max_payload_bytes}", topic
            )
        try:
            # The size check above bounds everything unpackb allocates
            # (its limits default to the input size).
            raw: Any = msgpack.unpackb(payload, raw=False, strict_map_key=True)
        except Exception as exc:  # msgpack raises several unrelated types for bad input
            raise DecodeError(
                RejectReason.MALFORMED, f"not msgpack: {type(exc).__name__}: {exc}", topic
            ) from exc
        if not isinstance(raw, dict):
            raise DecodeError(
                RejectReason.MALFORMED, f"top level is {type(raw).__name__}, not a map", topic
            )
        version = raw.get("schema_version")
        if (
            not isinstance(version, list | tuple)
            or len(version) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in version)
        ):
            raise DecodeError(
                RejectReason.MALFORMED, f"schema_version missing or not [major, minor]: {version!r}", topic
            )
        if version[0] != SCHEMA_MAJOR:
            raise DecodeError(
                RejectReason.UNSUPPORTED_VERSION,
                f"major {version[0]} (this build reads {SCHEMA_MAJOR})",
                topic,
            )
        try:
            return self._model.model_validate(raw)
        except ValidationError as exc:
            raise DecodeError(RejectReason.INVALID, _summarise(exc), topic) from exc
        except (TypeError, ValueError, RecursionError) as exc:
            raise DecodeError(RejectReason.INVALID, f"{type(exc).__name__}: {exc}", topic) from exc


def telemetry_decoder(max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> Decoder[RackTelemetry]:
    return Decoder(RackTelemetry, max_payload_bytes)
