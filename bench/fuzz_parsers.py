"""Random inputs through every parser of untrusted input, for a given time.

The rule (agent/errors.py): a parser of network, config or API input returns, or raises
one of our own typed errors (an AgentError subclass). Anything else that comes out is a
foreign exception, and a bug. tests/test_parsers_hypothesis.py proves the rule with
hypothesis; this script is its long-running companion, with its own generators (the
`random` module, a fixed seed that is printed) so the two do not share blind spots.

Inputs: arbitrary bytes; JSON with lone surrogates, 400- and 5000-digit integers, NaN
and infinities, digits of other scripts; objects shaped like the real answers and files
with each field kept, dropped or replaced; byte-level mutations of good answers;
nesting 200000 deep; Retry-After headers of every kind; the shipped config.example.yaml
with one value replaced (as a mapping, and as YAML text with any scalar or tag).

One extra check: a token answer that carries a non-empty access_token is never refused
(the provider has rotated by the time it is read); a refusal counts as a foreign
AssertionError in the row "parse_token_answer[rotated]".

    .venv/bin/python bench/fuzz_parsers.py --seconds 120 [--seed N] [--rounds N]

Prints, per parser: inputs tried, returned, typed errors, foreign exceptions, and the
first few distinct foreign exceptions (type, where in agent/ and where innermost, the
message and the input). Exits 1 when any foreign exception was seen. With --rounds the
run is exactly reproducible from the seed (one random stream, parsers in turn).
"""

from __future__ import annotations

import argparse
import base64
import collections
import datetime as dt
import json
import logging
import math
import os
import platform
import random
import shutil
import struct
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from agent.config import config_from_mapping, load_config
from agent.errors import AgentError
from agent.oauth.discovery import Discovery, ExplicitEndpoints, parse_discovery
from agent.oauth.flow import DevicePoll, receive_device_authorization
from agent.oauth.models import (
    Client,
    DeviceAuthorization,
    Endpoints,
    HttpResponse,
    TokenSet,
)
from agent.oauth.tokens import (
    check_id_token,
    id_token_claims,
    receive_refresh,
    receive_revocation,
    receive_userinfo,
)
from agent.oauth.wire import (
    classify,
    parse_error,
    parse_json_object,
    parse_token_answer,
    retry_after,
    seconds_field,
)
from agent.sessionfile import SessionFile
from agent.store import CredentialStore

REPO = Path(__file__).resolve().parents[1]
AGENT_DIR = str(REPO / "agent")
Rng = random.Random

# -- values ------------------------------------------------------------------------

SPECIAL_TEXT = [
    "", " ", "\t\r\n", "\x00", "\ud800", "\udfff", "a\ud800b", "\udc80", "²", "٣", "١٢٣",
    "߀", "³⁴", "٣٠s", "²s", "Ⅻ", "𝟗", "１２", "1" * 5000, "9" * 12, "9" * 13, "1" * 400 + "d",
    "-1", "0", "1.5", "1e3", "0x1F", "nan", "NaN", "inf", "-Infinity", "null", "true",
    "Bearer", "bearer", "DPoP", "<html>", "https://[", "http://[::1", "https://a\uff03b@c/",
    "https://h:99999/", "https://u:p@h/", "https://h/#f", "~nosuchuser/x", "~", "~/x",
    "/tmp/\ud800", "a\x00b", "0o777", "0660", "1h30m", " 5 s ", "2d", "x" * 20000,
]
DIGITS = "0123456789²³¹٠١٢٣٤٥٦٧٨٩۰۱۲߀०१२३๑๒๓０１２𝟎𝟗Ⅻ"
HUGE_INTS = [10**400, -(10**400), 2**63, -(2**63) - 1, 2**1024, 10**4000, 10**5000,
             -(10**5000), 10**4300, 10**4301]


def rand_text(rng: Rng) -> str:
    roll = rng.random()
    if roll < 0.3:
        return rng.choice(SPECIAL_TEXT)
    n = rng.choice([0, 1, 2, 3, 5, 8, 13, 40])
    if roll < 0.45:
        return "".join(rng.choice(DIGITS + ".-+ e:") for _ in range(n))
    if roll < 0.75:
        return "".join(chr(rng.randrange(0x110000)) for _ in range(n))
    return "".join(chr(rng.randrange(32, 127)) for _ in range(n))


def rand_int(rng: Rng) -> int:
    roll = rng.random()
    if roll < 0.3:
        return rng.choice(HUGE_INTS)
    if roll < 0.6:
        return rng.choice([0, 1, -1, 5, 600, 86400, 315360000, 315360001, 2**31])
    return rng.randint(-(10**12), 10**12)


def rand_float(rng: Rng) -> float:
    roll = rng.random()
    if roll < 0.4:
        return rng.choice([math.nan, math.inf, -math.inf, -0.0, 1e308, 5e-324, 0.5, 1e12])
    if roll < 0.7:
        return struct.unpack("<d", rng.randbytes(8))[0]
    return rng.uniform(-1e6, 1e6)


