"""``POST /v1/tokens`` bounds its request body before the key is checked: a body over
4096 bytes is refused with 413 without being held in memory (any bearer gets that far)."""

from __future__ import annotations

import asyncio
import json

from tests.conftest import TEST_KEYS, GatewayProcess

LIMIT = 4096


async def _status(reader: asyncio.StreamReader) -> tuple[int, dict[str, object]]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status = int(head.split(b" ", 2)[1])
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    body = await asyncio.wait_for(reader.readexactly(length), 5)
    return status, json.loads(body)


async def _post(port: int, headers: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"POST /v1/tokens HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer whatever\r\n{headers}\r\n".encode()
    )
    await writer.drain()
    return reader, writer


class TestTokenBody:
    async def test_a_declared_length_over_the_limit_is_refused_before_the_body(
        self, store_gateway: GatewayProcess
    ) -> None:
        # 400 MB announced, none sent: the answer comes at once, not after the body.
        reader, writer = await _post(store_gateway.port, "Content-Length: 400000000\r\n")
        try:
            status, body = await _status(reader)
        finally:
            writer.close()
        assert status == 413
        assert body["error"]["code"] == "invalid_value"  # type: ignore[index]

    async def test_a_chunked_body_is_refused_once_it_passes_the_limit(
        self, store_gateway: GatewayProcess
    ) -> None:
        # A chunked body with no end: read as it comes, refused as soon as it is over
        # the limit (it used to be read whole first, however large).
        reader, writer = await _post(store_gateway.port, "Transfer-Encoding: chunked\r\n")
        try:
            chunk = b"x" * 1024
            for _ in range(LIMIT // len(chunk) + 2):
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await writer.drain()
            status, _ = await _status(reader)
        finally:
            writer.close()
        assert status == 413

    async def test_a_small_chunked_body_still_works(self, store_gateway: GatewayProcess) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", store_gateway.port)
        body = json.dumps({"ttl_s": 30}).encode()
        writer.write(
            b"POST /v1/tokens HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
            + f"Authorization: Bearer {TEST_KEYS[0]}\r\n\r\n".encode()
            + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        )
        try:
            status, answer = await _status(reader)
        finally:
            writer.close()
        assert status == 200, answer
        assert answer["ttl_s"] == 30
