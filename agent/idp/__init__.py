"""The built-in test identity provider: authentik's device flow on the wire.

Used by the tests over real loopback HTTP and by `device-agent demo`, where a person
approves the code on the page at `/device`. aiohttp.web is imported here, so the agent
itself imports this package only for the demo.
"""

from agent.idp.provider import (
    ENDPOINTS,
    Action,
    Answer,
    Cut,
    Delay,
    Drop,
    ExpiryMode,
    Fail,
    IdentityProvider,
    ProviderSettings,
    RecordedRequest,
    Slow,
    serve_provider,
)

__all__ = [
    "ENDPOINTS",
    "Action",
    "Answer",
    "Cut",
    "Delay",
    "Drop",
    "ExpiryMode",
    "Fail",
    "IdentityProvider",
    "ProviderSettings",
    "RecordedRequest",
    "Slow",
    "serve_provider",
]