def rand_scalar(rng: Rng) -> Any:
    return rng.choice([lambda: None, lambda: rng.random() < 0.5, lambda: rand_int(rng),
                       lambda: rand_float(rng), lambda: rand_text(rng),
                       lambda: rand_text(rng)])()


def rand_value(rng: Rng, depth: int = 0) -> Any:
    roll = rng.random()
    if depth >= 3 or roll < 0.6:
        return rand_scalar(rng)
    if roll < 0.8:
        return [rand_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rand_text(rng): rand_value(rng, depth + 1) for _ in range(rng.randrange(4))}


def int_text(n: int) -> str:
    """str(n) for any n: CPython refuses str() of integers over 4300 digits."""
    if abs(n) < 10**4000:
        return str(n)
    q, r = divmod(abs(n), 10**4000)
    return ("-" if n < 0 else "") + int_text(q) + str(r).zfill(4000)


def to_json(rng: Rng, value: Any, ascii_only: bool) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return int_text(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return rng.choice(["Infinity", "1e999999"]) if value > 0 else "-Infinity"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=ascii_only)
    if isinstance(value, list):
        return "[" + ",".join(to_json(rng, v, ascii_only) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(str(k), ensure_ascii=ascii_only)}:"
                              f"{to_json(rng, v, ascii_only)}" for k, v in value.items()) + "}"
    return json.dumps(str(value))


def json_bytes(rng: Rng, value: Any) -> bytes:
    text = to_json(rng, value, ascii_only=rng.random() < 0.7)
    encoding = rng.choice(["utf-8"] * 5 + ["utf-8-sig", "utf-16", "utf-16-le", "utf-32"])
    return text.encode(encoding, "surrogatepass")


_OPENERS = {"[": "]", '{"a":': "}", '[{"a":': "}]", " [ ": " ] ", '{"a":[': "]}"}


def deep_json(rng: Rng) -> bytes:
    depth = rng.choice([200_000, 5_000, 1_000, rng.randint(900, 3_000)])
    opener = rng.choice(sorted(_OPENERS))
    text = opener * depth
    if rng.random() < 0.5:
        text += "1" + _OPENERS[opener] * depth
    if rng.random() < 0.5:
        key = rng.choice(["scope", "error", "issuer", "tokens", "x"])
        text = f'{{"access_token":"at","error":"slow_down","{key}":{text}}}'
    return text.encode()


MUTATIONS = [b"[", b"{", b'"', b"\\ud800", b"\\", b"1" * 5000, b"NaN", b"-", b"\x00",
             b"\xff", b"\xed\xa0\x80", b",", b":", b"e999999", b"\\u0000"]


