"""YAML -> typed, validated, frozen settings.

Every problem raises `ConfigError(key, message)`, where `key` is the dotted path of the
offending value ("provider.issuer", "api.read_users[2]") and `message` says what is
wrong and what is accepted. The CLI prints it and exits 78 (EX_CONFIG), so systemd does
not restart a broken config in a loop. Messages never repeat a secret's value.

Validation is data: each section is a frozen dataclass plus a `_Section` table that maps
every key to a small reader (`_string`, `_duration(...)`, `_url(...)`, ...), and an
optional check for rules that span keys. A new section is a dataclass, a table, and a
field on `AgentConfig`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
import re
import socket
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final
from urllib.parse import urlsplit

import yaml

from agent.display.kinds import KINDS
from agent.errors import ConfigError
from agent.hooks import HOOK_EVENTS
from agent.paths import default_socket_path, default_state_path
from agent.sealing import MODES as ENCRYPTION_MODES

__all__ = [
    "DISPLAY_TYPES",
    "LOG_LEVELS",
    "MQTT_COMMANDS",
    "SINK_FORMATS",
    "AgentConfig",
    "ApiConfig",
    "ButtonConfig",
    "DeviceConfig",
    "DisplayConfig",
    "HookConfig",
    "LoggingConfig",
    "MetricsConfig",
    "MqttConfig",
    "ProviderConfig",
    "RefreshConfig",
    "SignInConfig",
    "SinkConfig",
    "StorageConfig",
    "config_from_mapping",
    "default_socket_path",
    "default_state_path",
    "load_config",
    "parse_duration",
    "read_secret_file",
]


DISPLAY_TYPES: Final = frozenset(KINDS)
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
# Token file formats, written by agent.sinks.
SINK_FORMATS: Final = ("raw", "json", "env")
# What a dashboard may ask over MQTT (agent.mqtt): a code while not signed in, a new
# sign-in while signed in, a sign-out.
MQTT_COMMANDS: Final = ("new_code", "new_sign_in", "sign_out")

# sun_path is 108 bytes on Linux, one of which is the terminating NUL; a longer path
# fails only at bind time, with an error that does not say why.
_MAX_SOCKET_PATH_BYTES: Final = 107


# -- defaults from the environment ------------------------------------------------

def _empty_options() -> Mapping[str, Any]:
    return MappingProxyType({})


# -- the settings -----------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class ProviderConfig:
    issuer: str | None = None
    client_id: str
    # repr=False keeps the secret out of logs and tracebacks that print the config.
    client_secret: str | None = field(default=None, repr=False)
    client_secret_file: Path | None = None
    scopes: tuple[str, ...] = ("openid", "profile", "email", "offline_access")
    ca_file: Path | None = None
    allow_insecure_http: bool = False
    device_authorization_endpoint: str | None = None
    token_endpoint: str | None = None
    revocation_endpoint: str | None = None
    userinfo_endpoint: str | None = None
    timeout: float = 15.0
    max_response_bytes: int = 1_048_576


@dataclass(frozen=True, kw_only=True)
class DeviceConfig:
    name: str = field(default_factory=socket.gethostname)


@dataclass(frozen=True, kw_only=True)
class SignInConfig:
    codes_per_hour: int = 12
    # authentik's throttle is a rolling hour that ignores refused tries: start at
    # 2 minutes and double to 30, so a later try costs nothing and comes soon enough.
    throttle_backoff: float = 120.0
    throttle_backoff_max: float = 1800.0
    retry_initial: float = 2.0
    retry_max: float = 300.0


@dataclass(frozen=True, kw_only=True)
class RefreshConfig:
    margin: float | None = None
    margin_ratio: float = 0.2
    retry_initial: float = 2.0
    retry_max: float = 300.0


@dataclass(frozen=True, kw_only=True)
class DisplayConfig:
    type: str = "console"
    path: Path | None = None
    blank_after: float | None = 300.0
    options: Mapping[str, Any] = field(default_factory=_empty_options)


@dataclass(frozen=True, kw_only=True)
class ButtonConfig:
    pin: int | None = None   # BCM GPIO number; None: no button
    hold: float = 5.0        # held this long: a new sign-in (agent.display.button)
    pull_up: bool = True


@dataclass(frozen=True, kw_only=True)
class StorageConfig:
    path: Path = field(default_factory=default_state_path)
    # auto: seal the tokens when systemd delivers the store key (agent.sealing).
    encryption: str = "auto"


@dataclass(frozen=True, kw_only=True)
class ApiConfig:
    socket: Path = field(default_factory=default_socket_path)
    mode: int = 0o660
    read_users: tuple[str, ...] = ()
    read_groups: tuple[str, ...] = ()
    admin_users: tuple[str, ...] = ()
    admin_groups: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    level: str = "info"


@dataclass(frozen=True, kw_only=True)
class MetricsConfig:
    # node_exporter's textfile collector reads this (agent.metrics); None: no file.
    textfile: Path | None = None


@dataclass(frozen=True, kw_only=True)
class SinkConfig:
    path: Path
    format: str = "raw"
    mode: int = 0o600
    owner: str | None = None
    group: str | None = None
    on_logout: str = "remove"
    env_prefix: str = ""


@dataclass(frozen=True, kw_only=True)
class HookConfig:
    command: tuple[str, ...]
    events: tuple[str, ...] = ("token_changed",)
    timeout: float = 30.0
    pass_token: bool = False


@dataclass(frozen=True, kw_only=True)
class MqttConfig:
    host: str | None = None          # None: no broker, and nothing of MQTT is imported
    port: int | None = None          # None: 1883, or 8883 with TLS
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    # Read when connecting, so a corrected file is used on the next try without a restart.
    password_file: Path | None = None
    client_id: str | None = None     # None: device-agent-<machine id>
    base_topic: str | None = None    # None: device-agent/<machine id>
    keepalive: int = 60
    heartbeat: float | None = 300.0
    discovery_prefix: str | None = "homeassistant"
    commands: tuple[str, ...] = ("new_code",)


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    provider: ProviderConfig
    device: DeviceConfig = field(default_factory=DeviceConfig)
    sign_in: SignInConfig = field(default_factory=SignInConfig)
    refresh: RefreshConfig = field(default_factory=RefreshConfig)
    display: DisplayConfig = field(default_factory=DisplayConfig)
    button: ButtonConfig = field(default_factory=ButtonConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    sinks: tuple[SinkConfig, ...] = ()
    hooks: tuple[HookConfig, ...] = ()
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    source: Path | None = None


# -- readers: one per kind of value -----------------------------------------------

@dataclass(frozen=True)
class _Context:
    base_dir: Path   # relative paths in the file are taken from here
    # Every problem found so far: a section reads all its keys before giving up, so a
    # person sees the whole list at once.
    errors: list[ConfigError] = dataclasses.field(default_factory=list)


class _SectionFailed(Exception):
    """A section with problems, already in the context's list: its parent goes on with
    its other keys and builds nothing from this one."""


Reader = Callable[[object, str, _Context], object]


class _UseDefault:
    """Returned by a reader when the value should fall back to the dataclass default."""


_USE_DEFAULT: Final = _UseDefault()


def _kind(value: object) -> str:
    # Only the type is named, never the value: it may be a secret.
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, Mapping):
        return "a mapping"
    return f"a {type(value).__name__}"


def _type_error(key: str, expected: str, value: object, hint: str = "") -> ConfigError:
    return ConfigError(key, f"expected {expected}, got {_kind(value)}{hint}")


def _string(value: object, key: str, ctx: _Context) -> str:
    if not isinstance(value, str):
        # A bare number in YAML is not text: 012 is octal, 1e3 is a float.
        hint = " (put it in quotes)" if isinstance(value, int | float) else ""
        raise _type_error(key, "a string", value, hint)
    if not value.strip():
        raise ConfigError(key, "must not be empty")
    return value


def _boolean(value: object, key: str, ctx: _Context) -> bool:
    if not isinstance(value, bool):
        raise _type_error(key, "true or false", value)
    return value


def _integer(minimum: int, maximum: int | None = None) -> Reader:
    def read(value: object, key: str, ctx: _Context) -> int:
        # bool is an int in Python, but `true` is never meant as a count.
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(key, "an integer", value)
        if value < minimum or (maximum is not None and value > maximum):
            accepted = (f"from {minimum} to {maximum}" if maximum is not None
                        else f"at least {minimum}")
            raise ConfigError(key, f"must be {accepted}, got {value}")
        return value
    return read


def _fraction(value: object, key: str, ctx: _Context) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _type_error(key, "a number between 0 and 1", value)
    if not 0.0 < value < 1.0:
        raise ConfigError(key, f"must be more than 0 and less than 1, got {value}")
    return float(value)


_DURATION_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_DURATION_TEXT = re.compile(r"(?:\d+(?:\.\d+)?\s*[smhd]\s*)+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")
_DURATION_UNITS: Final = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_FORMS: Final = 'seconds (90) or a number with units s, m, h, d ("90s", "10m", "1h30m")'


def parse_duration(value: object, key: str) -> float:
    """Seconds from a number or from text such as "90", "90s", "10m", "1h30m", "2d"."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _type_error(key, f"a duration: {_DURATION_FORMS}", value)
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise ConfigError(key, f"must not be empty; write {_DURATION_FORMS}")
        if text.startswith("-"):
            raise ConfigError(key, "must not be negative")
        if _DURATION_NUMBER.fullmatch(text):
            seconds = float(text)
        elif _DURATION_TEXT.fullmatch(text):
            seconds = sum(float(number) * _DURATION_UNITS[unit]
                          for number, unit in _DURATION_PART.findall(text))
        else:
            raise ConfigError(key, f"{value!r} is not a duration; write {_DURATION_FORMS}")
    else:
        seconds = float(value)
    if math.isnan(seconds) or math.isinf(seconds):
        raise ConfigError(key, f"must be a finite duration; write {_DURATION_FORMS}")
    if seconds < 0:
        raise ConfigError(key, "must not be negative")
    return seconds


