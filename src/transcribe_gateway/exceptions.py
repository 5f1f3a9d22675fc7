"""Every exception the gateway raises on purpose.

::

    TranscribeGatewayError
     ├── ConfigError                  bad server configuration (startup)
     ├── ProtocolError                a client broke the wire protocol
     │    └── PayloadTooBig           a frame far over the size limit (close 1008)
     └── ProviderError                a speech engine failed
          ├── ProviderUnavailable     not configured, unknown model, at capacity
          │    └── ProviderAtCapacity the embedded engine is full (a limit, not a failure)
          ├── ProviderConnectionError could not reach the engine
          └── ProviderTimeout         the engine stopped answering

Recoverable problems with one message (bad base64, bad config) are not
exceptions: the sans-I/O session turns them straight into ``error`` events.
"""

from __future__ import annotations


class TranscribeGatewayError(Exception):
    """Base class of the gateway's own exceptions."""


class ConfigError(TranscribeGatewayError):
    """The server's configuration is invalid; the message names the setting."""


class ProtocolError(TranscribeGatewayError):
    """A client violated the protocol badly enough to close the connection."""

    close_code = 1008


class PayloadTooBig(ProtocolError):
    """A frame far over the message size limit."""


class ProviderError(TranscribeGatewayError):
    """A speech engine failed.

    Args:
        provider: the provider name, e.g. ``LOCAL`` or ``DEEPGRAM``.
        message: what went wrong, safe to show to the client.
        retryable: whether trying again (or another provider) may help.
    """

    code = "provider_error"

    def __init__(self, provider: str, message: str, *, retryable: bool = True) -> None:
        super().__init__(f"{provider}: {message}")
        self.provider = provider
        self.reason = message
        self.retryable = retryable


class ProviderUnavailable(ProviderError):
    """The engine cannot serve this session now (not configured, at capacity, no model)."""

    code = "provider_unavailable"


class ProviderAtCapacity(ProviderUnavailable):
    """The embedded engine has all the sessions it can serve in real time.

    Counted as a refusal by a limit (``transcribe_refusals_total``), not as an
    engine failure: an alert on failures must not fire on load.
    """


class ProviderConnectionError(ProviderError):
    """The engine could not be reached."""


class ProviderTimeout(ProviderError):
    """The engine did not answer within its timeout."""