def mutate(rng: Rng, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        roll = rng.random()
        at = rng.randrange(len(buf) + 1)
        if roll < 0.3 and buf:
            buf[min(at, len(buf) - 1)] = rng.randrange(256)
        elif roll < 0.5:
            del buf[at:at + rng.randint(1, 8)]
        elif roll < 0.8:
            buf[at:at] = rng.choice(MUTATIONS)
        else:
            piece = buf[at:at + rng.randint(1, 16)]
            buf[at:at] = piece
    return bytes(buf)


def shaped(rng: Rng, fields: dict[str, Callable[[Rng], Any]]) -> dict[str, Any]:
    """The real fields in any order: each a real value half the time, else any value or
    absent; plus sometimes an unknown key."""
    doc: dict[str, Any] = {}
    keys = list(fields)
    rng.shuffle(keys)
    for key in keys:
        roll = rng.random()
        if roll < 0.5:
            doc[key] = fields[key](rng)
        elif roll < 0.75:
            doc[key] = rand_value(rng)
    if rng.random() < 0.2:
        doc[rand_text(rng)] = rand_value(rng)
    return doc


def tweak(rng: Rng, valid: Any, leaf: Callable[[Rng], Any] | None = None) -> Any:
    """A copy of the sound document `valid` with one to three values anywhere in it
    replaced (by `leaf`, or any value) or dropped: the checks behind the first field are
    reached only when that field is sound."""
    doc = json.loads(json.dumps(valid))
    for _ in range(rng.randint(1, 3)):
        parent, key = None, None
        node = doc
        while isinstance(node, dict | list) and node and (parent is None or rng.random() < 0.6):
            key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
            parent, node = node, node[key]
        if parent is None:
            continue
        if isinstance(parent, dict) and rng.random() < 0.15:
            del parent[key]
        else:
            parent[key] = (leaf or rand_value)(rng)
    return doc


def seconds_like(rng: Rng) -> Any:
    return rng.choice([lambda: rng.randint(0, 10**6), lambda: rng.uniform(0, 1e6),
                       lambda: str(rng.randint(0, 10**6)),
                       lambda: rng.choice(["600", "1.5", " 5 ", "٣", "²", "1" * 13, "-5"])])()


def jwt(rng: Rng, payload: bytes) -> str:
    part = base64.urlsafe_b64encode(payload).decode()
    if rng.random() < 0.7:
        part = part.rstrip("=")
    return f"{rng.choice(['eyJhbGciOiJSUzI1NiJ9', '', 'x'])}.{part}.{rng.choice(['sig', ''])}"


ISSUERS = ["https://idp.example/application/o/dev/", "https://idp.example",
           "http://127.0.0.1:9000/realms/x"]


def claims(rng: Rng) -> dict[str, Any]:
    return shaped(rng, {
        "iss": lambda r: r.choice(ISSUERS), "aud": lambda r: r.choice(
            ["device-agent", ["device-agent", "x"], rand_text(r)]),
        "azp": lambda r: "device-agent", "exp": rand_int, "iat": rand_int,
        "sub": rand_text, "name": rand_text, "email": rand_text,
        "preferred_username": rand_text})


VALID_CLAIMS = {"iss": "https://idp.example", "aud": "device-agent", "azp": "device-agent",
                "exp": 1.7e9 + 300, "iat": 1.7e9, "sub": "u1", "name": "Ann"}


def id_token(rng: Rng) -> str:
    roll = rng.random()
    if roll < 0.25:
        return jwt(rng, json_bytes(rng, tweak(rng, VALID_CLAIMS,
                                              rng.choice([rand_value, rand_int]))))
    if roll < 0.5:
        return jwt(rng, json_bytes(rng, claims(rng)))
    if roll < 0.6:
        return jwt(rng, deep_json(rng))
    if roll < 0.7:
        return jwt(rng, rng.randbytes(rng.randrange(40)))
    if roll < 0.85:
        return ".".join(rand_text(rng) for _ in range(3))
    return rand_text(rng)


ERRORS = ["invalid_grant", "slow_down", "authorization_pending", "access_denied",
          "expired_token", "server_error", "temporarily_unavailable", "invalid_client",
          "invalid_request", "weird", ""]
TOKEN_FIELDS: dict[str, Callable[[Rng], Any]] = {
    "access_token": lambda r: rand_text(r) or "at",
    "token_type": lambda r: r.choice(["Bearer", "bearer", "DPoP", "mac", ""]),
    "expires_in": seconds_like, "refresh_token": rand_text, "id_token": id_token,
    "scope": lambda r: r.choice([rand_text(r), [rand_text(r) for _ in range(3)]]),
    "error": lambda r: r.choice(ERRORS), "error_description": rand_text,
}
DEVICE_FIELDS: dict[str, Callable[[Rng], Any]] = {
    "device_code": rand_text, "user_code": rand_text, "verification_uri": rand_text,
    "verification_url": rand_text, "verification_uri_complete": rand_text,
    "expires_in": seconds_like, "interval": seconds_like,
    "error": lambda r: r.choice(ERRORS), "error_description": rand_text,
}
USERINFO_FIELDS: dict[str, Callable[[Rng], Any]] = {
    "sub": rand_text, "name": rand_text, "preferred_username": rand_text, "email": rand_text}
URLS = [*ISSUERS, "https://idp.example/token", "http://idp.example/device", "https://[",
        "http://[::1", "https://[::1]:99999/x", "https://a\uff03b@c/", "https://a\u2100b/",
        "https://ho\ufe13st/", "ftp://x/", "https:///x", "//idp.example/x", "", "\ud800"]


def url_like(rng: Rng) -> str:
    if rng.random() < 0.6:
        return rng.choice(URLS)
    return rng.choice(["https://", "http://", "", "HTTPS://"]) + rand_text(rng)


DISCOVERY_FIELDS: dict[str, Callable[[Rng], Any]] = {
    "issuer": lambda r: r.choice(ISSUERS), "token_endpoint": url_like,
    "device_authorization_endpoint": url_like, "revocation_endpoint": url_like,
    "userinfo_endpoint": url_like,
    "scopes_supported": lambda r: [rand_text(r) for _ in range(r.randrange(3))],
    "grant_types_supported": lambda r: [rand_text(r) for _ in range(r.randrange(3))],
}


def discovery_doc(rng: Rng) -> dict[str, Any]:
    if rng.random() < 0.5:
        return tweak(rng, VALID_DISCOVERY, rng.choice([url_like, rand_value]))
    doc = shaped(rng, DISCOVERY_FIELDS)
    if rng.random() < 0.75:
        doc["issuer"] = rng.choice(ISSUERS)
    return doc


VALID_TOKEN = {"access_token": "at", "token_type": "Bearer", "expires_in": 300,
               "refresh_token": "rt", "scope": "openid offline_access",
               "id_token": "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ1MSJ9.s"}
VALID_DEVICE = {"device_code": "dc", "user_code": "ABCD-EFGH",
                "verification_uri": "https://idp.example/device",
                "verification_uri_complete": "https://idp.example/device?code=ABCD-EFGH",
                "expires_in": 600, "interval": 5}
VALID_DISCOVERY = {
    "issuer": "https://idp.example", "token_endpoint": "https://idp.example/token",
    "device_authorization_endpoint": "https://idp.example/device",
    "revocation_endpoint": "https://idp.example/revoke",
    "userinfo_endpoint": "https://idp.example/userinfo",
    "scopes_supported": ["openid", "offline_access"],
    "grant_types_supported": ["urn:ietf:params:oauth:grant-type:device_code"]}
VALID_USERINFO = {"sub": "u1", "name": "Ann", "preferred_username": "ann",
                  "email": "ann@example.com"}


@dataclass(frozen=True)
class Shape:
    """An answer's fields (for `shaped`) and one sound answer (for `tweak`)."""

    fields: dict[str, Callable[[Rng], Any]]
    valid: dict[str, Any]


TOKEN = Shape(TOKEN_FIELDS, VALID_TOKEN)
DEVICE = Shape(DEVICE_FIELDS, VALID_DEVICE)
USERINFO = Shape(USERINFO_FIELDS, VALID_USERINFO)
DISCOVERY = Shape(DISCOVERY_FIELDS, VALID_DISCOVERY)

GOOD_ANSWERS = [
    b'{"access_token":"at","token_type":"Bearer","expires_in":300,"refresh_token":"rt",'
    b'"scope":"openid offline_access"}',
    b'{"device_code":"dc","user_code":"ABCD-EFGH","verification_uri":"https://x/d",'
    b'"expires_in":600,"interval":5}',
    b'{"error":"authorization_pending","error_description":"wait"}',
    b'{"issuer":"https://idp.example","token_endpoint":"https://idp.example/t",'
    b'"device_authorization_endpoint":"https://idp.example/d"}',
    b'{"sub":"u1","name":"Ann","email":"a@example.com"}',
]


def body(rng: Rng, shape: Shape | None = None) -> bytes:
    roll = rng.random()
    if shape is not None and roll < 0.3:
        return json_bytes(rng, shaped(rng, shape.fields))
    if shape is not None and roll < 0.55:
        return json_bytes(rng, tweak(rng, shape.valid,
                                     rng.choice([rand_value, url_like, seconds_like])))
    if roll < 0.65:
        return mutate(rng, rng.choice(GOOD_ANSWERS))
    if roll < 0.75:
        return deep_json(rng)
    if roll < 0.85:
        return rng.randbytes(rng.randrange(100))
    if roll < 0.95:
        return json_bytes(rng, rand_value(rng))
    return rng.choice([b"", b"<html><body>sign in</body></html>", b"\xef\xbb\xbf{}",
                       b"1" * 5000, b'{"error":' + b"1" * 5000 + b"}", b"NaN"])


DAYS = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun", "Sunday", "Mon,", ""]
MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov",
          "Dec", "January", "jan", "Foo"]