def _duration(*, allow_zero: bool = False) -> Reader:
    def read(value: object, key: str, ctx: _Context) -> float:
        seconds = parse_duration(value, key)
        # A zero delay turns a back-off loop into a busy loop and a zero timeout
        # fails every request; only "blank the panel at once" means something at 0.
        if seconds == 0 and not allow_zero:
            raise ConfigError(key, "must be longer than 0 seconds")
        return seconds
    return read


def _optional(reader: Reader) -> Reader:
    """null is a meaningful value (None): "no margin", "never blank", "no CA file"."""
    def read(value: object, key: str, ctx: _Context) -> object:
        return None if value is None else reader(value, key, ctx)
    return read


def _null_means_default(reader: Reader) -> Reader:
    """null asks for the computed default (e.g. the host name), so the example file
    can show every key without hard-coding a value that differs per machine."""
    def read(value: object, key: str, ctx: _Context) -> object:
        return _USE_DEFAULT if value is None else reader(value, key, ctx)
    return read


def _path(value: object, key: str, ctx: _Context) -> Path:
    text = _string(value, key, ctx)
    if "\0" in text:
        raise ConfigError(key, "must not contain a NUL character")
    # abspath also normalises "a/../b", so messages and logs show the real location.
    return Path(os.path.abspath(ctx.base_dir / Path(text).expanduser()))


