"""TOML configuration: loaded once at the edge into frozen pydantic models.

A bad file raises :class:`ConfigError` whose message names the file, the key
path and what was expected; the CLI turns it into exit status 2.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, TypeVar

import can.interfaces
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

M = TypeVar("M", bound=BaseModel)

Port = Annotated[int, Field(ge=1, le=65535)]
LOOPBACK_HOSTS = frozenset({"localhost"})


def _ip_address(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"not an IP address: {value!r} (a listener binds an address, e.g. 127.0.0.1)") \
            from None
    return value


def _readable_file(value: Path) -> Path:
    if not value.is_file():
        raise ValueError(f"{value} does not exist or is not a file")
    if not os.access(value, os.R_OK):
        raise ValueError(f"{value} is not readable by this user")
    return value


def _writable_dir(value: Path) -> Path:
    if not value.is_dir():
        raise ValueError(f"{value} does not exist or is not a directory")
    if not os.access(value, os.R_OK | os.W_OK | os.X_OK):
        raise ValueError(f"{value} is not writable by this user")
    return value


def _can_interface(value: str) -> str:
    # python-can's registry of interface names (its own and those installed as plugins, such as
    # python-can-remote's "remote"): an unknown name would otherwise only fail when the bus opens.
    known = can.interfaces.VALID_INTERFACES
    if value not in known:
        raise ValueError(f"unknown CAN interface {value!r}; python-can knows {', '.join(sorted(known))}")
    return value


# The address a listener of ours binds: an IP address, never a name to resolve.
ListenAddress = Annotated[str, AfterValidator(_ip_address)]
# A file the process must read at start (TLS material): checked when the config is loaded.
ReadableFile = Annotated[Path, AfterValidator(_readable_file)]
# A directory the process keeps state in: checked when the config is loaded.
WritableDir = Annotated[Path, AfterValidator(_writable_dir)]
CanInterfaceName = Annotated[str, AfterValidator(_can_interface)]


def is_loopback(host: str) -> bool:
    """True if binding ``host`` keeps a listener on this machine."""
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
    ca_file: ReadableFile | None = None
    cert_file: ReadableFile | None = None
    key_file: ReadableFile | None = None
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
    # The password: here in plain text, or read once at load from a file (password_file: e.g. a systemd
    # credential) or from an environment variable (password_env: its name). At most one of the three.
    password: str | None = None
    password_file: Path | None = None
    password_env: str | None = None
    tls: TlsConfig | None = None
    keepalive_s: Annotated[int, Field(ge=1, le=600)] = 5
    # Bounds of the reconnect backoff (it doubles from min to max, back to min once connected).
    reconnect_min_s: Annotated[float, Field(gt=0, le=60)] = 0.2
    reconnect_max_s: Annotated[float, Field(gt=0, le=300)] = 2.0
    protocol: Annotated[str, Field(pattern=r"^(5|3\.1\.1)$")] = "5"

    @model_validator(mode="before")
    @classmethod
    def _password_source(cls, data: Any) -> Any:
        """Reads the password from password_file or password_env into ``password``."""
        if not isinstance(data, dict) or not (data.get("password_file") or data.get("password_env")):
            return data
        given = [key for key in ("password", "password_file", "password_env") if data.get(key) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of password, password_file, password_env (got {', '.join(given)})")
        if data.get("password_file"):
            path = Path(data["password_file"])
            try:
                secret = path.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"password_file {path}: cannot read it ({exc})") from None
            what = f"password_file {path}"
        else:
            name = str(data["password_env"])
            secret = os.environ.get(name, "")
            what = f"password_env: the environment variable {name}"
        if not secret:
            raise ValueError(f"{what} is empty or not set")
        return {**data, "password": secret}

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
    host: ListenAddress = "127.0.0.1"
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


# Deeper than any real configuration; tomllib recurses per level and would hit Python's limit.
MAX_NESTING = 32


def _nesting(value: object) -> int:
    depth, level = 0, [value]
    while level:
        depth += 1
        if depth > MAX_NESTING:
            return depth
        level = [
            child
            for item in level
            for child in (item.values() if isinstance(item, dict) else item if isinstance(item, list) else ())
        ]
    return depth


def load_toml(path: Path | str) -> dict[str, Any]:
    """Read a TOML file; every way it can be unusable is a :class:`ConfigError` that says which."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(path, ["file not found"]) from exc
    except IsADirectoryError as exc:
        raise ConfigError(path, ["is a directory, not a file"]) from exc
    except PermissionError as exc:
        raise ConfigError(path, ["permission denied"]) from exc
    except OSError as exc:
        raise ConfigError(path, [f"cannot be read: {exc.strerror or exc}"]) from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(path, [f"not UTF-8 text (byte {exc.start}: {data[exc.start:exc.start + 1]!r}); "
                                 "TOML files are UTF-8"]) from exc
    try:
        parsed = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, [f"not valid TOML: {exc}"]) from exc
    except RecursionError as exc:
        raise ConfigError(path, [f"nested too deeply (more than {MAX_NESTING} levels)"]) from exc
    if _nesting(parsed) > MAX_NESTING:
        raise ConfigError(path, [f"nested too deeply (more than {MAX_NESTING} levels)"])
    return parsed


def load_config(path: Path | str, model: type[M]) -> M:
    """Read and validate one TOML file into ``model``."""
    return validate_config(load_toml(path), model, path)
