"""Plain HTTP endpoints beside the WebSocket: readiness, metrics, usage.

* ``GET /readyz``: 200 when the engines are loaded and the store answers, else 503;
* ``GET /metrics``: Prometheus text format;
* ``GET /v1/usage?period=day|month``: the calling key's usage (``Authorization:
  Bearer <key>``), per period, newest first;
* ``POST /v1/tokens``: a short-lived, single-use session token for a browser
  (``Authorization: Bearer <key>``, optional JSON ``{"ttl_s": N}``); both answer
  503 ``unavailable`` when the key store fails or does not answer;
* ``GET /v1/providers``: the providers and models this server offers (public);
* ``POST /demo/token``: a token minted with the server's first key, for the demo
  page; development profile only, loopback clients only.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from transcribe_gateway.providers.registry import CATALOG
from transcribe_gateway.server import metrics
from transcribe_gateway.server.auth import bearer_token, fingerprint
from transcribe_gateway.server.limits import Refusal
from transcribe_gateway.server.origins import is_local_origin, is_loopback_host
from transcribe_gateway.server.tokens import looks_like_token
from transcribe_gateway.store.keys import SCOPE_USAGE

if TYPE_CHECKING:
    from transcribe_gateway.server.app import Gateway

log = logging.getLogger(__name__)

_PING_TIMEOUT_S = 2.0


async def readyz(gateway: Gateway, request: Request) -> JSONResponse:
    engines = gateway.registry.is_ready()
    try:
        async with asyncio.timeout(_PING_TIMEOUT_S):
            store = await gateway.store.ping()
    except TimeoutError:
        store = False
    ready = engines and store and not gateway.draining
    return JSONResponse(
        {
            "ready": ready,
            "engines": engines,
            "store": store,
            "draining": gateway.draining,
        },
        status_code=200 if ready else 503,
    )


async def metrics_text(gateway: Gateway, request: Request) -> Response:
    return Response(metrics.render(), media_type=metrics.CONTENT_TYPE)


def _error(status: int, code: str, message: str) -> JSONResponse:
    # Like the answers they stand for (tokens, usage): never cached.
    return JSONResponse(
        {"error": {"code": code, "message": message}},
        status_code=status,
        headers={"Cache-Control": "no-store"},
    )


def _store_failed() -> JSONResponse:
    """503 ``unavailable``, from an ``except`` block: the store failed or did not answer."""
    # Any exception: Redis's own errors do not subclass the builtin TimeoutError.
    log.warning("key store call failed", exc_info=True)
    return _error(503, "unavailable", "the key store did not answer; retry later")


async def usage(gateway: Gateway, request: Request) -> JSONResponse:
    token = bearer_token(request.headers.get("authorization"))
    if token is None:
        return _error(401, "unauthorized", "send Authorization: Bearer <key>")
    period = request.query_params.get("period", "month")
    if period not in ("day", "month"):
        return _error(400, "invalid_value", "period must be day or month")
    if gateway.admission.static.verify(token):
        key_id, name = f"static-{fingerprint(token)}", f"static:{fingerprint(token)}"
    else:
        try:
            async with asyncio.timeout(_PING_TIMEOUT_S * 2):
                record = await gateway.store.find_key(token)
        except Exception:
            return _store_failed()
        if record is None or record.status() != "active":
            return _error(401, "unauthorized", "unknown, revoked or expired key")
        if SCOPE_USAGE not in record.scopes:
            return _error(403, "forbidden", "this key lacks the 'usage' scope")
        key_id, name = record.id, record.name
    try:
        async with asyncio.timeout(_PING_TIMEOUT_S * 2):
            rows = await gateway.store.usage_report(key_id, period)  # type: ignore[arg-type]
    except Exception:
        return _store_failed()
    return JSONResponse(
        {"key": name, "period": period, "usage": [row.to_dict() for row in rows]},
        headers={"Cache-Control": "no-store"},
    )


_MAX_TOKEN_BODY = 4096
_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


def _token_response(gateway: Gateway, key_id: str, ttl_s: int) -> JSONResponse:
    token, expires_at = gateway.tokens.issue(key_id, ttl_s)
    return JSONResponse(
        {"token": token, "expires_at": int(expires_at), "ttl_s": ttl_s},
        headers={"Cache-Control": "no-store"},
    )


async def _bounded_body(request: Request, limit: int) -> bytes | None:
    """The request body, or ``None`` as soon as it is known to be over ``limit`` bytes.

    Never holds more than ``limit`` (plus one chunk): a declared length over it is
    refused before anything is read, and a chunked body is read as it comes.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                return None
        except ValueError:
            pass  # the server's HTTP parser refuses a malformed length itself
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


