"""The `mqtt:` config section: its defaults, and every broken value named by its key."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from agent.config import MqttConfig, config_from_mapping, load_config
from agent.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
ISSUER = "https://auth.example.com/application/o/my-device/"
PASSWORD = "broker-Pa55word-7f3e"


def with_mqtt(**mqtt: Any) -> dict[str, Any]:
    return {"provider": {"issuer": ISSUER, "client_id": "c"}, "mqtt": mqtt}


def error_for(data: Mapping[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        config_from_mapping(data)
    return caught.value


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "mqtt-password"
    path.write_text(PASSWORD + "\n")
    path.chmod(0o600)
    return path


def test_without_the_section_there_is_no_broker() -> None:
    config = config_from_mapping({"provider": {"issuer": ISSUER, "client_id": "c"}})
    assert config.mqtt == MqttConfig()
    assert config.mqtt.host is None
    assert config.mqtt.commands == ("new_code",)
    assert config.mqtt.discovery_prefix == "homeassistant"


def test_a_full_section_is_read(tmp_path: Path, password_file: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not checked here")
    config = config_from_mapping(with_mqtt(
        host="broker.lan", port=8884, tls=True, ca_file=str(ca), username="device",
        password_file=str(password_file), client_id="kiosk-7", base_topic="fleet/kiosk-7",
        keepalive="30s", heartbeat="10m", discovery_prefix="ha",
        commands=["new_code", "sign_out", "new_sign_in"]))
    mqtt = config.mqtt
    assert (mqtt.host, mqtt.port, mqtt.tls, mqtt.ca_file) == ("broker.lan", 8884, True, ca)
    assert (mqtt.username, mqtt.password_file) == ("device", password_file)
    assert (mqtt.client_id, mqtt.base_topic) == ("kiosk-7", "fleet/kiosk-7")
    assert (mqtt.keepalive, mqtt.heartbeat, mqtt.discovery_prefix) == (30, 600.0, "ha")
    assert mqtt.commands == ("new_code", "sign_out", "new_sign_in")
    # The password is read from its file when used; it is never a value of the config.
    assert PASSWORD not in repr(config)


@pytest.mark.parametrize(("values", "key", "says"), [
    ({"host": "mqtt://broker.lan"}, "mqtt.host", "without mqtt://"),
    ({"host": "broker lan"}, "mqtt.host", "host name"),
    ({"host": ""}, "mqtt.host", "empty"),
    ({"port": 0}, "mqtt.port", "from 1 to 65535"),
    ({"port": "1883"}, "mqtt.port", "integer"),
    ({"tls": "yes"}, "mqtt.tls", "true or false"),
    ({"ca_file": "/nonexistent/ca.pem", "tls": True}, "mqtt.ca_file", "cannot read"),
    ({"keepalive": 0}, "mqtt.keepalive", "longer than 0"),
    ({"keepalive": "19h"}, "mqtt.keepalive", "65535"),
    ({"heartbeat": "soon"}, "mqtt.heartbeat", "duration"),
    ({"base_topic": "fleet/#"}, "mqtt.base_topic", "wildcard"),
    ({"base_topic": "fleet/+/x"}, "mqtt.base_topic", "wildcard"),
    ({"base_topic": "/fleet"}, "mqtt.base_topic", "start or end with /"),
    ({"base_topic": "$SYS/x"}, "mqtt.base_topic", "$"),
    ({"discovery_prefix": "home#"}, "mqtt.discovery_prefix", "wildcard"),
    ({"client_id": "a\nb"}, "mqtt.client_id", "control"),
    ({"commands": ["reboot"]}, "mqtt.commands[0]", "new_code"),
    ({"commands": "new_code"}, "mqtt.commands", "a list"),
    ({"password": "x"}, "mqtt.password", "password_file"),
    ({"username": "device", "password_file": "/nonexistent/pw"}, "mqtt.password_file",
     "cannot read"),
    ({"password_file": "PW"}, "mqtt.password_file", "mqtt.username"),
])
def test_a_broken_value_names_its_key(values: dict[str, Any], key: str, says: str,
                                      password_file: Path) -> None:
    values = {name: str(password_file) if value == "PW" else value
              for name, value in values.items()}
    error = error_for(with_mqtt(**values))
    assert error.key == key, error
    assert says in error.message, error.message


@pytest.mark.parametrize("name", ["ca_file", "cert_file", "key_file"])
def test_tls_files_need_tls(tmp_path: Path, name: str) -> None:
    pem = tmp_path / "x.pem"
    pem.write_text("x")
    error = error_for(with_mqtt(host="b", **{name: str(pem)}))
    assert error.key == f"mqtt.{name}" and "mqtt.tls" in error.message


def test_a_key_needs_its_certificate(tmp_path: Path) -> None:
    pem = tmp_path / "key.pem"
    pem.write_text("x")
    error = error_for(with_mqtt(host="b", tls=True, key_file=str(pem)))
    assert error.key == "mqtt.key_file" and "mqtt.cert_file" in error.message


def test_an_empty_password_file_is_refused_without_showing_it(tmp_path: Path) -> None:
    empty = tmp_path / "pw"
    empty.write_text("\n")
    error = error_for(with_mqtt(host="b", username="device", password_file=str(empty)))
    assert error.key == "mqtt.password_file" and "empty" in error.message


def test_a_password_file_is_never_quoted(tmp_path: Path) -> None:
    binary = tmp_path / "pw"
    binary.write_bytes(b"\xff\xfe" + PASSWORD.encode())
    error = error_for(with_mqtt(host="b", username="device", password_file=str(binary)))
    assert error.key == "mqtt.password_file"
    assert PASSWORD not in str(error)


def test_check_config_exits_78_naming_the_mqtt_key(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(f"provider:\n  issuer: {ISSUER}\n  client_id: c\n"
                    "mqtt:\n  host: broker.lan\n  port: 99999\n")
    result = subprocess.run([sys.executable, "-m", "agent.cli", "check-config", str(path)],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 78
    assert "mqtt.port (line 6)" in result.stdout + result.stderr


def test_the_example_shows_the_mqtt_section_with_its_defaults() -> None:
    example = load_config(ROOT / "config.example.yaml")
    assert example.mqtt == MqttConfig()
