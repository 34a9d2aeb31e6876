"""Property-based tests of every parser of untrusted input.

The rule (agent/errors.py): foreign exceptions are translated once, at the module that
talks to the foreign library. So a parser of network, config or API input either
returns, or raises one of our own typed errors (an `AgentError` subclass); a
ValueError, RecursionError, OverflowError, UnicodeError, RuntimeError ... that comes out
of one is a bug, whatever the input.

The inputs are what a hostile or broken peer can send: arbitrary bytes; arbitrary JSON
(lone surrogates such as "\\ud800", integers of 400 and 5000 digits, NaN and
infinities, digits of other scripts such as "²" and "٣"); objects shaped like the real
answers or files with each field kept, dropped or replaced by any JSON value; nesting
200000 levels deep; Retry-After headers of every kind; YAML with every tag and scalar
PyYAML knows. Also: a token answer that carries a non-empty access_token is never
refused, since the provider has rotated by the time it is read.

`database=None`: no example database (hypothesis still keeps a small cache in
.hypothesis/, which it git-ignores itself). PARSER_HYPOTHESIS_EXPLORE=1 skips the
explicit examples, so that generation shows what else it finds.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from agent import config as config_module
from agent import sessionfile as sessionfile_module
from agent import store as store_module
from agent.config import DISPLAY_TYPES, config_from_mapping, load_config
from agent.errors import AgentError
from agent.hooks import HOOK_EVENTS
from agent.oauth.discovery import Discovery, ExplicitEndpoints, parse_discovery
from agent.oauth.events import (
    Approved,
    CodeIssued,
    Refreshed,
    RefreshRejected,
    Rejected,
    ServerTrouble,
    Throttled,
)
from agent.oauth.flow import DevicePoll, receive_device_authorization
from agent.oauth.models import Client, DeviceAuthorization, Endpoints, HttpResponse, TokenSet
from agent.oauth.tokens import (
    check_id_token,
    id_token_claims,
    receive_refresh,
    receive_revocation,
    receive_userinfo,
)
from agent.oauth.wire import (
    MAX_SECONDS,
    classify,
    parse_error,
    parse_json_object,
    parse_token_answer,
    retry_after,
    seconds_field,
)
from agent.sessionfile import PendingCode, PendingRevocation, SessionFile, SessionRecord
from agent.store import Credentials, CredentialStore
from bench.fuzz_parsers import REPO, show
from bench.fuzz_parsers import location as where

T = TypeVar("T")

_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
           HealthCheck.large_base_example]
# PARSER_HYPOTHESIS_EXPLORE=1 skips the explicit examples (the first failing one stops
# the search) and lets generation find whatever else there is.
_PHASES = ([Phase.generate, Phase.target, Phase.shrink]
           if os.environ.get("PARSER_HYPOTHESIS_EXPLORE") else list(Phase))
# Sized so that the whole file runs in well under 20 s on two cores.
PURE = settings(max_examples=150, deadline=None, database=None, phases=_PHASES,
                suppress_health_check=_HEALTH)
FILES = settings(max_examples=80, deadline=None, database=None, phases=_PHASES,
                 suppress_health_check=[*_HEALTH, HealthCheck.function_scoped_fixture])

# -- the check ---------------------------------------------------------------------
# The reporting helpers are the fuzz script's: one way to show an input and where an
# exception was raised, for both.

class Raised:
    """The AgentError a parser raised (as opposed to one it returned, as parse_error does)."""

    def __init__(self, error: AgentError) -> None:
        self.error = error

    def __repr__(self) -> str:
        return f"Raised({self.error!r})"


def typed(parser: str, call: Callable[[], T], shown: object) -> T | Raised:
    """What `call` returns, or Raised(the AgentError it raises); anything else fails the
    test with the parser's name, the exception, where it was raised and the input."""
    try:
        return call()
    except AgentError as exc:
        return Raised(exc)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        raise AssertionError(
            f"{parser} let a foreign {type(exc).__name__} escape: {show(str(exc), 160)}\n"
            f"  raised at {where(exc)}\n  input: {show(shown, 300)}") from exc


# -- values ------------------------------------------------------------------------

class Big:
    """An integer literal too long for str()/repr() (CPython refuses > 4300 digits), so
    hypothesis can print the example; `materialize` makes the real int."""

    def __init__(self, digits: int, negative: bool = False) -> None:
        self.digits = digits
        self.negative = negative

    def __repr__(self) -> str:
        return f"Big({self.digits} digits{', negative' if self.negative else ''})"

    def literal(self) -> str:
        return ("-" if self.negative else "") + "1" * self.digits

    def value(self) -> int:
        number = 0
        for _ in range(self.digits):
            number = number * 10 + 1
        return -number if self.negative else number