def _readable_file(value: object, key: str, ctx: _Context) -> Path:
    path = _path(value, key, ctx)
    try:
        # Opening is the only honest test: os.access() ignores ACLs and root.
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path} ({exc.strerror or exc}); "
                               "give the path of a readable file") from None
    return path


def _url(*, allow_query: bool = True) -> Reader:
    def read(value: object, key: str, ctx: _Context) -> str:
        text = _string(value, key, ctx).strip()
        try:
            parts = urlsplit(text)
            parts.port  # noqa: B018 - raises ValueError on a port out of range
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in ("https", "http") or not parts.hostname:
            raise ConfigError(key, "must be an absolute https:// URL with a host name")
        if parts.username is not None or parts.password is not None:
            raise ConfigError(key, "must not hold a user name or password")
        if parts.fragment or "#" in text:
            raise ConfigError(key, "must not have a #fragment")
        # RFC 8414 §2: the issuer identifier has no query component.
        if parts.query and not allow_query:
            raise ConfigError(key, "must not have a ?query")
        return text
    return read


_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")


def _scope(value: object, key: str, ctx: _Context) -> str:
    text = _string(value, key, ctx)
    # RFC 6749 §3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E ), joined by spaces.
    if not _SCOPE_TOKEN.fullmatch(text):
        raise ConfigError(key, "must be one scope name of printable ASCII without spaces, "
                               "quotes or backslashes; list each scope as its own item")
    return text