ZONES = ["GMT", "UTC", "UT", "+0000", "-0000", "+9999", "-2400", "+2359", "EST", "PDT",
         "XYZ", "+99999999", "", "Z", "+", "-", "+٣٠٠"]


def retry_value(rng: Rng) -> str:
    roll = rng.random()
    if roll < 0.2:
        return rand_text(rng)
    if roll < 0.3:
        return int_text(rand_int(rng)) if rng.random() < 0.9 else "1" * 5000
    if roll < 0.7:
        dd = rng.choice([rng.randint(0, 99), rng.randint(-(10**6), 10**12)])
        year = rng.choice([rng.randint(0, 99), rng.randint(1, 9999), rng.randint(0, 10**6),
                           10**30, -1])
        hh, mm, ss = (rng.randint(0, 99) for _ in range(3))
        day, mon, zone = rng.choice(DAYS), rng.choice(MONTHS), rng.choice(ZONES)
        return rng.choice([
            f"{day}, {dd:02d} {mon} {year:04d} {hh:02d}:{mm:02d}:{ss:02d} {zone}",
            f"{day}, {dd:02d}-{mon}-{year:02d} {hh:02d}:{mm:02d}:{ss:02d} {zone}",
            f"{day} {mon} {dd:2d} {hh:02d}:{mm:02d}:{ss:02d} {year}"])
    if roll < 0.85:
        words = [*DAYS, *MONTHS, *ZONES, ",", ":", "99:99:99", "00:00", "²", "٣", "2024", "31"]
        return " ".join(rng.choice(words) for _ in range(rng.randrange(8)))
    return rng.choice(["9" * 12, "9" * 13, "٣", "²", "١٢", " 12 ", "12\n", "-5", "1.5", "0",
                       "Wed, 21 Oct 2015 07:28:00 GMT", "Mon, 1 Jan 0001 00:00:00 -0000",
                       "Wed, 21 Oct 9999 23:59:59 -0000", "1 Jan 1970 00:00:00 +2400"])


def headers(rng: Rng) -> dict[str, str]:
    out: dict[str, str] = {}
    for _ in range(rng.randrange(4)):
        key = rng.choice(["Retry-After", "retry-after", "RETRY-AFTER", "Content-Type",
                          rand_text(rng)])
        out[key] = rng.choice([retry_value(rng), "text/html", "application/json"])
    return out


def status(rng: Rng) -> int:
    roll = rng.random()
    if roll < 0.6:
        return rng.choice([200, 200, 200, 201, 204, 302, 400, 401, 403, 404, 410, 429, 500,
                           503])
    return rng.randint(100, 599) if roll < 0.9 else rng.randint(-(10**6), 10**6)


def response(rng: Rng, shape: Shape | None = None,
             code: int | None = None) -> HttpResponse:
    return HttpResponse(status=status(rng) if code is None else code,
                        body=body(rng, shape), headers=headers(rng))