async def _requested_ttl(request: Request) -> int | JSONResponse | None:
    """The ``ttl_s`` of an optional JSON body; a :class:`JSONResponse` when it is bad."""
    body = await _bounded_body(request, _MAX_TOKEN_BODY)
    if body is None:
        return _error(413, "invalid_value", "the request body is too large")
    if not body.strip():
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return _error(400, "invalid_value", 'the body must be JSON, e.g. {"ttl_s": 60}')
    if not isinstance(data, dict) or set(data) - {"ttl_s"}:
        return _error(400, "invalid_value", 'the body takes one optional field, "ttl_s"')
    ttl = data.get("ttl_s")
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < 1):
        return _error(400, "invalid_value", "ttl_s must be a positive integer (seconds)")
    return ttl


async def create_token(gateway: Gateway, request: Request) -> JSONResponse:
    """``POST /v1/tokens``: mint a session token for the calling key."""
    key = bearer_token(request.headers.get("authorization"))
    if key is None or looks_like_token(key):  # a token never mints another
        return _error(401, "unauthorized", "send Authorization: Bearer <API key>")
    ttl = await _requested_ttl(request)
    if isinstance(ttl, JSONResponse):
        return ttl
    try:
        async with asyncio.timeout(_PING_TIMEOUT_S * 2):
            grant = await gateway.admission.identify(key)
    except Exception:
        return _store_failed()
    if isinstance(grant, Refusal):
        if grant.code == "forbidden":
            return _error(403, "forbidden", grant.message)
        return _error(401, "unauthorized", "unknown, revoked or expired key")
    return _token_response(gateway, grant.key_id, gateway.tokens.ttl_for(ttl))


async def demo_token(gateway: Gateway, request: Request) -> JSONResponse:
    """``POST /demo/token``: a token for the demo page, minted with the server's own key.

    Local development only: the route exists only in the development profile and
    answers loopback clients only, so the page never embeds a key.
    """
    client = request.client.host if request.client else ""
    keys = gateway.settings.keys()
    if client not in _LOOPBACK:
        return _error(403, "forbidden", "the demo token helper answers local clients only")
    # A page elsewhere reaches a loopback server through a name rebound to
    # 127.0.0.1: its Host (and Origin) is that name, never a loopback one.
    host, origin = request.headers.get("host", ""), request.headers.get("origin")
    if not is_loopback_host(host) or (origin is not None and not is_local_origin(origin, host)):
        return _error(403, "forbidden", "the demo token helper answers pages on this machine only")
    if not keys:
        return _error(503, "unavailable", "no API key is configured")
    key_id = f"static-{fingerprint(keys[0])}"
    return _token_response(gateway, key_id, gateway.tokens.ttl_for(None))


async def providers(gateway: Gateway, request: Request) -> JSONResponse:
    """``GET /v1/providers``: what each provider offers here, and what serves it if not."""
    registry, settings = gateway.registry, gateway.settings
    substitutes = settings.profile == "development" and not settings.strict_providers
    default_model = settings.local.default_model
    listed = []
    for name in registry.known_providers():
        faulty = False
        if name in registry.engines:
            # Guarded: a plugin that raises is listed as unavailable, not a 500 for all.
            offer = registry.offer(name)
            reason, faulty = offer.reason, offer.faulty
            models = [
                {
                    "name": info.name,
                    "description": info.description,
                    "languages": list(info.languages) if info.languages is not None else None,
                }
                for info in offer.models
            ]
        else:
            reason = registry.missing_reason(name)
            models = [
                {"name": model, "description": "", "languages": None} for model in CATALOG[name]
            ]
        # A faulty engine's sessions are refused, not substituted (registry.resolve).
        substitute = reason is not None and substitutes and not faulty
        listed.append(
            {
                "name": name,
                "available": reason is None,
                "reason": reason,
                "substitute": f"LOCAL/{default_model}" if substitute else None,
                "models": models,
            }
        )
    return JSONResponse(
        {
            "profile": settings.profile,
            "default": {"provider": "LOCAL", "model": default_model},
            "providers": listed,
        }
    )
