"""TOML configuration: loaded once at the edge into frozen pydantic models.

A bad file raises :class:`ConfigError` whose message names the file, the key
path and what was expected; the CLI turns it into exit status 2.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

M = TypeVar("M", bound=BaseModel)

Port = Annotated[int, Field(ge=1, le=65535)]


class ConfigError(Exception):
    """The configuration cannot be used; the message is written for the operator."""

    def __init__(self, path: Path | str, problems: list[str]) -> None:
        self.path = Path(path)
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid configuration in {self.path}:\n{lines}")


class Frozen(BaseModel):
    """Base for config sections: immutable, and unknown keys are errors (typos must not pass silently)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class TlsConfig(Frozen):
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    # Only for commissioning against a broker with a self-signed certificate.
    insecure_skip_verify: bool = False

    @model_validator(mode="after")
    def _pair(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together")
        return self


class MqttConfig(Frozen):
    host: str = "127.0.0.1"
    port: Port = 1883
    topic_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")] = "bmslink"
    client_id: Annotated[str, Field(max_length=64)] | None = None
    username: str | None = None
    password: str | None = None
    tls: TlsConfig | None = None
    keepalive_s: Annotated[int, Field(ge=1, le=600)] = 5
    # Bounds of the reconnect backoff (it doubles from min to max, back to min once connected).
    reconnect_min_s: Annotated[float, Field(gt=0, le=60)] = 0.2
    reconnect_max_s: Annotated[float, Field(gt=0, le=300)] = 2.0
    protocol: Annotated[str, Field(pattern=r"^(5|3\.1\.1)$")] = "5"

    @model_validator(mode="after")
    def _creds(self) -> MqttConfig:
        if self.password is not None and self.username is None:
            raise ValueError("password given without username")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        return self


class MetricsConfig(Frozen):
    """Opt-in Prometheus endpoint."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: Port = 9108


def _format_location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "<top level>"


def format_validation_error(error: ValidationError) -> list[str]:
    problems = []
    for item in error.errors():
        loc = tuple(p for p in item["loc"] if not (isinstance(p, str) and p.startswith("function-after")))
        where = _format_location(loc)
        got = item.get("input")
        shown = "" if isinstance(got, dict | list) else f" (got {got!r})"
        problems.append(f"{where}: {item['msg']}{shown}")
    return problems


def validate_config(data: dict[str, Any], model: type[M], source: Path | str) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, format_validation_error(exc)) from exc


def load_toml(path: Path | str) -> dict[str, Any]:
    path = Path(path)
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(path, ["file not found"]) from exc
    except PermissionError as exc:
        raise ConfigError(path, ["permission denied"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, [f"not valid TOML: {exc}"]) from exc


def load_config(path: Path | str, model: type[M]) -> M:
    """Read and validate one TOML file into ``model``."""
    return validate_config(load_toml(path), model, path)