def now_wall(rng: Rng) -> float | None:
    return rng.choice([None, 0.0, 1.7e9, rng.uniform(0, 4e9)])


# -- files and config ----------------------------------------------------------------

def credentials_doc(rng: Rng) -> dict[str, Any]:
    return shaped(rng, {
        "version": lambda r: r.choice([1, 1, 2, 0, True, 1.0]),
        "client_id": rand_text, "issuer": rand_text,
        "claims": lambda r: {rand_text(r): rand_text(r) for _ in range(r.randrange(3))},
        "machine_id": rand_text,
        "tokens": lambda r: shaped(r, {
            "access_token": rand_text, "token_type": rand_text,
            "issued_at": lambda q: q.choice([rand_float(q), rand_int(q)]),
            "expires_at": lambda q: q.choice([None, rand_float(q), rand_int(q)]),
            "refresh_token": rand_text, "id_token": rand_text, "scope": rand_text}),
    })


def session_doc(rng: Rng) -> dict[str, Any]:
    number = lambda r: r.choice([rand_float(r), rand_int(r), 1e9])  # noqa: E731
    return shaped(rng, {
        "version": lambda r: r.choice([1, 1, 2, 1001, 0, True]),
        "codes_spent": lambda r: [number(r) for _ in range(r.randrange(4))],
        "throttle_until": lambda r: r.choice([None, number(r)]),
        "throttle_delay": lambda r: r.choice([None, number(r)]),
        "codes_expired_unused": rand_int,
        "pending_code": lambda r: r.choice([None, shaped(r, {
            "device_code": rand_text, "user_code": rand_text, "verification_uri": rand_text,
            "verification_uri_complete": rand_text, "interval": number,
            "issued_at": lambda q: 1e9, "expires_at": lambda q: q.choice([1e9 + 600, number(q)]),
            "scope": rand_text})]),
        "pending_revocations": lambda r: [shaped(r, {
            "token": rand_text,
            "hint": lambda q: q.choice(["refresh_token", "access_token", "x"])})
            for _ in range(r.randrange(3))],
    })


VALID_CREDENTIALS = {
    "version": 1, "client_id": "device-agent", "issuer": "https://idp.example",
    "claims": {"sub": "u1"}, "machine_id": "0" * 32,
    "tokens": {"access_token": "at", "token_type": "Bearer", "issued_at": 1.7e9,
               "expires_at": 1.7e9 + 300, "refresh_token": "rt", "id_token": "it",
               "scope": "openid"}}
VALID_SESSION = {
    "version": 1, "codes_spent": [1.7e9], "throttle_until": 1.7e9 + 60,
    "throttle_delay": 120.0, "codes_expired_unused": 1,
    "pending_code": {"device_code": "dc", "user_code": "ABCD-EFGH",
                     "verification_uri": "https://idp.example/d",
                     "verification_uri_complete": None, "interval": 5.0, "issued_at": 1.7e9,
                     "expires_at": 1.7e9 + 600, "scope": "openid"},
    "pending_revocations": [{"token": "rt", "hint": "refresh_token"}]}


def file_bytes(rng: Rng, doc: Callable[[Rng], dict[str, Any]], valid: dict[str, Any]) -> bytes:
    roll = rng.random()
    if roll < 0.3:
        return json_bytes(rng, doc(rng))
    if roll < 0.55:
        return json_bytes(rng, tweak(rng, valid))
    if roll < 0.65:
        return mutate(rng, json_bytes(rng, doc(rng)))
    return body(rng)


EXAMPLE_CONFIG = (REPO / "config.example.yaml").read_text(encoding="utf-8")
BASE_CONFIG: dict[str, Any] = yaml.safe_load(EXAMPLE_CONFIG)
CONFIG_PATHS = ["~nosuchuser/x", "~/x", "/tmp/\ud800", "/tmp/\udcff", "a\x00b", "/" * 300,
                "x" * 5000, ".", "/", "state/x"]
CONFIG_EXTRA = [dt.date(2001, 2, 3), dt.datetime(1, 1, 1), b"\x00\xff", frozenset({1, 2}),
                10**400, 10**5000, -(10**5000), "٣٠s", "1" * 400 + "d"]


def config_leaf(rng: Rng) -> Any:
    roll = rng.random()
    if roll < 0.3:
        return rand_value(rng)
    if roll < 0.5:
        return rng.choice(CONFIG_PATHS)
    if roll < 0.7:
        return rng.choice(CONFIG_EXTRA)
    if roll < 0.85:
        return url_like(rng)
    return seconds_like(rng)


