"""Rack telemetry as msgspec Structs, derived from the wire contract: the controller's in-process form.

The contract is the pydantic models of :mod:`shared.models`: agents build and encode with them,
and they decide what is valid. The controller receives every rack's payload twice a second; at
a thousand racks msgpack + pydantic validation was the largest single cost of its process, and
msgspec decodes and validates the same payload into Structs several times faster.

So the controller decodes straight into these Structs, and falls back to the pydantic path for
anything they refuse (:class:`TelemetryDecoder`). The Structs are a *fast path* with one rule: they
never accept a payload the models reject, and what they accept carries the same values. They may
only be stricter; a payload they refuse goes through pydantic, which decides (and says why), and
its model is converted here.

Nothing here restates the contract. :func:`derive_records` builds the Structs at import from the
models' fields: names, order, types (nested models become their records; enums, tuples and
``X | None`` are kept), defaults, and every constraint pydantic keeps in a field's metadata,
translated to :class:`msgspec.Meta`. A constraint, type or setting it cannot translate is an
error at import, never dropped. The models' cross-field rules (their ``model_validator``\\ s)
cannot be read from the models; they are the plain functions of :mod:`shared.models` the
validators call, run here as each record's ``__post_init__``.
``tests/contract/test_records.py`` holds the fast path to the rule, by probing every bound and by
hypothesis over valid and mutated payloads.

Statically (for mypy) each record *is* its model: it has the same fields with the same types by
construction. At run time a record has only the fields, and the flags record ``raised()`` and
``any()``; nothing else of the model's API (mypy will not catch ``record.model_dump()``).
"""

from __future__ import annotations

import functools
import operator
import sys
import types
from collections import Counter
from collections.abc import Callable, Mapping
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Any, TypeAlias, Union, get_args, get_origin

import annotated_types
import msgspec
from pydantic import AllowInfNan, BaseModel, Strict
from pydantic.fields import FieldInfo

from shared.codec import DEFAULT_MAX_PAYLOAD_BYTES, Decoder, RejectReason
from shared.models import (
    SCHEMA_MAJOR,
    LinkCounters,
    ProtectionFlags,
    RackMeasurements,
    RackTelemetry,
    UnitLink,
    check_comm_state,
    check_measurement_order,
)

# The annotated_types bounds pydantic keeps in a field's metadata, and their msgspec.Meta names.
_BOUNDS: dict[type[annotated_types.BaseMetadata], str] = {
    annotated_types.Ge: "ge",
    annotated_types.Gt: "gt",
    annotated_types.Le: "le",
    annotated_types.Lt: "lt",
    annotated_types.MinLen: "min_length",
    annotated_types.MaxLen: "max_length",
}
_SCALARS = (bool, int, float, str)
# Fields the models default (for producers building one) that the wire must carry all the same:
# shared.codec refuses a payload without its schema_version, so a record must not fill it in.
_REQUIRED_ON_THE_WIRE = frozenset({"schema_version"})


class _Constraints:
    """msgspec.Meta arguments collected from one type's pydantic metadata."""

    def __init__(self, metadata: list[Any], regex_engine: str, where: str) -> None:
        self.meta: dict[str, Any] = {}
        self.finite = False
        self._where = where
        for item in metadata:
            self._read(item, regex_engine)

    def _read(self, item: Any, regex_engine: str) -> None:
        if isinstance(item, FieldInfo):  # Field(...) inside a nested Annotated keeps its constraints here
            for inner in item.metadata:
                self._read(inner, regex_engine)
            return
        if isinstance(item, Strict):
            return  # msgspec is strict throughout (bar an int for a float, which Strict allows too)
        if isinstance(item, AllowInfNan):
            self.finite = self.finite or not item.allow_inf_nan
            return
        for kind, name in _BOUNDS.items():
            if isinstance(item, kind):
                self.meta[name] = getattr(item, name)
                return
        # Field(pattern=...) and the like: a pydantic metadata object holding plain keyword values.
        if not (isinstance(item, annotated_types.BaseMetadata) and hasattr(item, "__dict__")):
            raise TypeError(f"{self._where}: cannot derive a record from constraint {item!r}")
        for key, value in vars(item).items():
            if key == "pattern":
                self.meta["pattern"] = _python_pattern(value, regex_engine, self._where)
            elif key == "allow_inf_nan":
                self.finite = self.finite or not value
            elif key != "strict":
                raise TypeError(f"{self._where}: cannot derive a record from constraint {key}={value!r}")

    def applied(self, tp: Any) -> Any:
        if tp is float and self.finite:
            # msgspec refuses NaN against any bound (every comparison with NaN is false) and ±inf
            # against the bound on its side: bound both sides, with the largest finite float if the
            # model names no bound there.
            if "ge" not in self.meta and "gt" not in self.meta:
                self.meta["ge"] = -sys.float_info.max
            if "le" not in self.meta and "lt" not in self.meta:
                self.meta["le"] = sys.float_info.max
        elif self.finite:
            raise TypeError(f"{self._where}: allow_inf_nan on a non-float {tp!r}")
        return Annotated[tp, msgspec.Meta(**self.meta)] if self.meta else tp