def _account(value: object, key: str, ctx: _Context) -> str:
    """A user or group: a name, or a numeric id (kept as text, as api.py expects)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return str(value)
    if not isinstance(value, str):
        raise _type_error(key, "a user or group name, or a numeric id", value)
    text = value.strip()
    if not text or any(c.isspace() or c == ":" for c in text):
        raise ConfigError(key, "must be a user or group name (no spaces or colons) "
                               "or a numeric id")
    return text


def _list(item: Reader) -> Reader:
    def read(value: object, key: str, ctx: _Context) -> tuple[object, ...]:
        if isinstance(value, str):
            # "openid profile" would otherwise become one scope with a space in it.
            raise _type_error(key, "a list", value,
                              "; write [a, b] or one item per line starting with '- '")
        if not isinstance(value, list | tuple):
            raise _type_error(key, "a list", value)
        return tuple(item(element, f"{key}[{index}]", ctx)
                     for index, element in enumerate(value))
    return read


def _choice(choices: frozenset[str] | tuple[str, ...], *, fold_case: bool = False) -> Reader:
    listed = ", ".join(sorted(choices))

    def read(value: object, key: str, ctx: _Context) -> str:
        if not isinstance(value, str):
            raise _type_error(key, f"one of: {listed}", value)
        text = value.strip().lower() if fold_case else value.strip()
        if text not in choices:
            raise ConfigError(key, f"{value!r} is not one of: {listed}")
        return text
    return read


_MODE_TEXT = re.compile(r"(?:0o)?[0-7]{1,4}")


def _mode(value: object, key: str, ctx: _Context) -> int:
    accepted = 'an octal permission mode up to 0777, such as 0660 or "0660"'
    if isinstance(value, str) and _MODE_TEXT.fullmatch(value.strip()):
        mode = int(value.strip().removeprefix("0o"), 8)
    elif isinstance(value, int) and not isinstance(value, bool):
        # YAML reads 0660 as octal already; a bare 660 is decimal and almost
        # certainly meant as octal, so it falls outside the range and is refused.
        mode = value
    else:
        raise ConfigError(key, f"expected {accepted}, got {_kind(value)}")
    if not 0 <= mode <= 0o777:
        raise ConfigError(key, f"expected {accepted}; {value!r} is out of range "
                               "(a bare 660 is decimal: write 0660)")
    return mode


def _options(value: object, key: str, ctx: _Context) -> Mapping[str, Any]:
    if value is None:
        return _empty_options()
    if not isinstance(value, Mapping):
        raise _type_error(key, "a mapping of option names to values", value)
    for name in value:
        if not isinstance(name, str):
            raise ConfigError(f"{key}.{name}", "option names must be text")
    # A private deep copy behind a read-only view: the caller's dict cannot change
    # the settings afterwards. The panel driver validates the contents.
    return MappingProxyType(copy.deepcopy(dict(value)))


# -- sections ---------------------------------------------------------------------

@dataclass(frozen=True)
class _Section:
    cls: type[Any]
    fields: Mapping[str, Reader]
    check: Callable[[Any, str], Any] | None = None   # rules across keys; may derive values
    derived: frozenset[str] = frozenset()            # dataclass fields not read from the file

    def __post_init__(self) -> None:
        # A field without a reader could never be set from the file, and a reader
        # without a field would fail at construction: catch both at import time.
        names = {f.name for f in dataclasses.fields(self.cls)} - self.derived
        if names != set(self.fields):
            raise TypeError(f"{self.cls.__name__}: readers {sorted(self.fields)} do not "
                            f"match fields {sorted(names)}")


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _unknown_key(name: str, accepted: Mapping[str, Reader]) -> str:
    import difflib  # only for a config that is wrong

    close = difflib.get_close_matches(name, accepted, n=1)
    guess = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key; {guess}accepted keys: {', '.join(accepted)}"


def _required(spec: _Section) -> list[str]:
    return [f.name for f in dataclasses.fields(spec.cls)
            if f.name not in spec.derived
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING]


def _key_text(name: object) -> str:
    """A non-text key as the person typed it (`on` read as True), or its kind when even
    that cannot be had (a 5000-digit number)."""
    try:
        text = str(name)
    except ValueError:
        return f"<{_kind(name)}>"
    return text if len(text) <= 40 else f"<{_kind(name)}>"


@contextlib.contextmanager
def _foreign_errors_as(key: str) -> Iterator[None]:
    """Only ConfigError leaves the parser: what the standard library raises about an
    absurd value (a 5000-digit number, a path with a lone surrogate, ~nosuchuser) is
    said as a problem with that key."""
    try:
        yield
    except ConfigError:
        raise
    except (ValueError, OverflowError, RuntimeError, UnicodeError, TypeError, OSError,
            RecursionError) as exc:
        raise ConfigError(key, f"is not a usable value ({type(exc).__name__})") from None


def _section(spec: _Section) -> Reader:
    def read(value: object, key: str, ctx: _Context) -> object:
        # An empty section ("device:" with every key commented out) is null in YAML.
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise _type_error(key, "a mapping of keys to values", value)
        values: dict[str, object] = {}
        failed: set[str] = set()
        for name, raw in value.items():
            try:
                if not isinstance(name, str):
                    raise ConfigError(_join(key, _key_text(name)),
                                      f"keys must be text, got {_kind(name)} (YAML reads "
                                      "on/off/yes/no as booleans; quote the key)")
                reader = spec.fields.get(name)
                if reader is None:
                    raise ConfigError(_join(key, name), _unknown_key(name, spec.fields))
                with _foreign_errors_as(_join(key, name)):
                    result = reader(raw, _join(key, name), ctx)
            except ConfigError as exc:
                ctx.errors.append(exc)
                failed.add(_key_text(name))
                continue
            except _SectionFailed:
                failed.add(_key_text(name))
                continue
            if result is not _USE_DEFAULT:
                values[name] = result
        for name in _required(spec):
            if name not in values and name not in failed:
                ctx.errors.append(ConfigError(_join(key, name), "required"))
                failed.add(name)
        if failed:
            raise _SectionFailed
        with _foreign_errors_as(key):
            built = spec.cls(**values)
            return spec.check(built, key) if spec.check is not None else built
    return read


_PROVIDER_URLS: Final = ("issuer", "device_authorization_endpoint", "token_endpoint",
                         "revocation_endpoint", "userinfo_endpoint")


def read_secret_file(path: Path, key: str, *, what: str = "the client secret") -> str:
    """The secret in `path`, stripped; a ConfigError for `key` that names the file,
    never its contents."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path} ({exc.strerror or exc})") from None
    try:
        secret = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(key, f"{path} is not UTF-8 text") from None
    if not secret:
        raise ConfigError(key, f"{path} is empty; it must hold {what}")
    return secret


