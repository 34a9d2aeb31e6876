import dataclasses
import logging
import os
import socket
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.config import (
    DISPLAY_TYPES,
    AgentConfig,
    ApiConfig,
    DisplayConfig,
    ProviderConfig,
    StorageConfig,
    config_from_mapping,
    default_socket_path,
    default_state_path,
    load_config,
    parse_duration,
)
from agent.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.yaml"
ISSUER = "https://auth.example.com/application/o/my-device/"
SECRET = "s3cr3t-Value-9f2c"


def minimal(**sections: Mapping[str, Any]) -> dict[str, Any]:
    """The smallest valid config, with `sections` merged over it key by key."""
    data: dict[str, Any] = {"provider": {"issuer": ISSUER, "client_id": "my-device"}}
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return data


def error_for(data: Mapping[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        config_from_mapping(data)
    return caught.value


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def section_types() -> dict[str, type[Any]]:
    hints = typing.get_type_hints(AgentConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(AgentConfig)
            if f.name != "source"}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Defaults come from these; a developer's or systemd's values must not leak in.
    for name in ("STATE_DIRECTORY", "RUNTIME_DIRECTORY", "XDG_STATE_HOME", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


# -- the example file -------------------------------------------------------------

def test_example_loads() -> None:
    config = load_config(EXAMPLE)
    assert config.provider.issuer == ISSUER
    assert config.provider.client_id == "my-device"
    assert config.storage.path == Path("/var/lib/device-agent/credentials.json")
    assert config.api.socket == Path("/run/device-agent/agent.sock")
    assert config.source == EXAMPLE


def test_example_names_every_field_of_every_section() -> None:
    text = EXAMPLE.read_text()
    raw = yaml.safe_load(text)
    missing = []
    for section, cls in section_types().items():
        if typing.get_origin(cls) is tuple:
            # A list section (sinks, hooks) is empty by default; its keys are shown in
            # the commented example entry below it.
            (item, _) = typing.get_args(cls)
            missing += [f"{section}[].{f.name}" for f in dataclasses.fields(item)
                        if f"#    {f.name}:" not in text and f"#  - {f.name}:" not in text]
            continue
        missing += [f"{section}.{f.name}" for f in dataclasses.fields(cls)
                    if f.name not in (raw.get(section) or {})]
    assert missing == []


def test_example_list_entries_load_when_uncommented() -> None:
    text = EXAMPLE.read_text().replace("sinks: []", "sinks:").replace("hooks: []", "hooks:")
    text = "\n".join(line[1:] if line.startswith(("#  - ", "#    ")) else line
                     for line in text.splitlines())
    config = config_from_mapping(yaml.safe_load(text))
    assert config.sinks[0].path == Path("/run/device-agent/token.env")
    assert config.hooks[0].command == ("/usr/local/bin/reload-uploader", "--quiet")


def test_example_shows_the_defaults() -> None:
    # Only these differ on purpose: the placeholder client and the systemd paths.
    expected = AgentConfig(
        provider=ProviderConfig(issuer=ISSUER, client_id="my-device"),
        storage=StorageConfig(path=Path("/var/lib/device-agent/credentials.json")),
        api=ApiConfig(socket=Path("/run/device-agent/agent.sock")),
        source=EXAMPLE,
    )
    assert load_config(EXAMPLE) == expected


def test_minimal_config_gets_every_default() -> None:
    config = config_from_mapping(minimal())
    assert config.provider.scopes == ("openid", "profile", "email", "offline_access")
    assert config.provider.client_secret is None
    assert config.provider.timeout == 15.0
    assert config.device.name == socket.gethostname()
    assert config.sign_in.codes_per_hour == 12
    assert config.refresh.margin is None
    assert config.display.type == "console"
    assert config.display.blank_after == 300.0
    assert dict(config.display.options) == {}
    assert config.api.mode == 0o660
    assert config.logging.level == "info"
    assert config.source is None


def test_settings_are_frozen_and_options_read_only() -> None:
    options: dict[str, Any] = {"port": 1, "address": 0x3C, "spi": {"device": 0}}
    config = config_from_mapping(minimal(display={"type": "ssd1306", "options": options}))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.provider.client_id = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.display.options["port"] = 2  # type: ignore[index]
    options["spi"]["device"] = 1
    assert config.display.options["spi"] == {"device": 0}
    assert config.display.options["address"] == 0x3C


# -- durations --------------------------------------------------------------------

@pytest.mark.parametrize(("value", "seconds"), [
    (90, 90.0), (90.5, 90.5), (0, 0.0), ("90", 90.0), ("90.5", 90.5), ("90s", 90.0),
    ("10m", 600.0), ("1h", 3600.0), ("1h30m", 5400.0), ("1h 30m", 5400.0),
    (" 2d ", 172800.0), ("1.5h", 5400.0), ("1d2h3m4s", 93784.0),
])
def test_duration_good(value: object, seconds: float) -> None:
    assert parse_duration(value, "x.y") == seconds


@pytest.mark.parametrize("value", [
    -1, -0.5, "-5s", "-90", "", "   ", True, False, None, [10], {"s": 1}, "abc", "10x",
    "1h-30m", "m", "h1", "1e3", "10 minutes", "1,5h", float("inf"), float("nan"), "1H",
])
def test_duration_bad_names_the_key(value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_duration(value, "sign_in.retry_max")
    assert caught.value.key == "sign_in.retry_max"
    assert str(caught.value).startswith("sign_in.retry_max: ")


def test_duration_fields_accept_text_and_refuse_zero_where_it_makes_no_sense() -> None:
    config = config_from_mapping(minimal(
        sign_in={"throttle_backoff": "15m", "throttle_backoff_max": "2h"},
        refresh={"margin": "5m"}, display={"blank_after": 0}))
    assert config.sign_in.throttle_backoff == 900.0
    assert config.sign_in.throttle_backoff_max == 7200.0
    assert config.refresh.margin == 300.0
    assert config.display.blank_after == 0.0
    assert str(error_for(minimal(sign_in={"retry_initial": 0}))).startswith(
        "sign_in.retry_initial: must be longer than 0")
    assert error_for(minimal(provider={"timeout": "0s"})).key == "provider.timeout"


def test_null_means_none_only_where_none_is_meaningful() -> None:
    config = config_from_mapping(minimal(refresh={"margin": None},
                                         display={"blank_after": None}))
    assert config.refresh.margin is None
    assert config.display.blank_after is None
    assert error_for(minimal(provider={"timeout": None})).key == "provider.timeout"


# -- errors name the exact key ----------------------------------------------------

def test_missing_client_id() -> None:
    assert str(error_for({"provider": {"issuer": ISSUER}})) == "provider.client_id: required"


def test_missing_provider_section() -> None:
    assert str(error_for({"device": {"name": "kiosk"}})) == "provider: required"


def test_issuer_or_both_endpoints_required() -> None:
    no_issuer = {"provider": {"client_id": "c"}}
    error = error_for(no_issuer)
    assert error.key == "provider.issuer"
    assert "provider.token_endpoint" in error.message
    only_device = {"provider": {"client_id": "c",
                                "device_authorization_endpoint": "https://h/device"}}
    assert error_for(only_device).key == "provider.token_endpoint"
    only_token = {"provider": {"client_id": "c", "token_endpoint": "https://h/token"}}
    assert error_for(only_token).key == "provider.device_authorization_endpoint"
    both = {"provider": {"client_id": "c", "device_authorization_endpoint": "https://h/d",
                         "token_endpoint": "https://h/t"}}
    config = config_from_mapping(both)
    assert config.provider.issuer is None
    assert config.provider.token_endpoint == "https://h/t"


@pytest.mark.parametrize(("data", "key", "fragment"), [
    (minimal(provider={"client_id": 12345}), "provider.client_id", "expected a string"),
    (minimal(provider={"client_id": ""}), "provider.client_id", "must not be empty"),
    (minimal(provider={"allow_insecure_http": "yes"}), "provider.allow_insecure_http",
     "expected true or false"),
    (minimal(provider={"scopes": "openid profile"}), "provider.scopes", "expected a list"),
    (minimal(provider={"scopes": ["openid", ""]}), "provider.scopes[1]", "must not be empty"),
    (minimal(provider={"scopes": ["openid", "a b"]}), "provider.scopes[1]", "without spaces"),
    (minimal(provider={"scopes": ["openid", 7]}), "provider.scopes[1]", "expected a string"),
    (minimal(provider={"max_response_bytes": 10}), "provider.max_response_bytes",
     "at least 1024"),
    (minimal(provider={"max_response_bytes": "1MB"}), "provider.max_response_bytes",
     "expected an integer"),
    (minimal(sign_in={"codes_per_hour": True}), "sign_in.codes_per_hour",
     "expected an integer, got a boolean"),
    (minimal(sign_in={"codes_per_hour": 0}), "sign_in.codes_per_hour", "from 1 to 60"),
    (minimal(sign_in={"codes_per_hour": 61}), "sign_in.codes_per_hour", "from 1 to 60"),
    (minimal(sign_in={"codes_per_hour": 12.5}), "sign_in.codes_per_hour",
     "expected an integer"),
    (minimal(sign_in={"throttle_backoff": "20m", "throttle_backoff_max": "10m"}),
     "sign_in.throttle_backoff_max", "at least sign_in.throttle_backoff"),
    (minimal(sign_in={"retry_initial": 60, "retry_max": 30}), "sign_in.retry_max",
     "at least sign_in.retry_initial"),
    (minimal(refresh={"retry_initial": 60, "retry_max": 30}), "refresh.retry_max",
     "at least refresh.retry_initial"),
    (minimal(refresh={"margin_ratio": 0}), "refresh.margin_ratio", "more than 0"),
    (minimal(refresh={"margin_ratio": 1}), "refresh.margin_ratio", "less than 1"),
    (minimal(refresh={"margin_ratio": True}), "refresh.margin_ratio", "got a boolean"),
    (minimal(refresh={"margin": "soon"}), "refresh.margin", "not a duration"),
    (minimal(device={"name": ["a"]}), "device.name", "expected a string, got a list"),
    (minimal(display={"type": "oled"}), "display.type", "ssd1306"),
    (minimal(display={"type": "png"}), "display.path", "required when display.type is png"),
    (minimal(display={"options": ["rotate"]}), "display.options", "expected a mapping"),
    (minimal(display={"options": {1: "x"}}), "display.options.1", "option names"),
    (minimal(storage={"path": 5}), "storage.path", "expected a string"),
    (minimal(api={"mode": 660}), "api.mode", "write 0660"),
    (minimal(api={"mode": "0999"}), "api.mode", "octal"),
    (minimal(api={"mode": True}), "api.mode", "got a boolean"),
    (minimal(api={"read_users": "alice"}), "api.read_users", "expected a list"),
    (minimal(api={"read_users": ["alice", "bob", ["carol"]]}), "api.read_users[2]",
     "expected a user or group name"),
    (minimal(api={"admin_groups": ["wheel", "two words"]}), "api.admin_groups[1]",
     "no spaces"),
    (minimal(api={"socket": "/run/" + "x" * 120}), "api.socket", "107 bytes"),
    (minimal(logging={"level": "verbose"}), "logging.level", "debug, error, info, warning"),
    ({**minimal(), "device": "kitchen"}, "device", "expected a mapping"),
    ({**minimal(), "provider": ["issuer"]}, "provider", "expected a mapping"),
])
def test_invalid_value_names_the_key(data: dict[str, Any], key: str, fragment: str) -> None:
    error = error_for(data)
    assert error.key == key
    assert str(error).startswith(f"{key}: ")
    assert fragment in error.message


def test_unknown_key_at_top_level() -> None:
    error = error_for({**minimal(), "sign-in": {"codes_per_hour": 3}})
    assert error.key == "sign-in"
    assert "did you mean 'sign_in'" in error.message
    for accepted in ("provider", "device", "sign_in", "refresh", "display", "storage",
                     "api", "logging"):
        assert accepted in error.message
    assert "source" not in error.message


def test_unknown_key_nested() -> None:
    error = error_for(minimal(provider={"client_secrte": "x"}))
    assert error.key == "provider.client_secrte"
    assert "did you mean 'client_secret'" in error.message
    assert "accepted keys: issuer, client_id, client_secret," in error.message
    assert error_for(minimal(api={"sokcet": "/run/a.sock"})).key == "api.sokcet"


def test_source_is_not_a_config_key() -> None:
    assert error_for({**minimal(), "source": "/etc/x.yaml"}).key == "source"


def test_non_text_key_is_explained(tmp_path: Path) -> None:
    # YAML 1.1 reads a bare `on` as true.
    path = write(tmp_path / "c.yaml", f"provider:\n  issuer: {ISSUER}\n  client_id: c\non: 1\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == "True"
    assert "quote the key" in caught.value.message


def test_empty_sections_take_defaults() -> None:
    config = config_from_mapping({**minimal(), "device": None, "sign_in": None})
    assert config.device.name == socket.gethostname()
    assert config.sign_in.codes_per_hour == 12


# -- accepted forms ---------------------------------------------------------------

@pytest.mark.parametrize("mode", [0o660, 432, "0660", "660", "0o660"])
def test_mode_forms(mode: object) -> None:
    assert config_from_mapping(minimal(api={"mode": mode})).api.mode == 0o660


def test_mode_from_yaml_octal(tmp_path: Path) -> None:
    text = f"provider:\n  issuer: {ISSUER}\n  client_id: c\napi:\n  mode: 0640\n"
    assert load_config(write(tmp_path / "c.yaml", text)).api.mode == 0o640


def test_accounts_take_names_and_numeric_ids() -> None:
    config = config_from_mapping(minimal(api={"read_users": ["alice", 1000],
                                              "admin_groups": [0, "wheel"]}))
    assert config.api.read_users == ("alice", "1000")
    assert config.api.admin_groups == ("0", "wheel")


def test_level_and_display_type() -> None:
    config = config_from_mapping(minimal(logging={"level": "DEBUG"},
                                         display={"type": "sh1106"}))
    assert config.logging.level == "debug"
    assert config.display.type == "sh1106"
    assert {"console", "png", "none", "ssd1306", "winstar_weh", "linux_framebuffer",
            "terminal", "nextion", "charlcd"} <= DISPLAY_TYPES


# -- URLs and plain http ----------------------------------------------------------

def test_http_issuer_rejected_without_allow_insecure_http() -> None:
    error = error_for(minimal(provider={"issuer": "http://127.0.0.1:9000/application/o/x/"}))
    assert error.key == "provider.issuer"
    assert "https://" in error.message
    assert "provider.allow_insecure_http" in error.message


def test_http_issuer_accepted_with_allow_insecure_http() -> None:
    issuer = "http://127.0.0.1:9000/application/o/x/"
    config = config_from_mapping(minimal(provider={"issuer": issuer,
                                                   "allow_insecure_http": True}))
    assert config.provider.issuer == issuer
    assert config.provider.allow_insecure_http is True


def test_http_endpoint_rejected_too() -> None:
    error = error_for(minimal(provider={"revocation_endpoint": "http://h/revoke"}))
    assert error.key == "provider.revocation_endpoint"


@pytest.mark.parametrize("url", [
    "auth.example.com/application/o/x/", "ftp://auth.example.com/", "https://",
    "https:///path", "https://h:99999/", "https://h/#frag", "https://h/?a=b",
])
def test_bad_issuer_urls(url: str) -> None:
    assert error_for(minimal(provider={"issuer": url})).key == "provider.issuer"


def test_endpoint_may_have_a_query() -> None:
    config = config_from_mapping(minimal(provider={"token_endpoint": "https://h/t?tenant=a"}))
    assert config.provider.token_endpoint == "https://h/t?tenant=a"


# -- files: CA bundle and client secret -------------------------------------------

def test_missing_ca_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    error = error_for(minimal(provider={"ca_file": str(missing)}))
    assert error.key == "provider.ca_file"
    assert str(missing) in error.message


def test_ca_file_that_is_a_directory(tmp_path: Path) -> None:
    assert error_for(minimal(provider={"ca_file": str(tmp_path)})).key == "provider.ca_file"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_ca_file_without_read_permission(tmp_path: Path) -> None:
    ca = write(tmp_path / "ca.pem", "-----BEGIN CERTIFICATE-----\n")
    ca.chmod(0)
    assert error_for(minimal(provider={"ca_file": str(ca)})).key == "provider.ca_file"


def test_readable_ca_file_accepted(tmp_path: Path) -> None:
    ca = write(tmp_path / "ca.pem", "-----BEGIN CERTIFICATE-----\n")
    assert config_from_mapping(minimal(provider={"ca_file": str(ca)})).provider.ca_file == ca


def test_client_secret_and_file_together(tmp_path: Path) -> None:
    secret_file = write(tmp_path / "secret", SECRET)
    error = error_for(minimal(provider={"client_secret": SECRET,
                                        "client_secret_file": str(secret_file)}))
    assert error.key == "provider.client_secret_file"
    assert "provider.client_secret" in error.message
    assert SECRET not in str(error)


def test_client_secret_file_is_read_and_stripped(tmp_path: Path) -> None:
    secret_file = write(tmp_path / "secret", f"  {SECRET}\n")
    config = config_from_mapping(minimal(provider={"client_secret_file": str(secret_file)}))
    assert config.provider.client_secret == SECRET
    assert config.provider.client_secret_file == secret_file


@pytest.mark.parametrize(("content", "fragment"), [
    (None, "cannot read"), ("\n  \n", "is empty"), (b"\xff\xfe" + SECRET.encode(), "UTF-8"),
])
def test_bad_client_secret_file(tmp_path: Path, content: str | bytes | None,
                                fragment: str) -> None:
    secret_file = tmp_path / "secret"
    if isinstance(content, bytes):
        secret_file.write_bytes(content)
    elif content is not None:
        secret_file.write_text(content)
    error = error_for(minimal(provider={"client_secret_file": str(secret_file)}))
    assert error.key == "provider.client_secret_file"
    assert fragment in error.message
    assert SECRET not in str(error)


@pytest.mark.parametrize("provider", [
    {"client_secret": 987654321},
    {"client_secret": [SECRET]},
    {"client_secret": {SECRET: 1}},
    {"client_secret": SECRET, "client_secret_file": "/nonexistent/secret"},
    {"client_secret": SECRET, "issuer": "http://h/"},
    {"issuer": f"https://client:{SECRET}@h/"},
])
def test_secret_never_in_error_text(provider: dict[str, Any]) -> None:
    error = error_for(minimal(provider=provider))
    for text in (str(error), repr(error), error.message):
        assert SECRET not in text
        assert "987654321" not in text


def test_secret_not_in_repr() -> None:
    config = config_from_mapping(minimal(provider={"client_secret": SECRET}))
    assert config.provider.client_secret == SECRET
    assert SECRET not in repr(config)


# -- loading files ----------------------------------------------------------------

def test_relative_paths_resolve_against_the_config_directory(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    write(etc / "ca.pem", "-----BEGIN CERTIFICATE-----\n")
    write(etc / "secrets" / "client", SECRET)
    text = f"""
provider:
  issuer: {ISSUER}
  client_id: c
  ca_file: ca.pem
  client_secret_file: secrets/client
display:
  type: png
  path: frames/../out/screen.png
storage:
  path: state/credentials.json
api:
  socket: run/agent.sock
"""
    config = load_config(write(etc / "config.yaml", text))
    assert config.provider.ca_file == etc / "ca.pem"
    assert config.provider.client_secret_file == etc / "secrets" / "client"
    assert config.provider.client_secret == SECRET
    assert config.display.path == etc / "out" / "screen.png"
    assert config.storage.path == etc / "state" / "credentials.json"
    assert config.api.socket == etc / "run" / "agent.sock"
    assert config.source == etc / "config.yaml"


def test_relative_paths_without_a_file_use_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = config_from_mapping(minimal(storage={"path": "creds.json"}))
    assert config.storage.path == tmp_path / "creds.json"


def test_home_is_expanded(tmp_path: Path) -> None:
    config = config_from_mapping(minimal(storage={"path": "~/creds.json"}))
    assert config.storage.path == tmp_path / "home" / "creds.json"


def test_relative_config_path_gives_absolute_source(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "c.yaml", f"provider:\n  issuer: {ISSUER}\n  client_id: c\n")
    monkeypatch.chdir(tmp_path)
    assert load_config(Path("c.yaml")).source == tmp_path / "c.yaml"


def test_unreadable_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(missing)
    assert caught.value.key == str(missing)
    assert "cannot read" in caught.value.message


def test_yaml_syntax_error_gives_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", f"provider:\n  issuer: {ISSUER}\n  client_id: [oops\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == str(path)
    assert "not valid YAML" in caught.value.message
    assert "line 4" in caught.value.message


def test_duplicate_key_is_refused(tmp_path: Path) -> None:
    text = f"provider:\n  issuer: {ISSUER}\n  client_id: a\n  client_id: b\n"
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path / "c.yaml", text))
    assert "'client_id' appears twice" in caught.value.message
    assert "line 4" in caught.value.message


@pytest.mark.parametrize(("text", "fragment"), [
    ("", "is empty"), ("# only a comment\n", "is empty"), ("- provider\n", "got a list"),
    ("just text\n", "got a string"),
])
def test_config_file_that_is_not_a_mapping(tmp_path: Path, text: str, fragment: str) -> None:
    path = write(tmp_path / "c.yaml", text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == str(path)
    assert fragment in caught.value.message


def test_yaml_tags_cannot_build_objects(tmp_path: Path) -> None:
    text = "provider: !!python/object/apply:os.system ['true']\n"
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path / "c.yaml", text))
    assert "not valid YAML" in caught.value.message


# -- defaults from the environment ------------------------------------------------

def test_state_path_from_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", "/xdg/state")
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/device-agent:/var/lib/other")
    assert default_state_path() == Path("/var/lib/device-agent/credentials.json")


def test_state_path_from_xdg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", "/xdg/state")
    assert default_state_path() == Path("/xdg/state/device-agent/credentials.json")


def test_state_path_fallback_ignores_relative_xdg(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", "relative/state")
    assert default_state_path() == (
        tmp_path / "home" / ".local" / "state" / "device-agent" / "credentials.json")


def test_socket_path_from_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/device-agent:/run/other")
    assert default_socket_path() == Path("/run/device-agent/agent.sock")


def test_socket_path_from_xdg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert default_socket_path() == Path("/run/user/1000/device-agent/agent.sock")


def test_socket_path_fallback() -> None:
    assert default_socket_path() == Path(f"/tmp/device-agent-{os.getuid()}/agent.sock")


def test_environment_is_read_at_load_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/one")
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/one")
    first = config_from_mapping(minimal())
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/two")
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/two")
    second = config_from_mapping(minimal())
    assert first.storage.path == Path("/var/lib/one/credentials.json")
    assert second.storage.path == Path("/var/lib/two/credentials.json")
    assert second.api.socket == Path("/run/two/agent.sock")


def test_explicit_and_null_paths_versus_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/device-agent")
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/device-agent")
    explicit = config_from_mapping(minimal(storage={"path": "/srv/creds.json"},
                                           api={"socket": "/srv/agent.sock"}))
    assert explicit.storage.path == Path("/srv/creds.json")
    assert explicit.api.socket == Path("/srv/agent.sock")
    nulls = config_from_mapping(minimal(storage={"path": None}, api={"socket": None},
                                        device={"name": None}))
    assert nulls.storage.path == Path("/var/lib/device-agent/credentials.json")
    assert nulls.api.socket == Path("/run/device-agent/agent.sock")
    assert nulls.device.name == socket.gethostname()


def test_display_defaults_match_dataclass() -> None:
    config = config_from_mapping(minimal(display={"type": "png", "path": "/tmp/f.png"}))
    assert config.display == DisplayConfig(type="png", path=Path("/tmp/f.png"))


@pytest.mark.parametrize(("mode", "warned"), [(0o640, True), (0o604, True), (0o600, False)])
def test_a_client_secret_in_a_config_others_can_read_is_warned_about(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: int, warned: bool) -> None:
    # Issue 9 item 9: the installer's config is 0640 root:device-agent, the readers' group.
    from agent.config import load_config

    path = tmp_path / "config.yaml"
    path.write_text("provider:\n  issuer: https://auth.example.com/application/o/x/\n"
                    "  client_id: x\n  client_secret: s3cret-value\n")
    path.chmod(mode)
    with caplog.at_level(logging.WARNING, "agent.config"):
        load_config(path)
    said = [r.getMessage() for r in caplog.records if "client_secret_file" in r.getMessage()]
    assert bool(said) == warned
    assert all("s3cret-value" not in line for line in said)


# Issue 9 item 9: the config is root's alone, and the service reads systemd's copy.
LOAD_AS_SERVICE = r"""
import json, sys
from pathlib import Path
from agent.config import load_config
from agent.errors import ConfigError
try:
    config = load_config(Path(sys.argv[1]))
except ConfigError as exc:
    print(json.dumps({"error": str(exc)}))
else:
    print(json.dumps({"client_id": config.provider.client_id,
                      "storage": str(config.storage.path)}))
"""


SETPRIV = "/usr/bin/setpriv"


@pytest.mark.skipif(not os.access(SETPRIV, os.X_OK),
                    reason="needs setpriv (util-linux) to run a reader without privileges")
@pytest.mark.parametrize("passed", [True, False], ids=["copy-passed", "no-copy"])
def test_a_config_the_agent_may_not_read_is_read_from_the_copy_systemd_passes(
        tmp_path: Path, passed: bool) -> None:
    import json
    import subprocess
    import sys

    etc = tmp_path / "etc"
    etc.mkdir()
    text = (f"provider:\n  issuer: {ISSUER}\n  client_id: root-only\n"
            "storage:\n  path: state/c.json\n")
    original = write(etc / "config.yaml", text)
    # Another owner's 0600 file, and a reader with no capabilities: it may not open it,
    # as the service user may not open root's config.
    original.chmod(0o600)
    os.chown(original, 4000, 4000)
    env = {"PYTHONPATH": str(EXAMPLE.parent), "PATH": "/usr/bin:/bin"}
    if passed:
        credentials = tmp_path / "credentials"
        credentials.mkdir(mode=0o500)
        (credentials / "config.yaml").write_text(text)
        (credentials / "config.yaml").chmod(0o400)
        env["CREDENTIALS_DIRECTORY"] = str(credentials)
    done = subprocess.run([SETPRIV, "--bounding-set=-all", "--inh-caps=-all",
                           sys.executable, "-c", LOAD_AS_SERVICE, str(original)],
                          env=env, capture_output=True, text=True, timeout=30, check=True)
    answer = json.loads(done.stdout)
    if passed:
        # Paths still count from the file's own directory, not the copy's.
        assert answer == {"client_id": "root-only", "storage": str(etc / "state/c.json")}
        # A copy of another file (a drop-in changed --config, not LoadCredential=) is
        # not read in its place.
        other = write(etc / "site.yaml", text.replace("root-only", "the-site-config"))
        other.chmod(0o600)
        os.chown(other, 4000, 4000)
        done = subprocess.run([SETPRIV, "--bounding-set=-all", "--inh-caps=-all",
                               sys.executable, "-c", LOAD_AS_SERVICE, str(other)],
                              env=env, capture_output=True, text=True, timeout=30,
                              check=True)
        refused = json.loads(done.stdout)["error"]
        assert "is of another file" in refused and f"name {other}" in refused
    else:
        assert "Permission denied" in answer["error"]
        assert f"LoadCredential=config.yaml:{original}" in answer["error"]


# -- issue 10 item 10: every error at once, with its line ---------------------------------

def test_every_error_is_reported_at_once_with_its_key_and_line(tmp_path: Path) -> None:
    text = (f"provider:\n"
            f"  issuer: {ISSUER}\n"
            f"  client_id: c\n"
            f"  timeout: soon\n"             # line 4
            f"device:\n"
            f"  nmae: Kitchen\n"             # line 6
            f"refresh:\n"
            f"  margin_ratio: 7\n"           # line 8
            f"sinks:\n"
            f"  - path: /run/t\n"
            f"    format: xml\n")            # line 11
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path / "c.yaml", text))
    problems = [(e.key, e.line) for e in caught.value.errors]
    assert problems == [("provider.timeout", 4), ("device.nmae", 6),
                        ("refresh.margin_ratio", 8), ("sinks[0].format", 11)]
    assert "did you mean 'name'" in caught.value.errors[1].message
    # One line each, as `check-config` prints them.
    assert str(caught.value.errors[0]).startswith("provider.timeout (line 4): ")


def test_a_required_key_that_is_missing_is_reported_beside_the_others(tmp_path: Path) -> None:
    text = f"provider:\n  issuer: {ISSUER}\ndevice:\n  name: [1, 2]\n"
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path / "c.yaml", text))
    keys = [e.key for e in caught.value.errors]
    assert keys == ["device.name", "provider.client_id"] or keys == [
        "provider.client_id", "device.name"]
    # The section that lacks a key is named where it starts.
    assert {e.key: e.line for e in caught.value.errors}["provider.client_id"] == 1


# -- the button section -------------------------------------------------------------

def test_the_button_has_its_own_section() -> None:
    from agent.config import ButtonConfig

    assert config_from_mapping(minimal()).button == ButtonConfig(pin=None, hold=5.0,
                                                                 pull_up=True)
    config = config_from_mapping(minimal(button={"pin": 17, "hold": "2s", "pull_up": False}))
    assert config.button == ButtonConfig(pin=17, hold=2.0, pull_up=False)


@pytest.mark.parametrize(("button", "key", "fragment"), [
    ({"pin": 54}, "button.pin", "from 0 to 53"),
    ({"pin": "GPIO17"}, "button.pin", "an integer"),
    ({"pin": 17, "hold": 0}, "button.hold", "longer than 0"),
    ({"pin": 17, "pull_up": "yes"}, "button.pull_up", "true or false"),
    ({"pins": 17}, "button.pins", "did you mean 'pin'?"),
])
def test_bad_button_values_name_the_key(button: dict[str, Any], key: str,
                                        fragment: str) -> None:
    error = error_for(minimal(button=button))
    assert (error.key, fragment in error.message) == (key, True)


def test_the_old_button_keys_still_work_with_one_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    from agent.config import ButtonConfig

    options = {"address": 0x3D, "button_pin": 17, "button_hold": "3s",
               "button_pull_up": False}
    with caplog.at_level(logging.WARNING):
        config = config_from_mapping(minimal(display={"type": "ssd1306",
                                                      "options": options}))
    assert config.button == ButtonConfig(pin=17, hold=3.0, pull_up=False)
    # The display no longer sees them: its driver checks only its own options.
    assert dict(config.display.options) == {"address": 0x3D}
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1
    assert "button.pin" in warned[0].getMessage()
    assert "display.options.button_pin" in warned[0].getMessage()


def test_an_old_button_key_with_a_bad_value_is_named_where_it_is_written(
        tmp_path: Path) -> None:
    path = write(tmp_path / "agent.yaml", (
        "provider: {issuer: 'https://a.example/x/', client_id: x}\n"
        "display:\n  type: ssd1306\n  options:\n    button_pin: 99\n"))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert (caught.value.key, caught.value.line) == ("display.options.button_pin", 5)
    assert "from 0 to 53" in caught.value.message


def test_a_button_set_in_both_places_is_refused() -> None:
    error = error_for(minimal(button={"pin": 17},
                              display={"type": "console", "options": {"button_pin": 27}}))
    assert error.key == "display.options.button_pin"
    assert "button.pin" in error.message


def test_the_session_knows_of_the_button_from_either_place() -> None:
    from agent.service import driver_settings

    assert not driver_settings(config_from_mapping(minimal())).button
    assert driver_settings(config_from_mapping(minimal(button={"pin": 17}))).button
    old = minimal(display={"type": "console", "options": {"button_pin": 17}})
    assert driver_settings(config_from_mapping(old)).button
    # A pin of null is no button, in either place.
    assert not driver_settings(config_from_mapping(minimal(button={"pin": None}))).button


def test_the_example_config_holds_the_real_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 10 item 10: install-service copies the example into place, so a value in
    it that differs from the default would freeze an old default on every device."""
    # As systemd runs the shipped unit (StateDirectory=, RuntimeDirectory=).
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/device-agent")
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/device-agent")
    example = load_config(EXAMPLE)
    required = {"provider": {"issuer": example.provider.issuer,
                             "client_id": example.provider.client_id}}
    defaults = config_from_mapping(required, source=EXAMPLE.resolve())

    def differences(a: object, b: object, key: str = "") -> list[str]:
        if dataclasses.is_dataclass(a) and not isinstance(a, type):
            return [found for f in dataclasses.fields(a)
                    for found in differences(getattr(a, f.name), getattr(b, f.name),
                                             f"{key}.{f.name}".lstrip("."))]
        return [] if a == b else [key]

    assert differences(example, defaults) == []


@pytest.mark.parametrize("options", [
    "{button_pin: 17, button_hold: null}",          # the default 5 s
    "{button_pin: null, button_hold: null}",        # no button
    "{button_pin: null, button_pull_up: null}",     # no button
])
def test_old_button_keys_holding_nulls_still_load(tmp_path: Path, options: str) -> None:
    # A config that started before the button: section must start after it.
    config = load_config(write(tmp_path / "c.yaml", f"provider:\n  issuer: {ISSUER}\n"
                               f"  client_id: c\ndisplay: {{type: console, options: {options}}}\n"))
    assert config.button.pin == (17 if "17" in options else None)
    assert not any(name.startswith("button_") for name in config.display.options)


def test_a_recursive_alias_or_an_alias_bomb_is_an_error_not_a_hang(tmp_path: Path) -> None:
    import signal

    def took_too_long(*_: object) -> None:
        raise AssertionError("the line-number walk followed the aliases for ever")

    previous = signal.signal(signal.SIGALRM, took_too_long)
    signal.alarm(20)
    try:
        with pytest.raises(ConfigError):
            load_config(write(tmp_path / "c.yaml", f"provider:\n  issuer: {ISSUER}\n"
                              "  client_id: c\nx: &a [*a]\n"))
        bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
            f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n"
            for i in range(7))
        with pytest.raises(ConfigError):
            load_config(write(tmp_path / "bomb.yaml", bomb))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_merge_key_is_read_as_yaml_means_it(tmp_path: Path) -> None:
    text = (f"x-common: &p\n  client_id: merged\n"
            f"provider:\n  <<: *p\n  issuer: {ISSUER}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path / "c.yaml", text))
    assert [e.key for e in caught.value.errors] == ["x-common"]  # only the unknown section