def _python_pattern(pattern: str, regex_engine: str, where: str) -> str:
    """The model's pattern for Python's ``re`` (msgspec's engine), matching the same strings.

    pydantic's default engine is Rust's regex, whose ``$`` matches only at the very end; Python's also
    matches before a final newline, so a trailing ``$`` becomes ``\\Z``. Any other ``$`` is refused
    rather than translated by guesswork.
    """
    if regex_engine != "rust-regex":
        return pattern
    anchored = _unescaped_dollar_at(pattern, len(pattern) - 1)
    body = pattern[:-1] if anchored else pattern
    if any(_unescaped_dollar_at(body, i) for i in range(len(body))):
        raise TypeError(f"{where}: cannot translate the '$' inside pattern {pattern!r}")
    return body + r"\Z" if anchored else body


def _unescaped_dollar_at(pattern: str, index: int) -> bool:
    if index < 0 or pattern[index] != "$":
        return False
    backslashes = len(pattern[:index]) - len(pattern[:index].rstrip("\\"))
    return backslashes % 2 == 0


def derive_records(
    root: type[BaseModel],
    names: Mapping[type[BaseModel], str],
    checks: Mapping[type[BaseModel], Callable[[Any], None]] | None = None,
    methods: Mapping[type[BaseModel], Mapping[str, Callable[..., Any]]] | None = None,
) -> dict[type[BaseModel], type[msgspec.Struct]]:
    """The msgspec Struct of ``root`` and of every model it nests, keyed by model.

    Each record is frozen, refuses unknown fields and keeps its model's field order (``kw_only``, so a
    required field may follow a defaulted one). ``names`` names every record; ``checks`` gives, for
    each model with a ``model_validator``, the function that validator runs (the record runs it as
    ``__post_init__``); ``methods`` adds methods to a record. Raises ``TypeError`` for anything of a
    model it cannot translate faithfully (a field validator, an alias, a constraint msgspec lacks, an
    unknown type), and for a name, check or method given for a model ``root`` does not reach.
    """
    derivation = _Derivation(names, checks or {}, methods or {})
    derivation.record(root)
    unused = (set(names) | set(checks or {}) | set(methods or {})) - set(derivation.records)
    if unused:
        raise TypeError(f"not reached from {root.__name__}: {sorted(m.__name__ for m in unused)}")
    return derivation.records


class _Derivation:
    def __init__(
        self,
        names: Mapping[type[BaseModel], str],
        checks: Mapping[type[BaseModel], Callable[[Any], None]],
        methods: Mapping[type[BaseModel], Mapping[str, Callable[..., Any]]],
    ) -> None:
        self.records: dict[type[BaseModel], type[msgspec.Struct]] = {}
        self._names = names
        self._checks = checks
        self._methods = methods

    def record(self, model: type[BaseModel]) -> type[msgspec.Struct]:
        if model not in self.records:
            self.records[model] = self._build(model)
        return self.records[model]

    def _build(self, model: type[BaseModel]) -> type[msgspec.Struct]:
        config = model.model_config
        if config.get("extra") != "forbid" or not config.get("frozen"):
            raise TypeError(f"{model.__name__}: a record needs a frozen model with extra='forbid'")
        decorators = model.__pydantic_decorators__
        if decorators.validators or decorators.field_validators or decorators.root_validators:
            raise TypeError(f"{model.__name__}: field validators cannot be derived into a record")
        if bool(decorators.model_validators) != (model in self._checks):
            raise TypeError(
                f"{model.__name__}: give its model_validator's check function, and only for a model with one"
            )
        if model not in self._names:
            raise TypeError(f"{model.__name__}: no record name given")
        regex_engine = config.get("regex_engine", "rust-regex")
        fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
        for name, info in model.model_fields.items():
            where = f"{model.__name__}.{name}"
            if info.alias or info.validation_alias or info.default_factory is not None:
                raise TypeError(f"{where}: aliases and default factories cannot be derived")
            tp = self._type(info.annotation, list(info.metadata), regex_engine, where)
            if info.is_required() or name in _REQUIRED_ON_THE_WIRE:
                fields.append((name, tp))
            else:  # the model's default as a record value (a nested model becomes its record)
                fields.append((name, tp, msgspec.convert(info.default, tp, from_attributes=True)))
        namespace: dict[str, Any] = {
            "__doc__": f":class:`shared.models.{model.__name__}`, derived (see :mod:`shared.records`).",
            **self._methods.get(model, {}),
        }
        if model in self._checks:
            namespace["__post_init__"] = self._checks[model]
        # Records hold only numbers, strings, enums and other records, so they can never be part of a
        # reference cycle: gc=False keeps them out of the collector's lists (six per payload, at 2000
        # a second).
        return msgspec.defstruct(
            self._names[model], fields, module=__name__, namespace=namespace,
            frozen=True, forbid_unknown_fields=True, gc=False, kw_only=True,
        )

    def _type(self, tp: Any, metadata: list[Any], regex_engine: str, where: str) -> Any:
        """The msgspec type of a pydantic annotation and the constraints pydantic holds for it."""
        if get_origin(tp) is Annotated:
            inner, *extra = get_args(tp)
            return self._type(inner, [*metadata, *extra], regex_engine, where)
        constraints = _Constraints(metadata, regex_engine, where)
        if get_origin(tp) in (Union, types.UnionType):
            if metadata:
                raise TypeError(f"{where}: constraints on a union {tp!r}")
            members = [self._type(arg, [], regex_engine, where) for arg in get_args(tp)]
            return functools.reduce(operator.or_, members)
        if get_origin(tp) is tuple:
            args = get_args(tp)
            if len(args) == 2 and args[1] is Ellipsis:
                items: Any = tuple[self._type(args[0], [], regex_engine, where), ...]  # type: ignore[misc]
            else:
                items = tuple[tuple(self._type(a, [], regex_engine, where) for a in args)]  # type: ignore[misc]
            return constraints.applied(items)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if metadata:
                raise TypeError(f"{where}: constraints on a nested model {tp!r}")
            return self.record(tp)
        if tp is type(None) or (isinstance(tp, type) and issubclass(tp, Enum)) or tp in _SCALARS:
            return constraints.applied(tp)
        raise TypeError(f"{where}: cannot derive a record field of type {tp!r}")