def _check_provider(provider: ProviderConfig, key: str) -> ProviderConfig:
    if provider.issuer is None and not (provider.device_authorization_endpoint
                                        and provider.token_endpoint):
        if provider.device_authorization_endpoint is None and provider.token_endpoint is None:
            raise ConfigError(_join(key, "issuer"), (
                f"required (or set both {_join(key, 'device_authorization_endpoint')} and "
                f"{_join(key, 'token_endpoint')} for a provider without discovery)"))
        missing = ("token_endpoint" if provider.token_endpoint is None
                   else "device_authorization_endpoint")
        raise ConfigError(_join(key, missing), f"required when {_join(key, 'issuer')} is not set")
    if not provider.allow_insecure_http:
        for name in _PROVIDER_URLS:
            url = getattr(provider, name)
            if url is not None and urlsplit(url).scheme == "http":
                raise ConfigError(_join(key, name), (
                    f"uses http://, which sends codes and tokens in clear text; use https://, "
                    f"or set {_join(key, 'allow_insecure_http')}: true for loopback tests"))
    if provider.client_secret_file is not None:
        if provider.client_secret is not None:
            raise ConfigError(_join(key, "client_secret_file"), (
                f"cannot be combined with {_join(key, 'client_secret')}; set only one of them"))
        secret = read_secret_file(provider.client_secret_file, _join(key, "client_secret_file"))
        provider = dataclasses.replace(provider, client_secret=secret)
    return provider


def _check_backoff(pairs: tuple[tuple[str, str], ...]) -> Callable[[Any, str], Any]:
    """Each (low, high) pair: the cap of a back-off must not be below its first step."""
    def check(section: Any, key: str) -> Any:
        for low, high in pairs:
            if getattr(section, high) < getattr(section, low):
                raise ConfigError(_join(key, high),
                                  f"must be at least {_join(key, low)} "
                                  f"({getattr(section, low):g} s)")
        return section
    return check


def _check_display(display: DisplayConfig, key: str) -> DisplayConfig:
    if display.type == "png" and display.path is None:
        raise ConfigError(_join(key, "path"),
                          f"required when {_join(key, 'type')} is png (where frames go)")
    return display


def _check_api(api: ApiConfig, key: str) -> ApiConfig:
    if len(os.fsencode(api.socket)) > _MAX_SOCKET_PATH_BYTES:
        raise ConfigError(_join(key, "socket"),
                          f"is longer than {_MAX_SOCKET_PATH_BYTES} bytes, the limit for "
                          "Unix socket paths; choose a shorter path")
    return api


_PROVIDER = _Section(ProviderConfig, {
    "issuer": _optional(_url(allow_query=False)),
    "client_id": _string,
    "client_secret": _optional(_string),
    "client_secret_file": _optional(_path),
    "scopes": _list(_scope),
    "ca_file": _optional(_readable_file),
    "allow_insecure_http": _boolean,
    "device_authorization_endpoint": _optional(_url()),
    "token_endpoint": _optional(_url()),
    "revocation_endpoint": _optional(_url()),
    "userinfo_endpoint": _optional(_url()),
    "timeout": _duration(),
    "max_response_bytes": _integer(1024),
}, _check_provider)

_DEVICE = _Section(DeviceConfig, {
    "name": _null_means_default(_string),
})

_SIGN_IN = _Section(SignInConfig, {
    # authentik allows 20 device requests an hour per address; 60 is a hard ceiling.
    "codes_per_hour": _integer(1, 60),
    "throttle_backoff": _duration(),
    "throttle_backoff_max": _duration(),
    "retry_initial": _duration(),
    "retry_max": _duration(),
}, _check_backoff((("throttle_backoff", "throttle_backoff_max"),
                   ("retry_initial", "retry_max"))))

_REFRESH = _Section(RefreshConfig, {
    "margin": _optional(_duration()),
    "margin_ratio": _fraction,
    "retry_initial": _duration(),
    "retry_max": _duration(),
}, _check_backoff((("retry_initial", "retry_max"),)))

_DISPLAY = _Section(DisplayConfig, {
    "type": _choice(DISPLAY_TYPES),
    "path": _optional(_path),
    "blank_after": _optional(_duration(allow_zero=True)),
    "options": _options,
}, _check_display)

_BUTTON = _Section(ButtonConfig, {
    "pin": _optional(_integer(0, 53)),
    "hold": _duration(),
    "pull_up": _boolean,
})

# Where versions before the button: section read the button from; such a config must
# keep working after an upgrade, since a device that exits 78 stays dead.
_OLD_BUTTON_KEYS: Final = {"button_pin": "pin", "button_hold": "hold",
                           "button_pull_up": "pull_up"}


