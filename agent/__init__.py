"""device-agent: signs a limited-input device in with the OAuth 2.0 Device
Authorization Grant (RFC 8628) and keeps a valid token for local services."""

__all__ = ["__version__"]

__version__ = "0.1.0"
