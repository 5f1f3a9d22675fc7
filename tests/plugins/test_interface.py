"""What base.py promises plugin authors about a stream, with the plugins of
``tests/plugins/broken.py``: the input side's failures are the stream's, and a
stream its ``open_stream`` forgot to start still runs."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tests.plugins.broken import HALF_SECOND, EchoStream, InputRaises
from transcribe_gateway.config import Settings
from transcribe_gateway.exceptions import ProviderError
from transcribe_gateway.providers.base import RecognizeStream, SpeechEvent, StreamOptions

CHUNK = np.zeros(320, np.int16)  # 20 ms


async def open_stream(model: str) -> RecognizeStream:
    return await InputRaises(Settings()).open_stream(StreamOptions(model=model))


async def events(stream: RecognizeStream) -> list[SpeechEvent]:
    async def collect() -> list[SpeechEvent]:
        return [event async for event in stream]

    return await asyncio.wait_for(collect(), 5)


async def push(stream: RecognizeStream, chunks: int) -> None:
    """``chunks`` of audio, the gateway's way: the fast path first, else the awaited one."""
    for _ in range(chunks):
        if not stream.push_audio_nowait(CHUNK):
            await asyncio.wait_for(stream.push_audio(CHUNK), 5)


@pytest.mark.parametrize("model", ["raise-on-audio", "raise-on-take"])
async def test_an_exception_taking_audio_fails_the_stream(model: str) -> None:
    # It came out of push_audio as the plugin's ValueError (the session closed
    # 1011, no provider_error, no fallback) and the stream's task went on.
    stream = await open_stream(model)
    with pytest.raises(RuntimeError, match="ended"):
        await push(stream, 2 * HALF_SECOND // len(CHUNK))
    with pytest.raises(ProviderError) as failed:
        await events(stream)
    assert failed.value.provider == "INPUTBAD"
    assert "internal engine error" in failed.value.reason
    assert "bug in the plugin's input side" in failed.value.reason
    assert isinstance(failed.value.__cause__, ValueError)
    with pytest.raises(RuntimeError):  # nothing more goes in
        await stream.push_audio(CHUNK)
    await stream.aclose()


async def test_a_failure_before_the_stream_first_ran_is_reported() -> None:
    # A burst of fast-path chunks: the stream's task has not run once yet.
    stream = await open_stream("raise-on-take")
    assert isinstance(stream, EchoStream)
    stream._samples = HALF_SECOND  # the next chunk raises
    with pytest.raises(RuntimeError, match="ended"):
        stream.push_audio_nowait(CHUNK)
    with pytest.raises(ProviderError, match="input side"):
        await events(stream)
    await stream.aclose()


async def test_an_exception_ending_the_input_fails_the_stream() -> None:
    stream = await open_stream("raise-on-end")
    await push(stream, HALF_SECOND // len(CHUNK))
    await asyncio.wait_for(stream.end_input(), 5)  # the error comes out of iteration
    with pytest.raises(ProviderError) as failed:
        await events(stream)
    assert "bug in the plugin's end of input" in failed.value.reason
    await stream.aclose()


async def test_the_events_before_the_failure_are_delivered() -> None:
    stream = await open_stream("raise-on-audio")
    got: list[SpeechEvent] = []

    async def consume() -> None:
        async for event in stream:
            got.append(event)

    consumer = asyncio.create_task(consume())
    with pytest.raises(RuntimeError):
        await push(stream, 3 * HALF_SECOND // len(CHUNK))
    with pytest.raises(ProviderError):
        await asyncio.wait_for(consumer, 5)
    assert [e.text for e in got if e.text] == ["chunk 0"]
    await stream.aclose()


async def test_a_stream_its_engine_forgot_to_start_starts_on_first_use() -> None:
    # No events at all, and a push waiting for ever once the plugin's queue filled.
    stream = await open_stream("unstarted-echo")
    await push(stream, 2 * HALF_SECOND // len(CHUNK))
    await asyncio.wait_for(stream.end_input(), 5)
    assert [e.text for e in await events(stream) if e.text] == ["chunk 0", "chunk 1"]
    await stream.aclose()


async def test_an_unstarted_stream_can_be_iterated_first() -> None:
    stream = await open_stream("unstarted-echo")
    consumer = asyncio.create_task(events(stream))
    await asyncio.sleep(0)  # the session's pump iterates before any audio
    await push(stream, HALF_SECOND // len(CHUNK))
    await asyncio.wait_for(stream.end_input(), 5)
    assert [e.text for e in await consumer if e.text] == ["chunk 0"]
    stream.start()  # a late start() is harmless
    await stream.aclose()


async def test_closing_an_unstarted_stream_does_not_start_it() -> None:
    stream = await open_stream("unstarted-echo")
    await stream.aclose()
    assert await events(stream) == []
