"""`device-agent check-provider`: what is wrong with the provider's setup, and the fix.

Written for the person setting up authentik: each finding names the setting to change.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.config import AgentConfig
from agent.errors import AgentError
from agent.oauth import (
    CodeIssued,
    Endpoints,
    Rejected,
    ServerTrouble,
    Throttled,
    device_authorization_request,
    receive_device_authorization,
)
from agent.oauth.discovery import Discovery
from agent.service import driver_settings
from agent.transport import Transport

__all__ = ["Finding", "check_provider"]

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


@dataclass(frozen=True, kw_only=True)
class Finding:
    level: str  # "ok" | "warning" | "error"
    message: str
    fix: str | None = None

    def render(self) -> str:
        mark = {"ok": "ok  ", "warning": "warn", "error": "FAIL"}[self.level]
        text = f"[{mark}] {self.message}"
        if self.fix:
            text += f"\n       fix: {self.fix}"
        return text


async def _discover(config: AgentConfig, transport: Transport,
                    findings: list[Finding]) -> Endpoints | None:
    """The same sequence, and the same merge with the configured endpoints, as the
    daemon's (`agent.oauth.discovery.Discovery`)."""
    settings = driver_settings(config)
    discovery = Discovery(settings.issuer, settings.endpoints,
                          allow_insecure_http=settings.allow_insecure_http)
    step = discovery.first()
    while step.request is not None:
        request = step.request
        try:
            response = await transport.send(request)
        except AgentError as exc:
            findings.append(Finding(level="error", message=f"{request.url}: {exc}",
                                    fix="check the network, the host name and provider.ca_file"))
            return None
        step = discovery.receive(response)
        if step.endpoints is not None:
            findings.append(Finding(level="ok", message=f"discovery at {request.url}"))
    if step.endpoints is None:
        findings.append(Finding(level="error", message=str(step.error),
                                fix=step.error.fix if step.error else None))
        return None
    if settings.issuer is None:
        findings.append(Finding(level="ok", message="explicit endpoints; discovery skipped"))
    if step.alone:
        findings.extend(Finding(level="warning", message=note) for note in step.notes)
    return step.endpoints


def _check_metadata(config: AgentConfig, endpoints: Endpoints, findings: list[Finding]) -> None:
    findings.append(Finding(level="ok", message=(
        f"device endpoint {endpoints.device_authorization}, token endpoint {endpoints.token}")))
    grants = endpoints.grant_types_supported
    if grants is not None:
        for grant, name in ((DEVICE_GRANT, "Device Code"), ("refresh_token", "Refresh Token")):
            if grant not in grants:
                findings.append(Finding(
                    level="error" if grant == DEVICE_GRANT else "warning",
                    message=f"the provider does not list the {grant} grant",
                    fix=f"enable the {name} grant type on the OAuth2 provider"))
    scopes = endpoints.scopes_supported
    if "offline_access" in config.provider.scopes and scopes is not None and (
            "offline_access" not in scopes):
        findings.append(Finding(
            level="warning", message="offline_access is not among the supported scopes: no "
            "refresh token will be issued, and the device must be signed in again every hour",
            fix="add the offline_access scope mapping to the provider (authentik: Provider > "
            "Advanced protocol settings > Scopes)"))
    if "offline_access" not in config.provider.scopes:
        findings.append(Finding(
            level="warning", message="provider.scopes lacks offline_access: no refresh token",
            fix="add offline_access to provider.scopes"))
    if endpoints.revocation is None:
        findings.append(Finding(level="warning", message="no revocation endpoint: sign-out "
                                "cannot revoke tokens at the provider"))


async def _try_device_request(config: AgentConfig, endpoints: Endpoints, transport: Transport,
                              findings: list[Finding]) -> None:
    settings = driver_settings(config)
    try:
        response = await transport.send(device_authorization_request(
            settings.client, endpoints.device_authorization, settings.scopes))
    except AgentError as exc:
        findings.append(Finding(level="error", message=f"device authorization: {exc}"))
        return
    event = receive_device_authorization(response, now=0.0)
    match event:
        case CodeIssued(authorization=auth):
            findings.append(Finding(level="ok", message=(
                f"device authorization works: {len(auth.user_code)}-character codes, "
                f"valid {auth.expires_in:.0f} s, polling every {auth.interval:.0f} s")))
            if auth.expires_in < 120:
                findings.append(Finding(
                    level="warning",
                    message=f"codes expire after {auth.expires_in:.0f} s: too short to read "
                    "the screen, unlock a phone and approve",
                    fix="raise the provider's Access code validity to 10 minutes "
                    "(authentik: minutes=10)"))
            if auth.verification_uri_complete is None:
                findings.append(Finding(
                    level="warning", message="no verification_uri_complete: the QR code will "
                    "open the entry page, and the code must be typed"))
        case Throttled():
            findings.append(Finding(
                level="warning", message="the device endpoint is rationing requests (HTTP 429)",
                fix="wait an hour; authentik allows 20 device requests an hour per address"))
        case Rejected(error=error):
            fix = None
            if error.code == "invalid_client":
                fix = ("check provider.client_id, and that an application is bound to the "
                       "provider")
            elif error.code == "invalid_scope":
                fix = "remove scopes the provider does not offer from provider.scopes"
            findings.append(Finding(level="error", message=f"device authorization refused: "
                                    f"{error}", fix=fix))
        case ServerTrouble(reason=reason):
            findings.append(Finding(level="error", message=f"device authorization: {reason}"))


async def check_provider(config: AgentConfig, *, request_code: bool = True) -> list[Finding]:
    findings: list[Finding] = []
    async with Transport(timeout=config.provider.timeout,
                         max_response_bytes=config.provider.max_response_bytes,
                         ca_file=config.provider.ca_file) as transport:
        endpoints = await _discover(config, transport, findings)
        if endpoints is None:
            return findings
        _check_metadata(config, endpoints, findings)
        if request_code:
            findings.append(Finding(level="ok", message=(
                "requesting one device code (this spends one of authentik's ~20 device "
                "requests an hour)")))
            await _try_device_request(config, endpoints, transport, findings)
        if endpoints.issuer and "/application/o/" in endpoints.issuer:
            findings.append(Finding(level="ok", message=(
                "authentik: the person approving needs the brand's Device code flow set "
                "(System > Brands); without it the verification page answers 404")))
    return findings