def config_mapping(rng: Rng) -> tuple[Any, object]:
    """config.example.yaml with one to three values replaced, keys dropped or added; and
    what changed, to show."""
    doc = json.loads(json.dumps(BASE_CONFIG))
    if rng.random() < 0.1:
        leaf = config_leaf(rng)
        return leaf, leaf
    changes: dict[str, Any] = {}
    for _ in range(rng.randint(1, 3)):
        section = rng.choice(list(doc))
        roll = rng.random()
        target = doc[section]
        if isinstance(target, dict) and target and roll < 0.7:
            key = rng.choice(list(target))
            if rng.random() < 0.1:
                del target[key]
                changes[f"{section}.{key}"] = "<dropped>"
            else:
                target[key] = changes[f"{section}.{key}"] = config_leaf(rng)
        elif roll < 0.8 and section in ("sinks", "hooks"):
            doc[section] = changes[section] = [
                {"path": config_leaf(rng), "format": rng.choice(["raw", "env"]),
                 "mode": config_leaf(rng), "owner": config_leaf(rng)}
                if section == "sinks" else
                {"command": [rng.choice(["/bin/true", rand_text(rng)])],
                 "events": [rng.choice(["token_changed", "boom"])],
                 "timeout": config_leaf(rng)}]
        elif roll < 0.9:
            doc[section] = changes[section] = config_leaf(rng)
        else:
            key = rng.choice([rand_text(rng), rand_int(rng), None, True])
            doc[key] = config_leaf(rng)
            changes[f"<key {show(key, 60)}>"] = doc[key]
    return doc, {"config.example.yaml with": changes}


YAML_SCALARS = [
    "2001-02-30", "2001-13-01", "2001-12-14t21:59:43.10-99:99", "1" * 5000, "1" + "0" * 400,
    "-" + "9" * 4400, "0x" + "f" * 5000, "0b" + "1" * 20000, "190:20:30", "1_000", ".nan",
    ".inf", "0o777", "0660", "~", "yes", "on", '"\\ud800"', '"\\udfff/x"', '"~nosuchuser/x"',
    '"/tmp/\\ud800"', '"a\\0b"', '"\\x85"', "!!binary aGVsbG8=", "!!binary '!!!'", "!!int x",
    "!!float x", "!!timestamp x", "!!set {a, b}", "!!omap [a: 1]", "!!python/name:os.system",
    "!foo x", "*nope", "&a [*a]", "&b {x: *b}", "[", "{", "? [a]", "{[a]: b}", '"\\U00110000"',
    '"\\U0010ffff"', "@x", "`x", "'unterminated", "-1", "٣٠s", "1" * 400 + "d",
]


EXAMPLE_LINES = EXAMPLE_CONFIG.splitlines()
VALUE_LINES = [at for at, line in enumerate(EXAMPLE_LINES)
               if ":" in line and not line.lstrip().startswith("#")]


def yaml_text(rng: Rng) -> tuple[bytes, object]:
    """YAML bytes, and what to show of them."""
    roll = rng.random()
    if roll < 0.6:  # the example config, one to three values replaced by any YAML scalar
        lines = list(EXAMPLE_LINES)
        changed = []
        for at in rng.sample(VALUE_LINES, rng.randint(1, 3)):
            key = lines[at].split(":", 1)[0]
            value = rng.choice([rng.choice(YAML_SCALARS), json.dumps(rand_text(rng)),
                                int_text(rand_int(rng)), repr(rand_float(rng))])
            lines[at] = f"{key}: {value}"
            changed.append(lines[at].strip())
        data = "\n".join(lines).encode("utf-8", "surrogatepass") + b"\n"
        return data, {"config.example.yaml with": changed}
    if roll < 0.7:
        depth = rng.choice([200_000, 5_000, 1_000])
        data = rng.choice(["[" * depth, "{a: " * depth, "- " * depth,
                           "".join(" " * i + "a:\n" for i in range(1500))]).encode()
        return data, data
    if roll < 0.8:
        data = mutate(rng, EXAMPLE_CONFIG.encode())
        return data, {"config.example.yaml mutated, bytes": data}
    data = (rng.randbytes(rng.randrange(100)) if roll < 0.9 else
            rand_text(rng).encode("utf-8", "surrogatepass"))
    return data, data


# -- the parsers ---------------------------------------------------------------------

CLIENT = Client(client_id="device-agent")
PREVIOUS = TokenSet(access_token="at-0", token_type="Bearer", issued_at=0.0,
                    expires_at=3600.0, refresh_token="rt-0", id_token="id-0", scope="openid")


def new_poll() -> DevicePoll:
    authorization = DeviceAuthorization(
        device_code="dc", user_code="ABCD-EFGH", verification_uri="https://idp.example/d",
        verification_uri_complete=None, expires_in=600.0, interval=5.0, issued_at=0.0)
    return DevicePoll(authorization, client=CLIENT, token_endpoint="https://idp.example/t",
                      scope="openid")


Case = tuple[Callable[[], object], object]  # the call, and what to show of its input


def write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def rotated(rng: Rng) -> Case:
    doc = (tweak(rng, VALID_TOKEN) if rng.random() < 0.5 else
           shaped(rng, {k: v for k, v in TOKEN_FIELDS.items() if k != "error"}))
    doc.pop("error", None)  # an error field makes it an error answer: not this check
    doc["access_token"] = rand_text(rng) or "at"
    r = HttpResponse(status=200, body=json_bytes(rng, doc))
    previous = rng.choice([None, PREVIOUS])

    def call() -> object:
        try:
            return parse_token_answer(r, now_wall=1.7e9, previous=previous)
        except AgentError as exc:
            raise AssertionError(f"a rotated answer was refused: {exc!r}") from exc
    return call, r


