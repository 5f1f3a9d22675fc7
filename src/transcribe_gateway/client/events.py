"""Server frames as the client SDK sees them: known messages or :class:`UnknownEvent`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import msgspec

from transcribe_gateway.protocol.messages import ServerMessage, parse_server_message

__all__ = ["Event", "UnknownEvent", "event_to_dict"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class UnknownEvent:
    """A server frame this SDK cannot decode into a known message.

    Attributes:
        type: the frame's ``type`` field.
        payload: the whole decoded JSON object, ``type`` included.
    """

    type: str
    payload: dict[str, Any]


Event = ServerMessage | UnknownEvent
"""What :meth:`TranscribeClient.events` yields."""


def event_to_dict(event: Event) -> dict[str, Any]:
    """Turn an event back into its JSON object (``type`` included).

    Args:
        event: a message yielded by :meth:`TranscribeClient.events`.

    Returns:
        A JSON-serializable dict.
    """
    if isinstance(event, UnknownEvent):
        return dict(event.payload)
    result: dict[str, Any] = msgspec.to_builtins(event)
    return result


def _decode_frame(frame: str | bytes) -> Event | None:
    try:
        return parse_server_message(frame)
    except msgspec.ValidationError as exc:
        try:
            raw: Any = msgspec.json.decode(frame)
        except msgspec.DecodeError:  # pragma: no cover - the first decode parsed it
            raw = None
        if isinstance(raw, dict) and isinstance(raw.get("type"), str):
            logger.debug("unknown or invalid server message %r: %s", raw["type"], exc)
            return UnknownEvent(type=raw["type"], payload=raw)
        logger.warning("skipping a server frame without a string 'type': %s", exc)
        return None
    except msgspec.DecodeError:
        logger.warning("skipping a server frame that is not JSON")
        return None