def _move_old_button_keys(config: AgentConfig, key: str) -> AgentConfig:
    options = config.display.options
    rest = {name: value for name, value in options.items() if name not in _OLD_BUTTON_KEYS}
    if len(rest) == len(options):
        return config
    display = dataclasses.replace(config.display, options=MappingProxyType(rest))
    # A null meant the default there, and a null pin no button at all.
    old = [name for name in _OLD_BUTTON_KEYS if options.get(name) is not None]
    if not old:
        return dataclasses.replace(config, display=display)
    if config.button != ButtonConfig():
        raise ConfigError(f"display.options.{old[0]}",
                          f"is the old place of button.{_OLD_BUTTON_KEYS[old[0]]}, which "
                          "is set too; remove the display.options.button_* keys")
    ctx = _Context(base_dir=Path.cwd())  # the button's readers read no paths
    values: dict[str, Any] = {_OLD_BUTTON_KEYS[name]: _BUTTON.fields[_OLD_BUTTON_KEYS[name]](
        options[name], f"display.options.{name}", ctx) for name in old}
    moved = ", ".join(f"display.options.{name} as button.{_OLD_BUTTON_KEYS[name]}"
                      for name in old)
    logging.getLogger(__name__).warning(
        "read %s; write them in the button: section instead (button: {pin: 17, hold: 5s})",
        moved)
    return dataclasses.replace(config, button=ButtonConfig(**values), display=display)


def _encryption(value: object, key: str, ctx: _Context) -> str:
    # YAML 1.1 reads a bare `off` as false: the person wrote the word, and means it.
    if value is False:
        return "off"
    result = _choice(ENCRYPTION_MODES)(value, key, ctx)
    assert isinstance(result, str)
    return result


_STORAGE = _Section(StorageConfig, {
    "path": _null_means_default(_path),
    "encryption": _null_means_default(_encryption),
})

_API = _Section(ApiConfig, {
    "socket": _null_means_default(_path),
    "mode": _mode,
    "read_users": _list(_account),
    "read_groups": _list(_account),
    "admin_users": _list(_account),
    "admin_groups": _list(_account),
}, _check_api)

_LOGGING = _Section(LoggingConfig, {
    "level": _choice(LOG_LEVELS, fold_case=True),
})


def _textfile(value: object, key: str, ctx: _Context) -> Path:
    path = _path(value, key, ctx)
    if path.suffix != ".prom":
        # The collector reads only *.prom: any other name would be silently ignored.
        raise ConfigError(key, "must be a file name ending in .prom: node_exporter's "
                               "textfile collector reads only *.prom files")
    return path


_METRICS = _Section(MetricsConfig, {
    "textfile": _optional(_textfile),
})

def _string_or_empty(value: object, key: str, ctx: _Context) -> str:
    if not isinstance(value, str):
        raise _type_error(key, "text", value)
    return value.strip()


def _argv(value: object, key: str, ctx: _Context) -> tuple[str, ...]:
    """A command as an argv list: run without a shell, so nothing is re-parsed."""
    if isinstance(value, str):
        raise _type_error(key, "a list of arguments", value,
                          "; write [/usr/local/bin/tool, --flag] (no shell is used)")
    argv = _list(_string)(value, key, ctx)
    assert isinstance(argv, tuple)
    if not argv:
        raise ConfigError(key, "must name a program")
    first = str(argv[0])
    if not os.path.isabs(first):
        raise ConfigError(f"{key}[0]", "must be an absolute path (hooks run without a "
                                       "shell or a search path)")
    return tuple(str(a) for a in argv)


def _check_sink(sink: SinkConfig, key: str) -> SinkConfig:
    if sink.format != "env" and sink.env_prefix:
        raise ConfigError(_join(key, "env_prefix"), "only applies to format env")
    if sink.env_prefix and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", sink.env_prefix):
        raise ConfigError(_join(key, "env_prefix"),
                          "must be letters, digits and underscores, not starting with a digit")
    return sink


_SINK = _Section(SinkConfig, {
    "path": _path,
    "format": _choice(SINK_FORMATS),
    "mode": _mode,
    "owner": _optional(_account),
    "group": _optional(_account),
    "on_logout": _choice(("remove", "empty")),
    "env_prefix": _string_or_empty,
}, _check_sink)

_HOOK = _Section(HookConfig, {
    "command": _argv,
    "events": _list(_choice(HOOK_EVENTS)),
    "timeout": _duration(),
    "pass_token": _boolean,
})

def _host(value: object, key: str, ctx: _Context) -> str:
    text = _string(value, key, ctx).strip()
    if "://" in text:
        raise ConfigError(key, "must be a host name or address, without mqtt:// (TLS is "
                               "mqtt.tls, the port mqtt.port)")
    if any(c.isspace() or c in "/?#@" for c in text):
        raise ConfigError(key, "must be a host name or address")
    return text


def _no_controls(text: str, key: str) -> str:
    if any(ord(c) < 0x20 or ord(c) == 0x7f for c in text):
        raise ConfigError(key, "must not hold control characters")
    return text


def _topic(value: object, key: str, ctx: _Context) -> str:
    # The agent publishes under it and subscribes to its command topic: a wildcard would
    # make it hear other devices' commands.
    text = _no_controls(_string(value, key, ctx), key)
    if "+" in text or "#" in text:
        raise ConfigError(key, "must not hold the wildcards + or #")
    if text.startswith("/") or text.endswith("/"):
        raise ConfigError(key, "must not start or end with /")
    if text.startswith("$"):
        raise ConfigError(key, "must not start with $ (the broker's own topics)")
    return text