def make_cases(work: Path) -> dict[str, Callable[[Rng], Case]]:
    state = work / "state"
    state.mkdir(mode=0o700)
    credentials, session, config = state / "credentials.json", state / "session.json", \
        work / "config.yaml"

    def poll(rng: Rng) -> Case:
        answers = [response(rng, TOKEN) for _ in range(rng.randint(1, 3))]

        def call() -> object:
            p = new_poll()
            return [p.receive(a, now=6.0 * (i + 1), now_wall=1.7e9 + 6.0 * i)
                    for i, a in enumerate(answers)]
        return call, answers

    def discovery(rng: Rng) -> Case:
        issuer = rng.choice([None, *ISSUERS])
        explicit = ExplicitEndpoints(
            device_authorization=rng.choice([None, "https://idp.example/d"]),
            token=rng.choice([None, "https://idp.example/t"]))
        answers = [response(rng, DISCOVERY, rng.choice([200, 200, 404, None]))
                   if rng.random() < 0.5 else
                   HttpResponse(status=200, body=json_bytes(rng, discovery_doc(rng)))
                   for _ in range(2)]
        insecure = rng.random() < 0.5

        def call() -> object:
            d = Discovery(issuer, explicit, allow_insecure_http=insecure)
            step = d.first()
            for a in answers:
                if step.request is None:
                    break
                step = d.receive(a)
            return step
        return call, (issuer, answers)

    def store(rng: Rng) -> Case:
        data = file_bytes(rng, credentials_doc, VALID_CREDENTIALS)
        write_private(credentials, data)
        return CredentialStore(credentials).load, data

    def sessionfile(rng: Rng) -> Case:
        data = file_bytes(rng, session_doc, VALID_SESSION)
        write_private(session, data)
        return SessionFile(session).load, data

    def yaml_config(rng: Rng) -> Case:
        data, shown = yaml_text(rng)
        config.write_bytes(data)
        return (lambda: load_config(config)), shown

    def mapping(rng: Rng) -> Case:
        data, shown = config_mapping(rng)
        return (lambda: config_from_mapping(data, source=config)), shown

    def discovery_doc_case(rng: Rng) -> Case:
        r = (HttpResponse(status=200, body=json_bytes(rng, discovery_doc(rng)))
             if rng.random() < 0.6 else response(rng, DISCOVERY))
        issuer, insecure = rng.choice(ISSUERS), rng.random() < 0.5
        fallback = rng.choice([None, Endpoints(device_authorization="https://idp.example/d",
                                               token="https://idp.example/t")])
        return (lambda: parse_discovery(r, issuer=issuer, allow_insecure_http=insecure,
                                        fallback=fallback)), r

    def with_response(shape: Shape,
                      parse: Callable[[HttpResponse, float | None], object]
                      ) -> Callable[[Rng], Case]:
        def case(rng: Rng) -> Case:
            r, wall = response(rng, shape), now_wall(rng)
            return (lambda: parse(r, wall)), r
        return case

    def seconds(rng: Rng) -> Case:
        key = rng.choice(["expires_in", "interval"])
        doc = {key: rng.choice([rand_value(rng), seconds_like(rng), rand_int(rng)])}
        return (lambda: seconds_field(doc, key)), doc

    def retry(rng: Rng) -> Case:
        r, wall = HttpResponse(status=429, body=b"", headers=headers(rng)), now_wall(rng)
        return (lambda: retry_after(r, now_wall=wall)), r.headers

    def claims_case(check: bool) -> Callable[[Rng], Case]:
        def case(rng: Rng) -> Case:
            token = id_token(rng)
            if check:
                issuer = rng.choice([None, "https://idp.example", *ISSUERS])
                return (lambda: check_id_token(token, issuer=issuer, client_id="device-agent",
                                               now_wall=1.7e9)), token
            return (lambda: id_token_claims(token)), token
        return case

    return {
        "parse_json_object": with_response(TOKEN, lambda r, w: parse_json_object(r)),
        "parse_error": with_response(TOKEN, lambda r, w: parse_error(r)),
        "classify": with_response(TOKEN, lambda r, w: classify(
            r, now_wall=w, client_authenticated=True)),
        "retry_after": retry,
        "seconds_field": seconds,
        "parse_token_answer": with_response(TOKEN, lambda r, w: parse_token_answer(
            r, now_wall=1.7e9)),
        "parse_token_answer[rotated]": rotated,
        "receive_device_authorization": with_response(
            DEVICE, lambda r, w: receive_device_authorization(r, now=0.0, now_wall=w)),
        "DevicePoll.receive": poll,
        "receive_refresh": with_response(TOKEN, lambda r, w: receive_refresh(
            r, previous=PREVIOUS, now_wall=1.7e9)),
        "receive_revocation": with_response(TOKEN, lambda r, w: receive_revocation(r)),
        "receive_userinfo": with_response(USERINFO, lambda r, w: receive_userinfo(r)),
        "id_token_claims": claims_case(check=False),
        "check_id_token": claims_case(check=True),
        "parse_discovery": discovery_doc_case,
        "Discovery.receive": discovery,
        "CredentialStore.load": store,
        "SessionFile.load": sessionfile,
        "config_from_mapping": mapping,
        "load_config": yaml_config,
    }


