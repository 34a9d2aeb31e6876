"""HTTP to the provider: the one module that imports the aiohttp client.

Everything aiohttp, ssl or the OS can raise while talking to the provider leaves this
module as an `agent.errors.TransportError`. Answers are capped in size, so a broken or
hostile endpoint cannot fill a small device's memory.
"""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path
from types import TracebackType
from urllib.parse import urlencode, urlsplit

import aiohttp

from agent import __version__
from agent.errors import (
    ConnectFailed,
    NameNotResolved,
    RequestTimeout,
    ResponseTooLarge,
    TLSFailed,
    TransportError,
)
from agent.oauth.models import HttpRequest, HttpResponse

__all__ = ["Transport"]

_CHUNK = 16_384
# Earlier than any build of this agent: a wall clock before it has not been set.
PLAUSIBLE_TIME = 1_767_225_600  # 2026-01-01T00:00:00Z


class Transport:
    def __init__(self, *, timeout: float = 15.0, max_response_bytes: int = 1_048_576,
                 ca_file: Path | None = None) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout, connect=min(timeout, 10.0))
        self._max_bytes = max_response_bytes
        self._ca_file = ca_file
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def _ssl_context(self) -> ssl.SSLContext | bool:
        # True: aiohttp's verified context, which loaded the system trust store when
        # aiohttp was imported; another copy would cost 0.7 MiB and the first request
        # 25-50 ms. With the operator's CA for a private authentik, a store of our own.
        if self._ca_file is None:
            return True
        context = ssl.create_default_context()
        context.load_verify_locations(cafile=str(self._ca_file))
        return context

    def _session_now(self) -> aiohttp.ClientSession:
        if self._closed:
            # A request after close() would open a session nobody closes again.
            raise TransportError("the HTTP client is closed (the agent is stopping)")
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout,
                connector=aiohttp.TCPConnector(ssl=self._ssl_context(), limit=4),
                headers={"User-Agent": f"device-agent/{__version__}"},
                # A provider has no business setting cookies on a device client.
                cookie_jar=aiohttp.DummyCookieJar(),
                # HTTPS_PROXY / HTTP_PROXY / NO_PROXY from the environment (systemd's
                # Environment= or a drop-in), as curl and every other client read them.
                trust_env=True,
            )
        return self._session

    async def send(self, request: HttpRequest) -> HttpResponse:
        try:
            session = self._session_now()
        except (ssl.SSLError, OSError) as exc:
            raise TLSFailed(f"cannot load the CA file {self._ca_file}: {_reason(exc)}") from None
        headers = dict(request.headers)
        data: bytes | None = None
        if request.method == "POST":
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            data = urlencode(dict(request.form)).encode()
        try:
            async with session.request(
                request.method, request.url, data=data, headers=headers,
                # A POST carrying a code or secret must not be replayed elsewhere.
                allow_redirects=request.method == "GET",
            ) as response:
                body = await self._read_capped(response)
                return HttpResponse(status=response.status, body=body,
                                    headers=dict(response.headers))
        except (aiohttp.ClientSSLError, ssl.SSLError) as exc:
            reason = _reason(exc)
            if "not yet valid" in reason or time.time() < PLAUSIBLE_TIME:
                # A Pi has no real-time clock: before NTP syncs, every certificate
                # looks like it is from the future.
                raise TLSFailed(f"TLS with {_host(request.url)} failed: the clock is not "
                                f"set yet (waiting for time sync): {reason}") from None
            untrusted = _untrusted(exc)
            if untrusted is not None:
                # The one failure a person fixes in the config: say where.
                raise TLSFailed(f"TLS with {_host(request.url)} failed: the certificate is "
                                f"not trusted ({untrusted}); {self._trust_fix()}") from None
            raise TLSFailed(f"TLS with {_host(request.url)} failed: {reason}") from None
        except TimeoutError:
            raise RequestTimeout(f"{_host(request.url)} did not answer in time") from None
        except (aiohttp.ClientError, OSError) as exc:
            if isinstance(getattr(exc, "os_error", None), socket.gaierror):
                raise NameNotResolved(_connect_reason(request.url, exc)) from None
            raise ConnectFailed(_connect_reason(request.url, exc)) from None

    def _trust_fix(self) -> str:
        if self._ca_file is None:
            return ("a provider with a private or self-signed certificate needs its CA "
                    "certificate in provider.ca_file")
        return (f"provider.ca_file ({self._ca_file}) does not hold the CA that signed the "
                "provider's certificate")

    async def _read_capped(self, response: aiohttp.ClientResponse) -> bytes:
        if response.content_length is not None and response.content_length > self._max_bytes:
            raise ResponseTooLarge(
                f"{_host(str(response.url))} answered {response.content_length} bytes, "
                f"more than the {self._max_bytes} allowed")
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_chunked(_CHUNK):
            size += len(chunk)
            if size > self._max_bytes:
                raise ResponseTooLarge(
                    f"{_host(str(response.url))} answered more than {self._max_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> Transport:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()


def _host(url: str) -> str:
    return urlsplit(url).netloc or url


# OpenSSL's X509_V_ERR_* codes that mean "no trusted CA vouches for this chain":
# unable to get the issuer's certificate (2, 20), self-signed (18, 19), unable to verify
# the leaf's signature (21). Expiry, a wrong host name and the like are not mended by a
# CA file.
_UNTRUSTED_CHAIN = frozenset({2, 18, 19, 20, 21})


def _untrusted(exc: BaseException) -> str | None:
    """OpenSSL's words when no trusted CA vouches for the certificate, else None."""
    error = getattr(exc, "certificate_error", exc)
    if isinstance(error, ssl.SSLCertVerificationError) and (
            error.verify_code in _UNTRUSTED_CHAIN):
        return str(error.verify_message)
    return None


def _connect_reason(url: str, exc: BaseException) -> str:
    """What went wrong on the way, in words a person acts on: the OS's few words for
    the common cases, aiohttp's full message for the rest."""
    os_error = getattr(exc, "os_error", None)
    if isinstance(os_error, socket.gaierror):
        host = urlsplit(url).hostname or _host(url)
        return f"cannot resolve the host name {host} ({os_error.strerror or os_error})"
    if isinstance(os_error, ConnectionRefusedError):
        return f"{_host(url)} refused the connection"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return f"{_host(url)} closed the connection without answering"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return f"{_host(url)} closed the connection partway through its answer"
    return f"{_host(url)}: {_reason(exc)}"


def _reason(exc: BaseException) -> str:
    # aiohttp messages name the host and the OS error, never the request body.
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