def _client_id(value: object, key: str, ctx: _Context) -> str:
    return _no_controls(_string(value, key, ctx), key)


def _keepalive(value: object, key: str, ctx: _Context) -> int:
    seconds = _duration()(value, key, ctx)
    assert isinstance(seconds, float)
    if seconds > 65535:
        raise ConfigError(key, "must be at most 65535 seconds (18 h), MQTT's limit")
    return max(1, round(seconds))


def _check_mqtt(mqtt: MqttConfig, key: str) -> MqttConfig:
    if not mqtt.tls:
        for name in ("ca_file", "cert_file", "key_file"):
            if getattr(mqtt, name) is not None:
                raise ConfigError(_join(key, name),
                                  f"only applies with {_join(key, 'tls')}: true")
    if mqtt.key_file is not None and mqtt.cert_file is None:
        raise ConfigError(_join(key, "key_file"),
                          f"is the key of a client certificate: set {_join(key, 'cert_file')}")
    if mqtt.password_file is not None:
        if mqtt.username is None:
            raise ConfigError(_join(key, "password_file"),
                              f"needs {_join(key, 'username')}, the user it is the password of")
        # Read now, so that check-config and the start (exit 78) find a file that cannot
        # be; the agent reads it again on every connection.
        read_secret_file(mqtt.password_file, _join(key, "password_file"),
                         what="the broker password")
    return mqtt


_MQTT = _Section(MqttConfig, {
    "host": _optional(_host),
    "port": _optional(_integer(1, 65535)),
    "tls": _boolean,
    "ca_file": _optional(_readable_file),
    "cert_file": _optional(_readable_file),
    "key_file": _optional(_readable_file),
    "username": _optional(_client_id),
    "password_file": _optional(_path),
    "client_id": _optional(_client_id),
    "base_topic": _optional(_topic),
    "keepalive": _keepalive,
    "heartbeat": _optional(_duration()),
    "discovery_prefix": _optional(_topic),
    "commands": _list(_choice(MQTT_COMMANDS)),
}, _check_mqtt)

_AGENT = _Section(AgentConfig, {
    "provider": _section(_PROVIDER),
    "device": _section(_DEVICE),
    "sign_in": _section(_SIGN_IN),
    "refresh": _section(_REFRESH),
    "display": _section(_DISPLAY),
    "button": _section(_BUTTON),
    "storage": _section(_STORAGE),
    "api": _section(_API),
    "logging": _section(_LOGGING),
    "metrics": _section(_METRICS),
    "sinks": _list(_section(_SINK)),
    "hooks": _list(_section(_HOOK)),
    "mqtt": _section(_MQTT),
}, _move_old_button_keys, derived=frozenset({"source"}))


# -- entry points -----------------------------------------------------------------

def config_from_mapping(data: Mapping[str, Any], *, source: Path | None = None) -> AgentConfig:
    """Validate already-parsed settings. Relative paths are taken from the directory of
    `source` when given, else from the current directory."""
    return _validated(data, source=source, lines={})


def _validated(data: Mapping[str, Any], *, source: Path | None,
               lines: Mapping[str, int]) -> AgentConfig:
    base_dir = source.parent if source is not None else Path.cwd()
    ctx = _Context(base_dir=base_dir)
    try:
        config = _section(_AGENT)(data, "", ctx)
    except ConfigError as exc:  # a rule across sections, or the top level itself
        ctx.errors.append(exc)
    except _SectionFailed:
        pass
    if ctx.errors:
        found = [error.at_line(_line_of(error.key, lines)) for error in ctx.errors]
        first = found[0]
        raise ConfigError(first.key, first.message, line=first.line, errors=found)
    assert isinstance(config, AgentConfig)
    return dataclasses.replace(config, source=source) if source is not None else config


def _line_of(key: str, lines: Mapping[str, int]) -> int | None:
    """The line of `key`, or of the nearest section around it (a required key that is
    missing is named where its section starts)."""
    while key:
        if key in lines:
            return lines[key]
        key = key.rpartition(".")[0] if "[" not in key.rpartition(".")[2] else (
            key.rpartition("[")[0])
    return None


