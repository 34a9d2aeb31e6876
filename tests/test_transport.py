"""The HTTP adapter over real loopback sockets: limits, TLS, and error translation."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
from aiohttp import web

from agent.errors import ConnectFailed, RequestTimeout, ResponseTooLarge, TLSFailed
from agent.oauth import HttpRequest
from agent.transport import Transport


def _self_signed(tmp_path: Path, *, valid_from: datetime.timedelta = datetime.timedelta(
        minutes=-5)) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + valid_from)
        .not_valid_after(now + valid_from + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def _app() -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        form = parse_qs((await request.read()).decode())
        return web.json_response({"form": form,
                                  "content_type": request.headers.get("Content-Type")})

    async def big(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()  # chunked: no Content-Length to trust
        await response.prepare(request)
        for _ in range(64):
            await response.write(b"x" * 1024)
        await response.write_eof()
        return response

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(2)
        return web.Response(text="late")

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound("/echo")

    app = web.Application()
    app.router.add_post("/echo", echo)
    app.router.add_get("/echo", echo)
    app.router.add_get("/big", big)
    app.router.add_get("/slow", slow)
    app.router.add_post("/redirect", redirect)
    return app


async def _serve(ssl_context: ssl.SSLContext | None = None) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(_app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    scheme = "https" if ssl_context else "http"
    return runner, f"{scheme}://127.0.0.1:{port}"


@pytest.fixture
async def server() -> AsyncIterator[str]:
    runner, url = await _serve()
    yield url
    await runner.cleanup()


async def test_form_encoding_survives_punctuation(server: str) -> None:
    code = "a+b&c=d%e#f?g/h\\i\"j'k ~"
    async with Transport() as transport:
        response = await transport.send(HttpRequest(method="POST", url=f"{server}/echo",
                                                    form={"device_code": code}))
    body = response.body.decode()
    assert response.status == 200
    import json

    parsed = json.loads(body)
    assert parsed["form"]["device_code"] == [code]
    assert parsed["content_type"] == "application/x-www-form-urlencoded"


async def test_answer_size_is_capped(server: str) -> None:
    async with Transport(max_response_bytes=10_000) as transport:
        with pytest.raises(ResponseTooLarge):
            await transport.send(HttpRequest(method="GET", url=f"{server}/big"))
    async with Transport(max_response_bytes=100_000) as transport:
        response = await transport.send(HttpRequest(method="GET", url=f"{server}/big"))
        assert len(response.body) == 65_536


async def test_timeout(server: str) -> None:
    async with Transport(timeout=0.2) as transport:
        with pytest.raises(RequestTimeout):
            await transport.send(HttpRequest(method="GET", url=f"{server}/slow"))


async def test_connection_refused() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with Transport() as transport:
        with pytest.raises(ConnectFailed, match=r"127\.0\.0\.1"):
            await transport.send(HttpRequest(method="GET", url=f"http://127.0.0.1:{port}/"))


async def test_post_is_not_redirected(server: str) -> None:
    async with Transport() as transport:
        response = await transport.send(HttpRequest(method="POST", url=f"{server}/redirect",
                                                    form={"secret": "x"}))
    assert response.status == 302


async def test_tls_verified_with_system_trust_and_the_configured_ca(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    runner, url = await _serve(context)
    try:
        async with Transport() as transport:
            with pytest.raises(TLSFailed, match=r"127\.0\.0\.1"):
                await transport.send(HttpRequest(method="GET", url=f"{url}/echo"))
        async with Transport(ca_file=cert) as transport:
            response = await transport.send(HttpRequest(method="GET", url=f"{url}/echo"))
            assert response.status == 200
    finally:
        await runner.cleanup()


async def test_without_a_ca_file_the_trust_store_loaded_at_import_serves(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # aiohttp loads the system trust store when it is imported; a second copy costs the
    # daemon 0.7 MiB and a first request 25-50 ms (ten times that on a Pi Zero).
    cert, key = _self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    runner, url = await _serve(context)
    loaded: list[object] = []
    create = ssl.create_default_context

    def counted(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        loaded.append(args)
        return create(*args, **kwargs)

    monkeypatch.setattr(ssl, "create_default_context", counted)
    try:
        async with Transport() as transport:
            # Still verified: the system store does not hold this certificate's issuer.
            with pytest.raises(TLSFailed, match=r"not trusted"):
                await transport.send(HttpRequest(method="GET", url=f"{url}/echo"))
        assert loaded == []
        async with Transport(ca_file=cert) as transport:
            response = await transport.send(HttpRequest(method="GET", url=f"{url}/echo"))
            assert response.status == 200
        assert len(loaded) == 1  # the store with the operator's CA in it
    finally:
        await runner.cleanup()


async def test_an_untrusted_certificate_names_provider_ca_file(tmp_path: Path) -> None:
    # The fault matrix's TLS cases: the one TLS failure a person mends in the config.
    cert, key = _self_signed(tmp_path)
    (tmp_path / "other").mkdir()
    other, _ = _self_signed(tmp_path / "other")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    runner, url = await _serve(context)
    try:
        async with Transport() as transport:
            with pytest.raises(TLSFailed, match=r"not trusted .*needs its CA certificate in "
                                                r"provider\.ca_file"):
                await transport.send(HttpRequest(method="GET", url=f"{url}/echo"))
        async with Transport(ca_file=other) as transport:
            with pytest.raises(TLSFailed) as raised:
                await transport.send(HttpRequest(method="GET", url=f"{url}/echo"))
            assert f"provider.ca_file ({other}) does not hold the CA" in str(raised.value)
    finally:
        await runner.cleanup()


async def test_refused_and_unresolvable_say_so_in_few_words() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        port = sock.getsockname()[1]
        async with Transport() as transport:
            with pytest.raises(ConnectFailed) as refused:
                await transport.send(HttpRequest(method="GET", url=f"http://127.0.0.1:{port}/"))
            with pytest.raises(ConnectFailed) as unresolved:
                await transport.send(HttpRequest(method="GET", url=f"http://idp.invalid:{port}/"))
    assert str(refused.value) == f"127.0.0.1:{port} refused the connection"
    assert str(unresolved.value).startswith("cannot resolve the host name idp.invalid (")


async def test_a_certificate_from_the_future_says_the_clock_is_not_set(tmp_path: Path) -> None:
    # Issue 9 item 16: a Pi without a real-time clock before NTP has synced.
    cert, key = _self_signed(tmp_path, valid_from=datetime.timedelta(days=3))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    runner, url = await _serve(context)
    try:
        async with Transport(ca_file=cert) as transport:
            with pytest.raises(TLSFailed, match="clock is not set"):
                await transport.send(HttpRequest(method="GET", url=f"{url}/echo"))
    finally:
        await runner.cleanup()


async def test_the_proxy_from_the_environment_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    # Issue 9 item 16: HTTP(S)_PROXY is honoured, as by curl.
    seen: list[str] = []

    async def forward(request: web.Request) -> web.Response:
        seen.append(str(request.url))
        return web.json_response({"via": "proxy"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    try:
        async with Transport() as transport:
            response = await transport.send(
                HttpRequest(method="GET", url="http://idp.invalid/.well-known/x"))
        assert response.status == 200
        assert seen and seen[0].endswith("/.well-known/x")
    finally:
        await runner.cleanup()


def test_a_web_page_where_json_was_expected_suggests_a_captive_portal() -> None:
    from agent.oauth import HttpResponse, ServerTrouble, receive_device_authorization

    page = HttpResponse(status=200, body=b"<!doctype html><title>Hotel Wi-Fi</title>",
                        headers={"Content-Type": "text/html"})
    event = receive_device_authorization(page, now=0.0)
    assert isinstance(event, ServerTrouble) and "captive portal" in event.reason