# -- the run -------------------------------------------------------------------------

class _Digits:
    def __init__(self, n: int) -> None:
        self.text = f"<int of about {int(n.bit_length() * 0.30103) + 1} digits>"

    def __repr__(self) -> str:
        return self.text


def printable(value: Any) -> Any:
    """Response bodies shown (HttpResponse's repr leaves them out), and integers beyond
    the str() limit named instead of crashing repr()."""
    if isinstance(value, HttpResponse):
        return {"status": value.status, "headers": dict(value.headers), "body": value.body}
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 14_000:
        return _Digits(value)
    if isinstance(value, list | tuple):
        return [printable(v) for v in value]
    if isinstance(value, dict):
        return {printable(k): printable(v) for k, v in value.items()}
    return value


def show(value: object, limit: int = 240) -> str:
    try:
        text = repr(printable(value))
    except (ValueError, TypeError):
        text = f"<{type(value).__name__}>"
    if len(text) > limit:
        text = f"{text[:limit * 2 // 3]}...<{len(text)} chars>...{text[-limit // 4:]}"
    return text


def location(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if f.filename.startswith(AGENT_DIR)]
    parts = []
    if ours:
        parts.append(f"{os.path.relpath(ours[-1].filename, REPO)}:{ours[-1].lineno} "
                     f"in {ours[-1].name}")
    if frames and (not ours or frames[-1] is not ours[-1]):
        inner = frames[-1]
        name = inner.filename.replace(str(REPO) + os.sep, "")
        parts.append(f"(innermost {name}:{inner.lineno} in {inner.name})")
    return " ".join(parts) or "?"


@dataclass
class Tally:
    tried: int = 0
    returned: int = 0
    typed: int = 0
    foreign: int = 0
    kinds: collections.Counter[str] = field(default_factory=collections.Counter)
    first: dict[str, tuple[str, str]] = field(default_factory=dict)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=20240611)
    parser.add_argument("--rounds", type=int, default=None,
                        help="stop after this many inputs per parser (exactly reproducible)")
    parser.add_argument("--show", type=int, default=3,
                        help="distinct foreign exceptions shown per parser")
    args = parser.parse_args(argv)

    # SessionFile.load warns about every damaged file it is handed; that is its job.
    logging.getLogger("agent").addHandler(logging.NullHandler())
    logging.getLogger("agent").propagate = False

    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="fuzz-parsers-"))
    os.chmod(work, 0o700)
    cases = make_cases(work)
    tallies = {name: Tally() for name in cases}
    python = os.path.relpath(sys.executable)
    python = sys.executable if python.startswith("..") else python
    command = f"{python} bench/fuzz_parsers.py --seconds {args.seconds:g} " \
              f"--seed {args.seed}" + (f" --rounds {args.rounds}" if args.rounds else "")
    print(f"device-agent parser fuzz: {command}")
    print(f"seed {args.seed}; Python {platform.python_version()} on {platform.machine()}; "
          f"PyYAML {yaml.__version__}")
    started = time.monotonic()
    deadline = started + args.seconds
    rounds = 0
    try:
        while time.monotonic() < deadline and (args.rounds is None or rounds < args.rounds):
            rounds += 1
            for name, make in cases.items():
                tally = tallies[name]
                call, shown = make(rng)
                tally.tried += 1
                try:
                    call()
                except AgentError:
                    tally.typed += 1
                except KeyboardInterrupt:
                    raise
                except BaseException as exc:
                    tally.foreign += 1
                    kind = f"{type(exc).__name__} at {location(exc)}"
                    tally.kinds[kind] += 1
                    tally.first.setdefault(kind, (show(str(exc), 160), show(shown)))
                else:
                    tally.returned += 1
    except KeyboardInterrupt:
        print("interrupted")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    elapsed = time.monotonic() - started

    width = max(len(name) for name in tallies)
    print(f"\n{rounds} rounds in {elapsed:.1f} s\n")
    print(f"{'parser':<{width}}  {'tried':>8}  {'returned':>8}  {'typed':>8}  {'foreign':>8}")
    for name, t in tallies.items():
        print(f"{name:<{width}}  {t.tried:>8}  {t.returned:>8}  {t.typed:>8}  {t.foreign:>8}")
    total = sum(t.foreign for t in tallies.values())
    if total:
        print(f"\nforeign exceptions (first {args.show} kinds per parser):")
        for name, t in tallies.items():
            for kind, count in t.kinds.most_common()[:args.show]:
                message, shown = t.first[kind]
                print(f"\n  {name}: {kind}  x{count}\n    {message}\n    input: {shown}")
            if len(t.kinds) > args.show:
                print(f"\n  {name}: {len(t.kinds) - args.show} more kinds")
    print(f"\n{total} foreign exceptions in {sum(t.tried for t in tallies.values())} inputs")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