def _raised(self: msgspec.Struct) -> tuple[str, ...]:
    """Names of the conditions that are set, in declaration order."""
    values = msgspec.structs.astuple(self)
    if not any(values):
        return ()
    return tuple(name for name, value in zip(self.__struct_fields__, values, strict=True) if value)


def _any(self: msgspec.Struct) -> bool:
    """Whether any condition is set."""
    return any(msgspec.structs.astuple(self))


if TYPE_CHECKING:
    # Statically each record is its model (same fields, same types, by construction).
    TelemetryRecord: TypeAlias = RackTelemetry
    MeasurementsRecord: TypeAlias = RackMeasurements
    FlagsRecord: TypeAlias = ProtectionFlags
    UnitLinkRecord: TypeAlias = UnitLink
    LinkCountersRecord: TypeAlias = LinkCounters
else:
    _RECORDS = derive_records(
        RackTelemetry,
        names={
            RackTelemetry: "TelemetryRecord",
            RackMeasurements: "MeasurementsRecord",
            ProtectionFlags: "FlagsRecord",
            UnitLink: "UnitLinkRecord",
            LinkCounters: "LinkCountersRecord",
        },
        checks={RackMeasurements: check_measurement_order, RackTelemetry: check_comm_state},
        methods={ProtectionFlags: {"raised": _raised, "any": _any}},
    )
    TelemetryRecord = _RECORDS[RackTelemetry]
    MeasurementsRecord = _RECORDS[RackMeasurements]
    FlagsRecord = _RECORDS[ProtectionFlags]
    UnitLinkRecord = _RECORDS[UnitLink]
    LinkCountersRecord = _RECORDS[LinkCounters]


def record_of(telemetry: RackTelemetry) -> TelemetryRecord:
    """The record of a validated model (values the model accepted are in the records' bounds)."""
    return msgspec.convert(telemetry.model_dump(mode="python"), TelemetryRecord)


class TelemetryDecoder:
    """Decodes rack payloads into :class:`TelemetryRecord`; same rejections and counters as
    :class:`shared.codec.Decoder` (it *is* that decoder for everything the fast path refuses)."""

    def __init__(self, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> None:
        self._fast = msgspec.msgpack.Decoder(TelemetryRecord)
        self._authority: Decoder[RackTelemetry] = Decoder(RackTelemetry, max_payload_bytes)
        self.fast_accepted = 0

    @property
    def max_payload_bytes(self) -> int:
        return self._authority.max_payload_bytes

    @property
    def accepted(self) -> int:
        return self.fast_accepted + self._authority.accepted

    @property
    def rejected(self) -> Counter[RejectReason]:
        return self._authority.rejected

    def decode(self, payload: bytes, topic: str | None = None) -> TelemetryRecord:
        if len(payload) <= self.max_payload_bytes:
            try:
                record = self._fast.decode(payload)
            except (msgspec.DecodeError, ValueError, TypeError):
                pass  # the authority decides, and says why
            else:
                if record.schema_version[0] == SCHEMA_MAJOR:
                    self.fast_accepted += 1
                    return record
        model = self._authority.decode(payload, topic)  # raises DecodeError, counted there
        return record_of(model)