class Raw:
    """A JSON number literal written verbatim (json.dumps cannot write some of them)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"Raw({show(self.text, 40)})"


def materialize(value: Any) -> Any:
    """`value` as json.loads would give it to a parser of an already-parsed mapping."""
    if isinstance(value, Big):
        return value.value()
    if isinstance(value, Raw):
        return float(value.text)
    if isinstance(value, list):
        return [materialize(v) for v in value]
    if isinstance(value, dict):
        return {k: materialize(v) for k, v in value.items()}
    return value


def to_json(value: Any) -> str:
    """JSON text for `value`, with NaN/Infinity and lone surrogates as \\u escapes."""
    if isinstance(value, Big):
        return value.literal()
    if isinstance(value, Raw):
        return value.text
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ",".join(to_json(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(str(k))}:{to_json(v)}"
                              for k, v in value.items()) + "}"
    raise TypeError(type(value))


ENCODINGS = ["utf-8", "utf-8", "utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-32"]


def encode(text: str, encoding: str = "utf-8") -> bytes:
    return text.encode(encoding, "surrogatepass")


SPECIAL_TEXT = [
    "", " ", "\t\r\n", "\x00", "\ud800", "\udfff", "a\ud800b", "\udc80",
    "²", "٣", "١٢٣", "߀", "³⁴", "٣٠s", "²s", "Ⅻ", "𝟗",
    "1" * 5000, "9" * 12, "9" * 13, "1" * 400 + "d", "-1", "0", "1.5", "1e3", "0x1F",
    "nan", "NaN", "inf", "-Infinity", "null", "true", "Bearer", "bearer", "DPoP",
    "<html>", "https://[", "http://[::1", "https://a\uff03b@c/", "https://h:99999/",
    "https://u:p@h/", "https://h/#f", "~nosuchuser/x", "~", "~/x", "/tmp/\ud800",
    "a\x00b", "0o777", "0660", "1h30m", " 5 s ", "2d", "x" * 20000,
]
texts = st.one_of(st.text(alphabet=st.characters(exclude_categories=()), max_size=40),
                  st.sampled_from(SPECIAL_TEXT))
BIG_INTS = [10**400, -(10**400), 2**63, -(2**63) - 1, 2**1024, 10**4000]
integers = st.one_of(st.integers(), st.sampled_from(BIG_INTS),
                     st.builds(Big, st.sampled_from([4301, 5000]), st.booleans()))
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([Raw("1e999999"), Raw("-1e999999"), Raw("1" * 5000 + ".5"),
                                    Raw("1e-999999"), Raw("-0.0")]))
scalars = st.one_of(st.none(), st.booleans(), integers, floats, texts)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(texts, children, max_size=4)),
    max_leaves=12)
json_objects = st.dictionaries(texts, json_values, max_size=6)

_OPENERS = {"[": "]", '{"a":': "}", '[{"a":': "}]", " [ ": " ] ", '{"a":[': "]}"}


@st.composite
def deep_json(draw: st.DrawFn) -> bytes:
    """Nesting far beyond the recursion limit: "[" * 200000 and friends."""
    depth = draw(st.one_of(st.sampled_from([200_000, 5_000, 1_000]),
                           st.integers(900, 3_000)))
    opener = draw(st.sampled_from(sorted(_OPENERS)))
    text = opener * depth
    if draw(st.booleans()):
        text += "1" + _OPENERS[opener] * depth
    if draw(st.booleans()):  # inside an object that is otherwise a good answer
        key = draw(st.sampled_from(["scope", "error", "issuer", "tokens", "x"]))
        text = f'{{"access_token":"at","error":"slow_down","{key}":{text}}}'
    return text.encode()


@st.composite
def json_bytes(draw: st.DrawFn, values: st.SearchStrategy[Any] = json_values) -> bytes:
    text = to_json(draw(values))
    encoding = draw(st.sampled_from(ENCODINGS))
    if draw(st.booleans()):
        # Not ensure_ascii: lone surrogates become bytes no UTF-8 decoder accepts.
        text = text.encode().decode("unicode_escape", "replace")
    return encode(text, encoding)


arbitrary_bodies = st.one_of(
    st.binary(max_size=200),
    json_bytes(),
    deep_json(),
    texts.map(encode),
    st.sampled_from([b"", b"{}", b"[]", b"null", b"<html><body>sign in</body></html>",
                     b"\xef\xbb\xbf{}", b"{" * 10, b'{"a":1,"a":2}', b"NaN",
                     b"1" * 5000, b'{"error":' + b"1" * 5000 + b"}"]),
)


_MISSING = object()


def shaped(fields: Mapping[str, st.SearchStrategy[Any]], *,
           anything: st.SearchStrategy[Any] = json_values) -> st.SearchStrategy[dict]:
    """Objects with the real fields, in any order, each one a real value (half the time),
    any JSON value, or absent; plus a few unknown keys."""

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        doc: dict[str, Any] = {}
        for key in draw(st.permutations(list(fields))):
            pick = draw(st.integers(0, 3))
            if pick <= 1:
                doc[key] = draw(fields[key])
            elif pick == 2:
                doc[key] = draw(anything)
        for key, value in draw(st.dictionaries(texts, anything, max_size=2)).items():
            doc.setdefault(key, value)
        return doc

    return build()


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(doc, dict):
        for key, value in doc.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            found += _paths(value, (*prefix, index))
    return found


def near(valid: dict[str, Any], *,
         anything: st.SearchStrategy[Any] = json_values) -> st.SearchStrategy[dict]:
    """A sound document with one or two values, anywhere in it, replaced or dropped: the
    checks behind the first field are reached only when that field is sound."""
    paths = _paths(valid)

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        doc = copy.deepcopy(valid)
        for path in draw(st.lists(st.sampled_from(paths), min_size=1, max_size=2,
                                  unique=True)):
            parent: Any = doc
            try:
                for key in path[:-1]:
                    parent = parent[key]
                if isinstance(parent, dict) and draw(st.integers(0, 4)) == 0:
                    parent.pop(path[-1], None)
                else:
                    parent[path[-1]] = draw(anything)
            except (KeyError, IndexError, TypeError):
                continue  # an earlier replacement took this path away
        return doc

    return build()


def seconds_like() -> st.SearchStrategy[Any]:
    return st.one_of(st.integers(0, 10**6), st.floats(0, 1e6),
                     st.integers(0, 10**6).map(str),
                     st.sampled_from(["600", "1.5", " 5 ", "٣", "²", "1" * 13, "-5", "0"]))


def jwt_of(payload: st.SearchStrategy[bytes]) -> st.SearchStrategy[str]:
    def token(header: str, body: bytes, signature: str, padded: bool) -> str:
        part = base64.urlsafe_b64encode(body).decode()
        return f"{header}.{part if padded else part.rstrip('=')}.{signature}"
    return st.builds(token, st.sampled_from(["eyJhbGciOiJSUzI1NiJ9", "", "x"]),
                     payload, st.sampled_from(["sig", ""]), st.booleans())


claims_payloads = st.one_of(
    json_bytes(shaped({"sub": texts, "name": texts, "email": texts,
                       "preferred_username": texts, "iss": texts, "aud": json_values,
                       "exp": integers, "iat": integers, "azp": texts})),
    json_bytes(), deep_json(), st.binary(max_size=60))
id_tokens = st.one_of(jwt_of(claims_payloads), texts,
                      st.lists(texts, min_size=3, max_size=3).map(".".join),
                      st.sampled_from(["a.b.c", "..", "a.\ud800.c", "a.٣٣٣٣.c", "a.=.c",
                                       "a." + "A" * 5 + ".c", "a.e30.c"]))

TOKEN_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "access_token": texts.filter(bool),
    "token_type": st.sampled_from(["Bearer", "bearer", "BEARER", "DPoP", "mac", ""]),
    "expires_in": seconds_like(),
    "refresh_token": texts,
    "id_token": id_tokens,
    "scope": st.one_of(texts, st.lists(texts, max_size=4)),
    "error": st.sampled_from(["invalid_grant", "slow_down", "authorization_pending",
                              "access_denied", "expired_token", "server_error",
                              "temporarily_unavailable", "invalid_client", "weird", ""]),
    "error_description": texts,
}
DEVICE_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "device_code": texts, "user_code": texts, "verification_uri": texts,
    "verification_url": texts, "verification_uri_complete": texts,
    "expires_in": seconds_like(), "interval": seconds_like(),
    "error": TOKEN_FIELDS["error"], "error_description": texts,
}
USERINFO_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "sub": texts, "name": texts, "preferred_username": texts, "email": texts}

ISSUERS = ["https://idp.example/application/o/dev/", "https://idp.example",
           "http://127.0.0.1:9000/realms/x"]
url_like = st.one_of(
    st.sampled_from([*ISSUERS, "https://idp.example/token", "http://idp.example/device",
                     "https://[", "http://[::1", "https://[::1]:99999/x", "https://a\uff03b@c/",
                     "https://a\u2100b/", "https://ho\ufe13st/", "ftp://x/", "https:///x",
                     "//idp.example/x", "https://u:p@h/", "", "\ud800"]),
    st.builds(lambda scheme, rest: scheme + rest,
              st.sampled_from(["https://", "http://", "", "HTTPS://", "javascript:"]), texts))
DISCOVERY_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "issuer": st.sampled_from(ISSUERS),
    "token_endpoint": url_like,
    "device_authorization_endpoint": url_like,
    "revocation_endpoint": url_like,
    "userinfo_endpoint": url_like,
    "scopes_supported": st.lists(texts, max_size=3),
    "grant_types_supported": st.lists(texts, max_size=3),
}


VALID_DISCOVERY = {
    "issuer": "https://idp.example", "token_endpoint": "https://idp.example/token",
    "device_authorization_endpoint": "https://idp.example/device",
    "revocation_endpoint": "https://idp.example/revoke",
    "userinfo_endpoint": "https://idp.example/userinfo",
    "scopes_supported": ["openid", "offline_access"],
    "grant_types_supported": ["urn:ietf:params:oauth:grant-type:device_code"]}


@st.composite
def discovery_docs(draw: st.DrawFn) -> dict[str, Any]:
    if draw(st.booleans()):
        return draw(near(VALID_DISCOVERY, anything=st.one_of(url_like, json_values)))
    doc = draw(shaped(DISCOVERY_FIELDS))
    if draw(st.integers(0, 3)):  # mostly the configured issuer, to reach the URL checks
        doc["issuer"] = draw(st.sampled_from(ISSUERS))
    return doc


# -- Retry-After -------------------------------------------------------------------

DAYS = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun", "Sunday", "Mon,", ""]
MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov",
          "Dec", "January", "jan", "Foo"]
ZONES = ["GMT", "UTC", "UT", "+0000", "-0000", "+9999", "-2400", "+2359", "EST", "PDT",
         "XYZ", "+99999999", "", "Z", "+", "-", "+٣٠٠"]


@st.composite
def http_dates(draw: st.DrawFn) -> str:
    day = draw(st.sampled_from(DAYS))
    dd = draw(st.one_of(st.integers(0, 99), st.integers()))
    mon = draw(st.sampled_from(MONTHS))
    year = draw(st.one_of(st.integers(0, 99), st.integers(1, 9999), st.integers(0, 10**6),
                          st.sampled_from([10**30, -1])))
    hh, mm, ss = (draw(st.integers(0, 99)) for _ in range(3))
    zone = draw(st.sampled_from(ZONES))
    form = draw(st.integers(0, 2))
    if form == 0:  # IMF-fixdate
        return f"{day}, {dd:02d} {mon} {year:04d} {hh:02d}:{mm:02d}:{ss:02d} {zone}"
    if form == 1:  # RFC 850
        return f"{day}, {dd:02d}-{mon}-{year:02d} {hh:02d}:{mm:02d}:{ss:02d} {zone}"
    return f"{day} {mon} {dd:2d} {hh:02d}:{mm:02d}:{ss:02d} {year}"  # asctime


date_garbage = st.lists(
    st.one_of(st.sampled_from([*DAYS, *MONTHS, *ZONES, ",", ":", "-", "99:99:99", "1:2",
                               "00:00", "²", "٣", "1" * 5000, "2024", "31", "0", "-1"]),
              texts), max_size=7).map(" ".join)
retry_values = st.one_of(
    texts, st.integers().map(str), http_dates(), date_garbage,
    st.datetimes(timezones=st.none() | st.just(dt.UTC)).map(
        lambda d: d.strftime("%a, %d %b %Y %H:%M:%S GMT")),
    st.sampled_from(["1" * 5000, "9" * 12, "9" * 13, "٣", "²", "١٢", " 12 ", "12\n", "-5",
                     "1.5", "0", "", "Wed, 21 Oct 2015 07:28:00 GMT",
                     "Wed, 21 Oct 9999 07:28:00 -0000", "Mon, 1 Jan 0001 00:00:00 -0000",
                     "Mon, 1 Jan 0 00:00:00 +0000", "1 Jan 1970 00:00:00 +2400"]))
header_maps = st.dictionaries(
    st.one_of(st.sampled_from(["Retry-After", "retry-after", "RETRY-AFTER", "Content-Type",
                               "content-type"]), texts),
    st.one_of(retry_values, st.sampled_from(["text/html", "application/json",
                                             "text/html; charset=utf-8"])),
    max_size=4)
statuses = st.one_of(
    st.sampled_from([200, 200, 201, 204, 302, 400, 401, 403, 404, 410, 429, 500, 503]),
    st.integers(100, 599), st.integers(-(10**6), 10**6))
now_walls = st.one_of(st.none(), st.floats(0, 4e9), st.sampled_from([0.0, 1.7e9]))


def responses(bodies: st.SearchStrategy[bytes] = arbitrary_bodies,
              status: st.SearchStrategy[int] = statuses) -> st.SearchStrategy[HttpResponse]:
    return st.builds(lambda s, b, h: HttpResponse(status=s, body=b, headers=h),
                     status, bodies, header_maps)


VALID_ANSWERS: dict[str, dict[str, Any]] = {
    "token": {"access_token": "at", "token_type": "Bearer", "expires_in": 300,
              "refresh_token": "rt", "scope": "openid offline_access",
              "id_token": "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ1MSIsImF1ZCI6ImRldmljZS1hZ2VudCJ9.s"},
    "device": {"device_code": "dc", "user_code": "ABCD-EFGH",
               "verification_uri": "https://idp.example/device",
               "verification_uri_complete": "https://idp.example/device?code=ABCD-EFGH",
               "expires_in": 600, "interval": 5},
    "userinfo": {"sub": "u1", "name": "Ann", "preferred_username": "ann",
                 "email": "ann@example.com"},
    "error": {"error": "authorization_pending", "error_description": "waiting"},
}


def answers(fields: Mapping[str, st.SearchStrategy[Any]],
            valid: tuple[str, ...] = ("token", "device", "userinfo", "error"),
            ) -> st.SearchStrategy[HttpResponse]:
    """Mostly answers shaped like the real ones, or sound ones with a value or two
    replaced; sometimes anything at all."""
    near_valid = st.one_of(*(near(VALID_ANSWERS[name]) for name in valid))
    return st.one_of(responses(json_bytes(shaped(fields))),
                     responses(json_bytes(shaped(fields)), st.just(200)),
                     responses(json_bytes(near_valid), st.just(200)),
                     responses(json_bytes(near_valid)),
                     responses())


DEEP = HttpResponse(status=200, body=b"[" * 200_000)
DEEP_OBJECT = HttpResponse(status=400, body=b'{"a":' * 200_000)
HUGE = HttpResponse(status=200, body=b'{"access_token":"at","expires_in":' + b"1" * 5000 + b"}")
SURROGATE = HttpResponse(status=400, body=b'{"error":"\\ud800","error_description":"\\udfff"}')
RETRY_5000 = HttpResponse(status=429, body=b"", headers={"Retry-After": "1" * 5000})
CLIENT = Client(client_id="device-agent")
PREVIOUS = TokenSet(access_token="at-0", token_type="Bearer", issued_at=0.0,
                    expires_at=3600.0, refresh_token="rt-0", id_token="id-0", scope="openid")
previous_sets = st.one_of(st.none(), st.just(PREVIOUS))


# -- agent/oauth/wire.py -----------------------------------------------------------

@PURE
@given(responses())
@example(DEEP)
@example(DEEP_OBJECT)
@example(HUGE)
@example(SURROGATE)
def test_parse_json_object(response: HttpResponse) -> None:
    result = typed("parse_json_object", lambda: parse_json_object(response), response)
    assert isinstance(result, dict | Raised)


@PURE
@given(answers(TOKEN_FIELDS))
@example(DEEP_OBJECT)
@example(SURROGATE)
def test_parse_error(response: HttpResponse) -> None:
    result = typed("parse_error", lambda: parse_error(response), response)
    assert not isinstance(result, Raised), "parse_error returns its error, never raises"


@PURE
@given(answers(TOKEN_FIELDS), now_walls, st.booleans())
@example(RETRY_5000, 1.7e9, False)
@example(DEEP, None, True)
def test_classify(response: HttpResponse, now_wall: float | None, authenticated: bool) -> None:
    typed("classify", lambda: classify(response, now_wall=now_wall,
                                       client_authenticated=authenticated), response)


@PURE
@given(header_maps, now_walls)
@example({"Retry-After": "1" * 5000}, 0.0)
@example({"Retry-After": "²"}, 0.0)
@example({"retry-after": "٣"}, None)
@example({"Retry-After": "Mon, 1 Jan 0001 00:00:00 -0000"}, 1.7e9)
def test_retry_after(headers: dict[str, str], now_wall: float | None) -> None:
    response = HttpResponse(status=429, body=b"", headers=headers)
    result = typed("retry_after", lambda: retry_after(response, now_wall=now_wall), headers)
    # A header is advice: never a reason to fail, never a wait beyond MAX_SECONDS.
    assert result is None or (isinstance(result, float) and 0 <= result <= MAX_SECONDS), result


@PURE
@given(st.dictionaries(st.sampled_from(["expires_in", "interval"]), json_values),
       st.sampled_from(["expires_in", "interval", "absent"]))
@example({"interval": Big(5000)}, "interval")
@example({"interval": 10**400}, "interval")
@example({"interval": "٣"}, "interval")
def test_seconds_field(body: dict[str, Any], key: str) -> None:
    real = materialize(body)
    result = typed("seconds_field", lambda: seconds_field(real, key), body)
    if isinstance(result, float):
        assert 0 <= result <= MAX_SECONDS


@PURE
@given(answers(TOKEN_FIELDS), previous_sets, st.one_of(st.none(), texts))
@example(HUGE, None, None)
@example(DEEP, None, None)
def test_parse_token_answer(response: HttpResponse, previous: TokenSet | None,
                            requested: str | None) -> None:
    typed("parse_token_answer",
          lambda: parse_token_answer(response, now_wall=1e9, previous=previous,
                                     requested_scope=requested), response)


@st.composite
def rotated_answers(draw: st.DrawFn) -> dict[str, Any]:
    """A token answer with a non-empty access_token and anything else."""
    doc = draw(shaped({k: v for k, v in TOKEN_FIELDS.items()
                       if k not in ("access_token", "error")}))
    doc.pop("error", None)  # an error field makes it an error answer: not this property
    doc["access_token"] = draw(texts.filter(bool))
    return doc


@PURE
@given(rotated_answers(), st.sampled_from(ENCODINGS), previous_sets,
       st.one_of(st.none(), texts), st.floats(0, 4e9))
@example({"access_token": "at", "expires_in": Big(5000)}, "utf-8", None, None, 0.0)
@example({"access_token": "\ud800", "scope": ["a", "\ud800"], "expires_in": Raw("1e999999"),
          "token_type": 7, "refresh_token": [], "id_token": {}}, "utf-8", PREVIOUS, None, 0.0)
def test_token_answer_with_an_access_token_is_never_refused(
        doc: dict[str, Any], encoding: str, previous: TokenSet | None,
        requested: str | None, now_wall: float) -> None:
    response = HttpResponse(status=200, body=encode(to_json(doc), encoding))
    result = typed("parse_token_answer",
                   lambda: parse_token_answer(response, now_wall=now_wall, previous=previous,
                                              requested_scope=requested), doc)
    assert not isinstance(result, Raised), (
        f"a rotated answer was refused ({result!r}): {show(doc, 300)}")
    tokens, notes = result
    assert tokens.access_token == parse_json_object(response)["access_token"]
    assert isinstance(tokens.token_type, str) and tokens.token_type
    assert tokens.expires_at is None or (
        math.isfinite(tokens.expires_at)
        and now_wall <= tokens.expires_at <= now_wall + MAX_SECONDS)
    assert all(isinstance(note, str) for note in notes)
    # The same answer reaches the token set through both callers.
    refreshed = typed("receive_refresh",
                      lambda: receive_refresh(response, previous=PREVIOUS, now_wall=now_wall),
                      doc)
    assert isinstance(refreshed, Refreshed), refreshed
    approved = typed("DevicePoll.receive",
                     lambda: new_poll(0.0).receive(response, now=1.0, now_wall=now_wall), doc)
    assert isinstance(approved, Approved), approved


# -- agent/oauth/flow.py -----------------------------------------------------------

def new_poll(now: float) -> DevicePoll:
    authorization = DeviceAuthorization(
        device_code="dc", user_code="ABCD-EFGH", verification_uri="https://idp.example/d",
        verification_uri_complete=None, expires_in=600.0, interval=5.0, issued_at=now)
    return DevicePoll(authorization, client=CLIENT, token_endpoint="https://idp.example/t",
                      scope="openid offline_access")


@PURE
@given(answers(DEVICE_FIELDS, ("device", "error")), st.floats(0, 1e9), now_walls)
@example(HttpResponse(status=200, body=b'{"device_code":"d","user_code":"u",'
                      b'"verification_uri":"https://x/","expires_in":' + b"1" * 5000 + b"}"),
         0.0, None)
@example(DEEP, 0.0, None)
@example(RETRY_5000, 0.0, 1.7e9)
def test_receive_device_authorization(response: HttpResponse, now: float,
                                      now_wall: float | None) -> None:
    result = typed("receive_device_authorization",
                   lambda: receive_device_authorization(response, now=now, now_wall=now_wall),
                   response)
    assert isinstance(result, CodeIssued | Throttled | ServerTrouble | Rejected | Raised)


@PURE
@given(st.lists(answers(TOKEN_FIELDS), min_size=1, max_size=3), st.floats(0, 1e6),
       st.floats(0, 4e9))
@example([DEEP, RETRY_5000, HUGE], 0.0, 1.7e9)
def test_device_poll_receive(answers_: list[HttpResponse], now: float, now_wall: float) -> None:
    poll = new_poll(now)
    for step, response in enumerate(answers_):
        at = now + 6.0 * (step + 1)
        typed("DevicePoll.receive",
              lambda response=response, at=at: poll.receive(response, now=at,
                                                             now_wall=now_wall + at),
              response)
    assert math.isfinite(poll.interval) and poll.interval >= 5.0
    assert math.isfinite(poll.next_poll_at)


# -- agent/oauth/tokens.py ---------------------------------------------------------

@PURE
@given(answers(TOKEN_FIELDS), st.floats(0, 4e9))
@example(DEEP_OBJECT, 0.0)
@example(HUGE, 0.0)
def test_receive_refresh(response: HttpResponse, now_wall: float) -> None:
    result = typed("receive_refresh",
                   lambda: receive_refresh(response, previous=PREVIOUS, now_wall=now_wall),
                   response)
    assert isinstance(result, Refreshed | RefreshRejected | Rejected | ServerTrouble
                      | Raised)


@PURE
@given(answers(TOKEN_FIELDS))
@example(DEEP_OBJECT)
@example(RETRY_5000)
def test_receive_revocation(response: HttpResponse) -> None:
    typed("receive_revocation", lambda: receive_revocation(response), response)


@PURE
@given(answers(USERINFO_FIELDS, ("userinfo",)))
@example(DEEP)
@example(HttpResponse(status=200, body=b'{"sub":"\\ud800","name":"\\u0663"}'))
def test_receive_userinfo(response: HttpResponse) -> None:
    result = typed("receive_userinfo", lambda: receive_userinfo(response), response)
    if isinstance(result, dict):  # only text that can be shown and stored
        for value in result.values():
            value.encode("utf-8")


@PURE
@given(id_tokens)
@example("a." + base64.urlsafe_b64encode(b"[" * 200_000).decode() + ".c")
@example("a." + base64.urlsafe_b64encode(b'{"sub":"\\ud800"}').decode() + ".c")
@example("a.\ud800.c")
def test_id_token_claims(id_token: str) -> None:
    result = typed("id_token_claims", lambda: id_token_claims(id_token), id_token)
    if isinstance(result, dict):
        for value in result.values():
            value.encode("utf-8")


def _jwt(claims: dict[str, Any]) -> str:
    return "h." + base64.urlsafe_b64encode(to_json(claims).encode()).decode().rstrip("=") + ".s"


VALID_CLAIMS = {"iss": "https://idp.example", "aud": "device-agent", "azp": "device-agent",
                "exp": 1.7e9 + 300, "iat": 1.7e9, "sub": "u1", "name": "Ann"}


@PURE
@given(st.one_of(id_tokens, jwt_of(json_bytes(near(VALID_CLAIMS, anything=st.one_of(
    integers, json_values)))), jwt_of(json_bytes(shaped({
    "iss": st.sampled_from(ISSUERS), "aud": st.sampled_from(["device-agent",
                                                             ["device-agent", "x"]]),
    "azp": st.just("device-agent"), "exp": integers, "iat": integers, "sub": texts})))),
    st.sampled_from([None, "https://idp.example", *ISSUERS]), st.floats(0, 4e9))
@example(_jwt({"aud": "device-agent", "exp": 10**400, "iat": 0}), None, 1.7e9)
@example(_jwt({"aud": "device-agent", "exp": 0, "iat": 10**400}), None, 1.7e9)
def test_check_id_token(id_token: str, issuer: str | None, now_wall: float) -> None:
    typed("check_id_token",
          lambda: check_id_token(id_token, issuer=issuer, client_id="device-agent",
                                 now_wall=now_wall), id_token)


# -- agent/oauth/discovery.py ------------------------------------------------------

fallbacks = st.one_of(st.none(), st.just(Endpoints(device_authorization="https://idp.example/d",
                                                   token="https://idp.example/t")))


@st.composite
def discovery_answers(draw: st.DrawFn) -> tuple[HttpResponse, str]:
    """An answer and the configured issuer: mostly the one the document names."""
    doc = draw(discovery_docs())
    issuer = doc.get("issuer")
    if not isinstance(issuer, str) or not draw(st.integers(0, 3)):
        issuer = draw(st.sampled_from(ISSUERS))
    if draw(st.integers(0, 3)):
        return HttpResponse(status=200, body=draw(json_bytes(st.just(doc)))), issuer
    return draw(answers(DISCOVERY_FIELDS, ("error",))), issuer


@PURE
@given(discovery_answers() | st.just((DEEP, "https://idp.example")), st.booleans(), fallbacks,
       st.one_of(st.none(), st.just("https://idp.example/t")))
@example((HttpResponse(status=200, body=b'{"issuer":"https://idp.example",'
                       b'"token_endpoint":"https://["}'), "https://idp.example"),
         False, None, None)
@example((HttpResponse(status=200, body=b'{"issuer":"https://idp.example",'
                       b'"device_authorization_endpoint":"https://a\\uff03b@c/",'
                       b'"token_endpoint":"https://idp.example/t"}'), "https://idp.example"),
         False, None, None)
def test_parse_discovery(answer: tuple[HttpResponse, str], allow_http: bool,
                         fallback: Endpoints | None, token_endpoint: str | None) -> None:
    response, issuer = answer
    typed("parse_discovery",
          lambda: parse_discovery(response, issuer=issuer, allow_insecure_http=allow_http,
                                  fallback=fallback, token_endpoint=token_endpoint),
          answer)


explicit_endpoints = st.builds(
    ExplicitEndpoints,
    device_authorization=st.one_of(st.none(), st.just("https://idp.example/d")),
    token=st.one_of(st.none(), st.just("https://idp.example/t")),
    revocation=st.one_of(st.none(), st.just("https://idp.example/r")),
    userinfo=st.none())


@PURE
@given(st.one_of(st.none(), st.sampled_from(ISSUERS)), explicit_endpoints, st.booleans(),
       st.lists(st.one_of(responses(json_bytes(discovery_docs()),
                                    st.sampled_from([200, 404, 410])),
                          answers(DISCOVERY_FIELDS)), min_size=2, max_size=2))
@example("https://idp.example", ExplicitEndpoints(), False,
         [HttpResponse(status=404, body=b""),
          HttpResponse(status=200, body=b'{"issuer":"https://idp.example",'
                       b'"token_endpoint":"https://[::1"}')])
def test_discovery_receive(issuer: str | None, explicit: ExplicitEndpoints, allow_http: bool,
                           answers_: list[HttpResponse]) -> None:
    discovery = Discovery(issuer, explicit, allow_insecure_http=allow_http)
    step = discovery.first()
    for response in answers_:
        if step.request is None:
            break
        step = typed("Discovery.receive", lambda response=response: discovery.receive(response),
                     response)
        if isinstance(step, Raised):
            break


# -- agent/store.py and agent/sessionfile.py: files of arbitrary bytes -----------------

def write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(mode=0o700, exist_ok=True)
    os.chmod(path.parent, 0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


CREDENTIAL_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "version": st.sampled_from([1, 1, 2, 0, True, 1.0]),
    "client_id": texts, "issuer": st.one_of(st.none(), texts),
    "claims": st.dictionaries(texts, texts, max_size=3),
    "machine_id": st.one_of(st.none(), texts),
    "tokens": shaped({"access_token": texts, "token_type": texts,
                      "issued_at": st.one_of(floats, integers),
                      "expires_at": st.one_of(st.none(), floats, integers),
                      "refresh_token": texts, "id_token": texts, "scope": texts}),
}
VALID_CREDENTIALS = store_module._encode(Credentials(
    tokens=TokenSet(access_token="at", token_type="Bearer", issued_at=1.7e9,
                    expires_at=1.7e9 + 300, refresh_token="rt", id_token="it",
                    scope="openid"),
    client_id="device-agent", issuer="https://idp.example", claims={"sub": "u1"},
    machine_id="0" * 32))
file_bodies = st.one_of(arbitrary_bodies, json_bytes(shaped(CREDENTIAL_FIELDS)),
                        json_bytes(near(VALID_CREDENTIALS)))


@FILES
@given(data=file_bodies)
@example(data=b"[" * 200_000)
@example(data=b'{"version":' + b"1" * 5000 + b"}")
@example(data=b'{"version":1,"client_id":"c","issuer":null,"claims":{},"tokens":'
              b'{"access_token":"a","token_type":"Bearer","issued_at":1' + b"0" * 400 +
              b',"expires_at":null,"refresh_token":null,"id_token":null,"scope":null}}')
def test_credential_store_load(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "state" / "credentials.json"
    write_private(path, data)
    result = typed("CredentialStore.load", lambda: CredentialStore(path).load(), data)
    assert result is None or isinstance(result, Credentials | Raised)


VALID_SESSION = sessionfile_module._to_document(SessionRecord(
    codes_spent=(1.7e9,), throttle_until=1.7e9 + 60, throttle_delay=120.0,
    codes_expired_unused=1,
    pending_code=PendingCode(device_code="dc", user_code="ABCD-EFGH",
                             verification_uri="https://idp.example/d",
                             verification_uri_complete=None, interval=5.0, issued_at=1.7e9,
                             expires_at=1.7e9 + 600, scope="openid"),
    pending_revocations=(PendingRevocation(token="rt", hint="refresh_token"),)))
SESSION_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "version": st.sampled_from([1, 1, 2, 1001, 0, True]),
    "codes_spent": st.lists(st.one_of(floats, integers), max_size=4),
    "throttle_until": st.one_of(st.none(), floats, integers),
    "throttle_delay": st.one_of(st.none(), floats, integers),
    "codes_expired_unused": integers,
    "pending_code": st.one_of(st.none(), shaped({
        "device_code": texts, "user_code": texts, "verification_uri": texts,
        "verification_uri_complete": st.one_of(st.none(), texts),
        "interval": st.one_of(floats, integers), "issued_at": st.just(1e9),
        "expires_at": st.one_of(st.just(1e9 + 600), floats, integers),
        "scope": st.one_of(st.none(), texts)})),
    "pending_revocations": st.lists(shaped({
        "token": texts, "hint": st.sampled_from(["refresh_token", "access_token", "x"])}),
        max_size=3),
}


@FILES
@given(data=st.one_of(arbitrary_bodies, json_bytes(shaped(SESSION_FIELDS)),
                      json_bytes(near(VALID_SESSION))))
@example(data=b"[" * 200_000)
@example(data=b'{"version":1,"codes_spent":[1' + b"0" * 400 + b'],"throttle_until":null,'
              b'"throttle_delay":null,"codes_expired_unused":' + b"9" * 5000 + b',' +
              b'"pending_code":null,"pending_revocations":[]}')
def test_session_file_load(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "state" / "session.json"
    write_private(path, data)
    result = typed("SessionFile.load", lambda: SessionFile(path).load(), data)
    assert isinstance(result, SessionRecord | Raised)


# -- agent/config.py ---------------------------------------------------------------

config_paths = st.one_of(texts, st.sampled_from([
    "state/credentials.json", "/tmp/device-agent-test/x", "~/x", "~nosuchuser/x", "~root/x",
    "/tmp/\ud800", "/tmp/\udcff", "a\x00b", "/" * 300, "x" * 5000, ".", "/"]))
durations = st.one_of(seconds_like(), st.sampled_from(
    ["90", "90s", "10m", "1h30m", "2d", " 5 s ", "٣٠s", "²s", "1" * 400, "1" * 400 + "d",
     "-1", "nan", "inf", "1e3", 10**400, -(10**400)]))
accounts = st.one_of(texts, st.integers(), st.sampled_from(BIG_INTS), st.builds(Big, st.just(5000)))
config_values = st.one_of(json_values, st.dates(), st.datetimes(), st.binary(max_size=8),
                          st.frozensets(st.integers(), max_size=3))
SECTIONS: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "provider": {
        "issuer": url_like, "client_id": texts, "client_secret": texts,
        "client_secret_file": config_paths, "scopes": st.lists(texts, max_size=4),
        "ca_file": config_paths, "allow_insecure_http": st.booleans(),
        "device_authorization_endpoint": url_like, "token_endpoint": url_like,
        "revocation_endpoint": url_like, "userinfo_endpoint": url_like,
        "timeout": durations, "max_response_bytes": integers},
    "device": {"name": texts},
    "sign_in": {"codes_per_hour": integers, "throttle_backoff": durations,
                "throttle_backoff_max": durations, "retry_initial": durations,
                "retry_max": durations},
    "refresh": {"margin": durations, "margin_ratio": st.one_of(floats, integers),
                "retry_initial": durations, "retry_max": durations},
    "display": {"type": st.sampled_from(sorted(DISPLAY_TYPES)), "path": config_paths,
                "blank_after": durations,
                "options": st.dictionaries(st.one_of(texts, integers), config_values,
                                           max_size=3)},
    "storage": {"path": config_paths},
    "api": {"socket": config_paths, "mode": st.one_of(integers, st.sampled_from(
                ["0660", "0o777", "777", "0x1", "٦٦٠"])),
            "read_users": st.lists(accounts, max_size=3),
            "read_groups": st.lists(accounts, max_size=3),
            "admin_users": st.lists(accounts, max_size=3),
            "admin_groups": st.lists(accounts, max_size=3)},
    "logging": {"level": st.sampled_from(["debug", "INFO", "warning", "error", "loud"])},
}
SINK_FIELDS = {"path": config_paths, "format": st.sampled_from(["raw", "json", "env", "xml"]),
               "mode": integers, "owner": accounts, "group": accounts,
               "on_logout": st.sampled_from(["remove", "empty", "keep"]),
               "env_prefix": texts}
HOOK_FIELDS = {"command": st.lists(st.one_of(st.just("/bin/true"), texts), max_size=3),
               "events": st.lists(st.sampled_from([*HOOK_EVENTS, "boom"]), max_size=3),
               "timeout": durations, "pass_token": st.booleans()}


@st.composite
def config_mappings(draw: st.DrawFn) -> dict[Any, Any]:
    """A config shaped like the real one; the provider section is mostly sound, so that
    the other sections are reached, and each field is real, anything, or absent."""
    doc: dict[Any, Any] = {}
    for name in draw(st.permutations(list(SECTIONS))):
        if draw(st.integers(0, 2)):
            doc[name] = draw(shaped(SECTIONS[name], anything=config_values))
    provider = doc.setdefault("provider", {})
    if isinstance(provider, dict) and draw(st.integers(0, 3)):
        provider.setdefault("client_id", "device-agent")
        provider.setdefault("issuer", "https://idp.example/application/o/dev/")
    if draw(st.booleans()):
        doc["sinks"] = draw(st.lists(shaped(SINK_FIELDS, anything=config_values), max_size=2))
    if draw(st.booleans()):
        doc["hooks"] = draw(st.lists(shaped(HOOK_FIELDS, anything=config_values), max_size=2))
    if draw(st.integers(0, 5)) == 0:
        doc[draw(st.one_of(integers, st.booleans(), st.none(), st.dates(), texts))] = \
            draw(config_values)
    return doc


def _materialize_keys(value: Any) -> Any:
    if isinstance(value, Big):
        return value.value()
    if isinstance(value, dict):
        return {_materialize_keys(k): _materialize_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_materialize_keys(v) for v in value]
    if isinstance(value, Raw):
        return float(value.text)
    return value


EXAMPLE_CONFIG = yaml.safe_load((REPO / "config.example.yaml").read_text(encoding="utf-8"))
EXAMPLE_CONFIG["sinks"] = [{"path": "token", "format": "env", "mode": 0o600, "owner": "root",
                            "group": 0, "on_logout": "empty", "env_prefix": "X_"}]
EXAMPLE_CONFIG["hooks"] = [{"command": ["/bin/true", "-x"], "events": ["signed_in"],
                            "timeout": "5s", "pass_token": False}]
config_leaves = st.one_of(config_values, config_paths, url_like, durations, accounts)


@FILES
@given(data=st.one_of(config_mappings(), near(EXAMPLE_CONFIG, anything=config_leaves),
                      config_values))
@example(data={"provider": {"client_id": "c", "issuer": "https://i/", "timeout": 10**400}})
@example(data={"sign_in": {"codes_per_hour": Big(5000)}})
@example(data={Big(5000): 1})
@example(data={"provider": {"client_id": "c", "issuer": "https://i/"},
               "storage": {"path": "~nosuchuser/x"}})
@example(data={"provider": {"client_id": "c", "issuer": "https://i/"},
               "api": {"socket": "/tmp/\ud800"}})
@example(data={"api": {"mode": Big(5000)}})
@example(data={"api": {"read_users": [Big(5000)]}})
@example(data={"refresh": {"margin_ratio": Big(5000)}})
@example(data={"display": {"options": {Big(5000): 1}}})
@example(data={"provider": {"client_id": "c", "issuer": "https://i/", "ca_file": "/tmp/\ud800"}})
@example(data={"provider": {"client_id": "c", "issuer": "https://i/",
                            "client_secret_file": "/tmp/\ud800"}})
def test_config_from_mapping(tmp_path: Path, data: Any) -> None:
    real = _materialize_keys(data)
    source = tmp_path / "config.yaml"
    result = typed("config_from_mapping", lambda: config_from_mapping(real, source=source),
                   data)
    assert isinstance(result, config_module.AgentConfig | Raised)


YAML_SCALARS = [
    "2001-02-30", "2001-13-01", "2001-12-14t21:59:43.10-99:99", "1" * 5000, "1" + "0" * 400,
    "-" + "9" * 4400, "0x" + "f" * 5000, "0o" + "7" * 5000, "0b" + "1" * 20000, "190:20:30",
    "1_000", ".nan", ".inf", "-.inf", "0o777", "0660", "~", "null", "yes", "on", "'~x'",
    '"\\ud800"', '"\\udfff/x"', '"~nosuchuser/x"', '"/tmp/\\ud800"', '"a\\0b"', '"\\x85"',
    "!!binary aGVsbG8=", "!!binary '!!!'", "!!int x", "!!float x", "!!timestamp x",
    "!!set {a, b}", "!!omap [a: 1]", "!!pairs [a: 1]", "!!python/name:os.system", "!foo x",
    "*nope", "&a [*a]", "&b {x: *b}", "[", "{", "? [a]", "[a]: b", "{[a]: b}", "{{a: 1}: b}",
    "!!str", '"\\U0010ffff"', '"\\U00110000"', "|-\n  x", "@x", "`x", "%x", "'unterminated",
]
yaml_scalars = st.sampled_from(YAML_SCALARS)


def to_flow_yaml(value: Any) -> str:
    """`value` as YAML flow text; strings double-quoted with JSON escapes."""
    if isinstance(value, YamlText):
        return value.text
    if isinstance(value, dict):
        return "{" + ", ".join(f"{to_flow_yaml(k)}: {to_flow_yaml(v)}"
                               for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(to_flow_yaml(v) for v in value) + "]"
    if isinstance(value, float) and math.isnan(value):
        return ".nan"
    if isinstance(value, float) and math.isinf(value):
        return ".inf" if value > 0 else "-.inf"
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, bytes | frozenset):
        return to_json(str(value))
    return to_json(value)


class YamlText:
    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"YamlText({show(self.text, 60)})"


@st.composite
def yaml_documents(draw: st.DrawFn) -> bytes:
    """A config in block style, sections in flow style, any value possibly a raw YAML
    scalar or tag; or nesting far beyond the recursion limit; or documents PyYAML
    refuses in every way it can."""
    kind = draw(st.integers(0, 5))
    if kind == 0:
        depth = draw(st.sampled_from([200_000, 5_000, 1_000]))
        form = draw(st.sampled_from(["[" * depth, "{a: " * depth, "- " * depth,
                                     "".join(" " * i + "a:\n" for i in range(1500)),
                                     "a: " + "&x [" * depth]))
        return form.encode()
    if kind == 1:
        return draw(st.one_of(st.binary(max_size=200), texts.map(encode)))
    if kind == 2:
        return draw(st.sampled_from([
            b"provider: {}\nprovider: {}\n", b"? [a, b]\n: c\n", b"<<: 1\n", b"--- 1\n--- 2\n",
            b"%YAML 9.9\n---\n", b"\xef\xbb\xbfprovider: {client_id: x}\n", b"\x85",
            b"provider:\n  client_id: x\n  client_id: y\n", b"a: !!python/object:os.system {}\n",
            b"provider: &p {client_id: x, issuer: 'https://i/'}\ndisplay: {options: *p}\n",
            b"- a\nb: c\n", b"\t- a\n", b"", b"~\n", b"[]\n", b"'x'\n", b"1\n",
            "provider: {client_id: \ud800}\n".encode("utf-8", "surrogatepass"),
            "\ufeff\ufeffa: 1\n".encode(), b"\xff\xfe" + "a: 1\n".encode("utf-16-le"),
        ]))

    def yamlify(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: yamlify(v) for k, v in value.items()}
        if isinstance(value, list):
            return [yamlify(v) for v in value]
        if draw(st.integers(0, 4)) == 0:
            return YamlText(draw(yaml_scalars))
        return value

    doc = yamlify(draw(st.one_of(config_mappings(),
                                 near(EXAMPLE_CONFIG, anything=config_leaves))))
    lines = []
    for key, value in doc.items():
        lines.append(f"{to_flow_yaml(key)}: {to_flow_yaml(value)}")
    return "\n".join(lines).encode("utf-8", "surrogatepass") + b"\n"


@settings(FILES, max_examples=50)
@given(data=yaml_documents())
@example(data=b"[" * 200_000)
@example(data=b"provider:\n  client_id: 2001-02-30\n")
@example(data=b"provider: {timeout: " + b"1" * 5000 + b"}\n")
@example(data=b"provider: {client_id: x, issuer: 'https://i/'}\napi: {socket: \"\\ud800\"}\n")
@example(data=b"provider: {client_id: x, issuer: 'https://i/', timeout: 1" + b"0" * 400 + b"}\n")
@example(data=b"provider: {client_id: x, issuer: 'https://i/'}\nstorage: {path: ~nosuchuser/x}\n")
@example(data=b"provider: {client_id: !!timestamp x}\n")
@example(data=b"provider: {client_id: !!int x}\n")
@example(data=b"provider: {client_id: 2001-12-14t21:59:43.10-99:99}\n")
@example(data=b'provider: {client_id: "\\U00110000"}\n')
def test_load_config(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(data)
    result = typed("load_config", lambda: load_config(path), data)
    assert isinstance(result, config_module.AgentConfig | Raised)