def _key_lines(root: yaml.Node) -> dict[str, int]:
    """Dotted key paths (sinks[0].format) to the 1-based line that names them. A loop,
    not recursion: the document may be nested deeper than Python's stack."""
    found: dict[str, int] = {}
    pending: list[tuple[yaml.Node, str]] = [(root, "")]
    # An alias is the node of its anchor again: walked once, or a recursive alias
    # (x: &a [*a]) never ends and a "billion laughs" document grows without bound.
    seen: set[int] = set()
    while pending:
        node, prefix = pending.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode):
                    path = _join(prefix, str(key_node.value))
                    found.setdefault(path, key_node.start_mark.line + 1)
                    pending.append((value_node, path))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                path = f"{prefix}[{index}]"
                found.setdefault(path, item.start_mark.line + 1)
                pending.append((item, path))
    return found


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping: PyYAML would silently
    keep the last one, hiding the value the reader of the file sees first."""

    def construct_mapping(self, node: yaml.MappingNode,
                          deep: bool = False) -> dict[Hashable, Any]:
        # Merge keys (<<: *defaults) first, as SafeLoader does, so "<<" is not read as
        # a key of its own.
        self.flatten_mapping(node)
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # the base class reports unhashable keys itself
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"{exc.problem} (line {mark.line + 1}, column {mark.column + 1})"
    return str(exc)


# The name the shipped unit's LoadCredential= gives the config. The file itself is
# root's alone (0600): the token readers share the socket's group, and a client secret in
# the config is not theirs to read, so systemd hands the service a copy.
SERVICE_COPY = "config.yaml"


def load_config(path: Path, *, environ: Mapping[str, str] = os.environ) -> AgentConfig:
    """Read and validate a YAML config file. Errors about the file itself carry the
    file's path as their key; errors about a value carry the value's dotted key.

    A file this process may not read is read from the copy systemd passed
    ($CREDENTIALS_DIRECTORY/config.yaml), when there is one; relative paths in it still
    count from the file's own directory."""
    source = Path(path).absolute()
    try:
        raw = source.read_bytes()
    except PermissionError as exc:
        raw = _service_copy(environ, exc, source)
    except OSError as exc:
        raise ConfigError(str(source), f"cannot read the config file "
                                       f"({exc.strerror or exc})") from None
    try:
        # As yaml.load does it, keeping the node tree for the line of each key.
        loader = _StrictLoader(raw)  # a SafeLoader: no arbitrary objects
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise ConfigError(str(source), f"is not valid YAML: {_yaml_problem(exc)}") from None
    except (ValueError, OverflowError, RecursionError, AttributeError, TypeError) as exc:
        # PyYAML's constructors raise these for 2001-02-30, "!!int x", deep nesting.
        raise ConfigError(str(source), f"is not valid YAML: a value cannot be read "
                                       f"({type(exc).__name__})") from None
    if data is None:
        raise ConfigError(str(source), "is empty; it needs at least provider.client_id "
                                       "and provider.issuer")
    if not isinstance(data, Mapping):
        raise ConfigError(str(source), f"must be a mapping of sections (provider:, "
                                       f"device:, ...), got {_kind(data)}")
    config = _validated(data, source=source,
                        lines=_key_lines(node) if node is not None else {})
    _warn_exposed_secret(data, source)
    return config


# config.example.yaml's issuer, which install-service copies into place: a device run
# with it would only ever say "No network" while nothing could sign it in.
EXAMPLE_ISSUER = "https://auth.example.com/application/o/my-device/"


def still_the_example(config: AgentConfig) -> str | None:
    """Why `config` cannot sign anything in as it stands, or None."""
    if config.provider.issuer == EXAMPLE_ISSUER:
        return (f"provider.issuer is still the example's {EXAMPLE_ISSUER}; set it to your "
                f"provider's issuer (authentik: https://HOST/application/o/SLUG/)")
    return None


def _service_copy(environ: Mapping[str, str], denied: PermissionError, source: Path) -> bytes:
    """systemd's copy, when it is a copy of this file: a drop-in that points --config
    elsewhere and leaves LoadCredential= alone must not run on the other file's
    settings. The file's size can be had without reading it."""
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if directory:
        copy = Path(directory) / SERVICE_COPY
        try:
            data = copy.read_bytes()
            same_size = len(data) == source.stat().st_size
        except OSError:
            pass
        else:
            if same_size:
                logging.getLogger(__name__).info(
                    "read %s through systemd's copy of it (LoadCredential=)", source)
                return data
            raise ConfigError(str(source), f"cannot read the config file "
                                           f"({denied.strerror}), and systemd's copy "
                                           f"({copy}) is of another file: make "
                                           f"LoadCredential={SERVICE_COPY}: name {source}"
                              ) from None
    raise ConfigError(str(source), f"cannot read the config file ({denied.strerror}); "
                                   "under systemd the unit passes it with "
                                   f"LoadCredential={SERVICE_COPY}:{source}") from None


def _warn_exposed_secret(data: Mapping[str, Any], source: Path) -> None:
    """A client secret written into a config that others may read: in the socket's
    group are the token readers, who must not have it."""
    provider = data.get("provider")
    if not isinstance(provider, Mapping) or provider.get("client_secret") in (None, ""):
        return
    try:
        mode = source.stat().st_mode
    except OSError:
        return
    if mode & 0o044:
        logging.getLogger(__name__).warning(
            "provider.client_secret is written in %s, which others may read (mode %04o); "
            "move it to provider.client_secret_file, a file only the agent can read "
            "(0600), or a systemd LoadCredential=", source, mode & 0o7777)
