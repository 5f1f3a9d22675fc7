"""The pocketsphinx stream on real recordings from ``../shared/audio``.

Audio is pushed in 20 ms chunks, faster than real time, followed by silence;
events are collected while pushing (the event channel is bounded). WER bounds are
what was measured (goforward and each cards file: 0 or 1 error, "for" for
"four"), with a little margin.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from tests.providers.held_worker import held_worker
from tests.providers.loop_watch import longest_stall, push_all
from tests.textnorm import SHARED_AUDIO, normalize, references, word_errors
from transcribe_gateway.audio.decode import Samples
from transcribe_gateway.audio.files import read_audio
from transcribe_gateway.config import LocalSettings, Settings
from transcribe_gateway.exceptions import ProviderAtCapacity, ProviderError
from transcribe_gateway.providers import pool as pool_module
from transcribe_gateway.providers.base import SpeechEvent, SpeechEventType, StreamOptions
from transcribe_gateway.providers.local import LocalSTT
from transcribe_gateway.providers.local_sphinx import (
    MAX_BACKLOG_MS,
    MAX_KEYTERMS,
    SphinxDecoder,
    SphinxStream,
    parse_keyterms,
    plan_keyterms,
)
from transcribe_gateway.providers.pool import LATE_FINALS_S

MODEL = "pocketsphinx-en-us"
RATE = 16000
CHUNK = RATE // 50  # 20 ms
CARDS = [f"cards-00{i}.wav" for i in range(1, 6)]
GAP_S = 1.0


def audio(name: str) -> Samples:
    path = Path(SHARED_AUDIO) / name
    if not path.is_file():
        raise FileNotFoundError(
            f"shared audio missing: {path} (tests need ../shared beside the repo)"
        )
    return read_audio(path)


def silence(seconds: float) -> Samples:
    return np.zeros(int(seconds * RATE), dtype=np.int16)


@dataclass
class Run:
    stream: SphinxStream
    events: list[SpeechEvent] = field(default_factory=list)
    max_backlog: int = 0
    waited: int = 0
    """Chunks ``push_audio_nowait`` refused, pushed with ``push_audio`` instead."""

    @property
    def finals(self) -> list[SpeechEvent]:
        return [e for e in self.events if e.type is SpeechEventType.FINAL]

    @property
    def text(self) -> str:
        return " ".join(e.text for e in self.finals)


@pytest.fixture(scope="module")
async def stt() -> AsyncIterator[LocalSTT]:
    # No stt.start(): it would load Whisper, which pocketsphinx streams do not use.
    engine = LocalSTT(Settings())
    yield engine
    await engine.aclose()


async def transcribe(
    stt: LocalSTT,
    samples: Samples,
    prompt: str | None = None,
    pace: float = 0.0,
    rescore_max_ms: int | None = None,
) -> Run:
    """Push ``samples`` in 20 ms chunks (``pace``: wall seconds per audio second)."""
    stream = await stt.open_stream(StreamOptions(model=MODEL, prompt=prompt))
    assert isinstance(stream, SphinxStream)
    if rescore_max_ms is not None:
        stream._rescore_max = rescore_max_ms * RATE // 1000
    run = Run(stream)

    async def collect() -> None:
        async for event in stream:
            run.events.append(event)

    collector = asyncio.create_task(collect())
    try:
        for i in range(0, len(samples), CHUNK):
            # As the gateway pushes: at once when the stream takes it, else awaited.
            if not stream.push_audio_nowait(samples[i : i + CHUNK]):
                run.waited += 1
                await stream.push_audio(samples[i : i + CHUNK])
            run.max_backlog = max(run.max_backlog, stream._backlog())
            if pace:
                await asyncio.sleep(pace * CHUNK / RATE)
        await stream.end_input()
        await asyncio.wait_for(collector, 60)
    finally:
        collector.cancel()
        await stream.aclose()
    assert stt.active["sphinx"] == 0
    return run


def check_order(events: list[SpeechEvent]) -> None:
    """Per utterance: STARTED, PARTIAL*, FINAL?, STOPPED; utterances one after the other."""
    expected = 0
    state = "idle"
    for event in events:
        if state == "idle":
            assert event.type is SpeechEventType.SPEECH_STARTED, event
            assert event.utterance == expected
            state = "open"
            continue
        assert event.utterance == expected, event
        if event.type is SpeechEventType.PARTIAL:
            assert state == "open", "partial after the final"
            assert event.text
        elif event.type is SpeechEventType.FINAL:
            assert state == "open"
            assert event.text
            state = "final"
        elif event.type is SpeechEventType.SPEECH_STOPPED:
            state = "idle"
            expected += 1
        else:
            raise AssertionError(f"unexpected {event}")
    assert state == "idle", "stream ended inside an utterance"


def check_words(final: SpeechEvent) -> None:
    assert final.start_ms < final.end_ms
    assert [w.word for w in final.words] == final.text.split()
    previous_end = final.start_ms
    for word in final.words:
        assert final.start_ms <= word.start_ms < word.end_ms <= final.end_ms, (word, final)
        assert word.start_ms >= previous_end, (word, final)
        previous_end = word.end_ms
        assert word.confidence is None  # no posterior without bestpath


# -- recognition ----------------------------------------------------------------


async def test_stream_transcribes_goforward(stt: LocalSTT) -> None:
    run = await transcribe(stt, np.concatenate([audio("goforward.raw"), silence(GAP_S)]))
    check_order(run.events)
    assert run.text == "go forward ten meters"
    (final,) = run.finals
    check_words(final)
    # Speech starts ~0.46 s in, "meters" ends ~2.12 s: the utterance spans them.
    assert final.start_ms <= 460 and final.end_ms >= 2100
    assert final.words[0].start_ms >= 300 and final.words[-1].end_ms <= 2400


async def test_stream_sends_partials_before_the_final(stt: LocalSTT) -> None:
    # Paced at twice real time: the decoder keeps up, so partials come out. (Pushed
    # all at once, the utterance's end is known before it is decoded: no partials.)
    run = await transcribe(stt, np.concatenate([audio("goforward.raw"), silence(GAP_S)]), pace=0.5)
    check_order(run.events)
    partials = [e.text for e in run.events if e.type is SpeechEventType.PARTIAL]
    assert len(partials) >= 2, partials
    assert len(set(partials)) == len(partials)  # only changes are sent
    assert run.text == "go forward ten meters"
    assert run.waited == 0  # the decoder keeps up: every chunk taken at once, no task


async def test_stream_transcribes_cards_in_one_session(stt: LocalSTT) -> None:
    """Five files, one stream (the decoder is reused); each file checked on its own."""
    refs = references()
    parts: list[Samples] = []
    spans: list[tuple[str, int, int]] = []
    at = 0
    for name in CARDS:
        clip = audio(name)
        spans.append((name, at * 1000 // RATE, (at + len(clip)) * 1000 // RATE))
        parts += [clip, silence(GAP_S)]
        at += len(clip) + int(GAP_S * RATE)
    run = await transcribe(stt, np.concatenate(parts))
    check_order(run.events)
    for final in run.finals:
        check_words(final)
    errors = total = 0
    for name, start_ms, end_ms in spans:
        text = " ".join(
            f.text for f in run.finals if start_ms - 400 <= f.start_ms and f.end_ms <= end_ms + 400
        )
        e, n = word_errors(refs[name], text)
        assert e <= 1, (name, text)  # measured: 0, or "for" for "four" / "clothes" for "clubs"
        errors += e
        total += n
    assert errors / total <= 0.15, run.text  # measured 1-2 errors in 21 words


async def test_stream_finalizes_trailing_speech_without_silence(stt: LocalSTT) -> None:
    # Cut just after "meters" (ends ~2.12 s): no silence, so only end_input ends it.
    cut = audio("goforward.raw")[: int(2.2 * RATE)]
    run = await transcribe(stt, cut)
    check_order(run.events)
    assert run.text == "go forward ten meters"
    stopped = [e for e in run.events if e.type is SpeechEventType.SPEECH_STOPPED]
    assert stopped[-1].end_ms == 2200
    check_words(run.finals[-1])


# -- resources and flow ---------------------------------------------------------


async def test_stream_bounds_undecoded_audio(stt: LocalSTT) -> None:
    """Pushed much faster than real time: the stream stops taking chunks at once and
    push_audio waits instead of buffering."""
    name = "sense_and_sensibility_01_austen_64kb-0890.wav"
    run = await transcribe(stt, np.concatenate([audio(name), silence(GAP_S)]))
    check_order(run.events)
    assert run.waited > 0
    assert run.max_backlog <= MAX_BACKLOG_MS * RATE // 1000
    e, n = word_errors(references()[name], run.text)
    assert e / n <= 0.5, run.text  # measured 4/14 (LibriVox is hard for pocketsphinx)


async def test_aclose_releases_the_session(stt: LocalSTT) -> None:
    stream = await stt.open_stream(StreamOptions(model=MODEL))
    assert stt.active["sphinx"] == 1
    await stream.aclose()
    await stream.aclose()  # idempotent: the slot is given back once
    assert stt.active["sphinx"] == 0
    with pytest.raises(RuntimeError):
        await stream.push_audio(silence(0.02))


async def test_aclose_during_decoding_does_not_hang(stt: LocalSTT) -> None:
    stream = await stt.open_stream(StreamOptions(model=MODEL))
    assert isinstance(stream, SphinxStream)
    samples = audio("sense_and_sensibility_01_austen_64kb-0870.wav")
    partial = asyncio.Event()

    async def collect() -> None:
        async for event in stream:
            if event.type is SpeechEventType.PARTIAL:
                partial.set()

    async def push() -> None:
        with contextlib.suppress(RuntimeError):  # pushing after aclose
            for i in range(0, len(samples), CHUNK):
                await stream.push_audio(samples[i : i + CHUNK])

    collector = asyncio.create_task(collect())
    pusher = asyncio.create_task(push())
    await asyncio.wait_for(partial.wait(), 10)
    assert stream._backlog() > 0 or stream._utterances, "decoding should be under way"
    await asyncio.wait_for(stream.aclose(), 2)
    await asyncio.wait_for(pusher, 2)  # a push waiting on backpressure is released
    collector.cancel()
    assert stt.active["sphinx"] == 0
    assert not stream._decoder_ready


async def test_decoding_never_stalls_the_event_loop(stt: LocalSTT) -> None:
    # pocketsphinx holds the GIL while it decodes: in a thread, the final's second
    # pass over this 7 s utterance stopped the event loop for ~1 s.  In a worker
    # process the loop keeps ticking while the decoder works.
    gaps: list[float] = []
    done = asyncio.Event()

    async def tick() -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while not done.is_set():
            await asyncio.sleep(0.01)
            now = loop.time()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    samples = audio("sense_and_sensibility_01_austen_64kb-0870.wav")
    started = time.perf_counter()
    run = await transcribe(stt, np.concatenate([samples, silence(GAP_S)]))
    busy = time.perf_counter() - started
    done.set()
    await ticker
    assert "dashwood" in normalize(run.text)
    assert busy > 0.5, "the decodes were too short to show a stall"
    assert max(gaps) < 0.3, (max(gaps), busy)


@pytest.mark.parametrize(
    ("chunk_s", "chunks"),
    [(120.0, 4), (0.2, 2000), (0.02, 10000)],
    ids=["long-chunks", "200ms-chunks", "20ms-chunks"],
)
async def test_a_flood_of_silence_never_stalls_the_event_loop(
    stt: LocalSTT, chunk_s: float, chunks: int
) -> None:
    # Silence sends the decoder nothing, so its backlog never held such a client
    # back: 120 s chunks from a phone line (Silero twice, ~0.4 s of a core each)
    # stopped the event loop for that long each, and short chunks, all taken at
    # once, never let it run until the client paused. Now a long chunk is heard
    # on a worker thread, and short ones let the loop run every INLINE_RUN_MS of
    # audio. Speech after them is found where it is.
    stream = await stt.open_stream(StreamOptions(model=MODEL, source_rate=8000))
    events: list[SpeechEvent] = []

    async def collect() -> None:
        async for event in stream:
            events.append(event)

    collector = asyncio.create_task(collect())
    try:
        flood = push_all(stream, (silence(chunk_s) for _ in range(chunks)))
        waited, stall = await longest_stall(flood)
        assert stall < 0.3, stall  # before: 0.5-2 s (all of it), more on a busy machine
        assert waited >= 1 if chunk_s <= 0.2 else waited == chunks  # pushed back
        speech = np.concatenate([audio("goforward.raw"), silence(GAP_S)])
        await push_all(stream, (speech[i : i + CHUNK] for i in range(0, len(speech), CHUNK)))
        await stream.end_input()
        await asyncio.wait_for(collector, 60)
    finally:
        collector.cancel()
        await stream.aclose()
    check_order(events)
    (final,) = [e for e in events if e.type is SpeechEventType.FINAL]
    assert final.text == "go forward ten meters"
    flood_ms = round(chunks * chunk_s * 1000)
    assert flood_ms < final.start_ms <= flood_ms + 460  # speech starts ~0.46 s in


async def test_a_dead_worker_process_fails_its_streams_and_is_replaced(stt: LocalSTT) -> None:
    stream = await stt.open_stream(StreamOptions(model=MODEL))
    assert isinstance(stream, SphinxStream)
    # Another stream whose decoder lives in the same process.
    others: list[SphinxStream] = []
    while not others or others[-1]._host != stream._host:
        opened = await stt.open_stream(StreamOptions(model=MODEL, prompt="forward"))
        assert isinstance(opened, SphinxStream) and len(others) < 8
        others.append(opened)
    other = others[-1]
    samples = audio("goforward.raw")
    await stream.push_audio(samples[:CHUNK])
    while not other.keyterms:  # noqa: ASYNC110 (its decoder is made, no call in flight)
        await asyncio.sleep(0.05)
    executor = stream._processes.executor(stream._host)
    await asyncio.wrap_future(executor.submit(int))  # the process is up
    for process in list(executor._processes.values()):
        assert process.pid is not None
        os.kill(process.pid, signal.SIGKILL)
    # Once the stream has failed, pushing raises RuntimeError (as the gateway
    # expects of any failed stream); iterating gives the failure.
    with contextlib.suppress(RuntimeError):
        for i in range(CHUNK, len(samples), CHUNK):
            await stream.push_audio(samples[i : i + CHUNK])
        await stream.end_input()
    with pytest.raises(ProviderError, match="worker process died"):
        async for _ in stream:
            pass
    await stream.aclose()
    # The other stream's next call goes to the new process, which never had its
    # decoder: the same failure (it was "internal engine error: KeyError").
    with contextlib.suppress(RuntimeError):
        for i in range(CHUNK, len(samples), CHUNK):
            await other.push_audio(samples[i : i + CHUNK])
        await other.end_input()
    with pytest.raises(ProviderError, match="worker process died"):
        async for _ in other:
            pass
    for o in others:
        await o.aclose()
    # The next stream gets a new process and works.
    run = await transcribe(stt, np.concatenate([samples, silence(GAP_S)]))
    assert normalize(run.text) == "go forward ten meters"


@pytest.mark.parametrize("paced", [True, False], ids=["real-time", "faster"])
async def test_late_finals_of_a_real_time_stream_stop_admission(
    paced: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As with Whisper's streams: the engine's only worker is busy, so the final
    # comes over LATE_FINALS_S after its endpoint; a caller heard it late, and a
    # new session is refused even once the worker is free. A client sending
    # faster than real time is paced by its own backlog; its lateness is not
    # the pool's. (cards-001, 1.1 s: its endpoint comes before the backlog
    # bound makes pushing wait.)
    monkeypatch.setattr(pool_module, "LATE_FINALS_MIN", 1)  # one session, one final
    async with held_worker(load_whisper=False) as held:
        samples = np.concatenate([audio("cards-001.wav"), silence(GAP_S)])
        pending = asyncio.create_task(transcribe(held.stt, samples, pace=1.0 if paced else 0.0))
        await asyncio.sleep(len(samples) / RATE + LATE_FINALS_S + 0.2)
        assert not pending.done()
        await held.release()
        run = await pending
        e, _ = word_errors(references()["cards-001.wav"], run.text)
        assert e <= 1, run.text
        await held.check_admission(MODEL, late=paced)


# -- keyterms -------------------------------------------------------------------


def fake_lookup(word: str) -> str | None:
    return {"ill": "IH L", "disposed": "D IH S P OW Z D", "go": "G OW", "a.d.": "EY D IY"}.get(word)


def test_parse_keyterms_splits_normalizes_and_dedupes() -> None:
    assert parse_keyterms(None) == []
    assert parse_keyterms(' Go ,  go,, Ill-Disposed, "New  York", ') == [
        "go",
        "ill-disposed",
        "new york",
    ]


def test_plan_keyterms_uses_dictionary_words_and_reports_the_rest() -> None:
    plan = plan_keyterms("go, ill-disposed, kubernetes, go ill, a.d., go.", fake_lookup)
    assert [k.text for k in plan.usable] == ["go", "ill disposed", "go ill", "a.d."]
    assert plan.usable[1].phones == "IH L D IH S P OW Z D"
    assert plan.usable[1].word_phones == (2, 7)
    assert plan.ignored == ("kubernetes",)  # "go." is "go" again


def test_plan_keyterms_refuses_the_dictionarys_silence_words() -> None:
    # The real dictionary pronounces "<sil>", "<s>" and "</s>" as silence (SIL):
    # a keyterm made of them would be "heard" in every pause.
    decoder = SphinxDecoder("<sil>, <s>, </s>, go <sil>, +noise+, go")
    assert [k.text for k in decoder.plan.usable] == ["go"]
    assert decoder.plan.ignored == ("<sil>", "<s>", "</s>", "go <sil>", "+noise+")


def test_plan_keyterms_refuses_control_characters() -> None:
    # The dictionary is C: "a\x00b" was looked up as "a", and came back whole.
    decoder = SphinxDecoder("a\x00b, go\x07, go")
    assert [k.text for k in decoder.plan.usable] == ["go"]
    assert decoder.plan.ignored == ("a\x00b", "go\x07")


def test_plan_keyterms_looks_up_no_term_over_the_cap() -> None:
    # A prompt may hold tens of thousands of terms: only the first MAX_KEYTERMS
    # usable ones are worth the dictionary's time (in a shared worker process).
    looked: list[str] = []

    def lookup(word: str) -> str:
        looked.append(word)
        return "W ER D"

    terms = [f"word{i}" for i in range(10 * MAX_KEYTERMS)]
    plan = plan_keyterms(",".join(terms), lookup)
    assert len(plan.usable) == MAX_KEYTERMS and len(plan.ignored) == 9 * MAX_KEYTERMS
    assert set(looked) == set(terms[:MAX_KEYTERMS])


async def test_an_utterance_that_seemed_too_long_while_open_keeps_its_words(
    stt: LocalSTT,
) -> None:
    # Open, an utterance is measured with the silence being heard, which its end
    # does not count: with the second pass bounded at 2.3 s, goforward seems over
    # it before its endpoint (and its audio goes), yet ends within it. Its final
    # must not decode again audio that is gone (it read "ers").
    samples = np.concatenate([audio("goforward.raw"), silence(GAP_S)])
    run = await transcribe(stt, samples, pace=1.0, rescore_max_ms=2300)
    assert normalize(run.text) == "go forward ten meters"


def test_plan_keyterms_caps_the_number() -> None:
    terms = [f"word{i}" for i in range(MAX_KEYTERMS + 5)]
    plan = plan_keyterms(",".join(terms), lambda word: "W ER D")
    assert [k.text for k in plan.usable] == terms[:MAX_KEYTERMS]
    assert plan.ignored == tuple(terms[MAX_KEYTERMS:])


async def test_keyterms_are_recognized_and_unknown_ones_reported(stt: LocalSTT) -> None:
    """Without keyterms this sentence comes out "he was not until exposed young man"."""
    name = "sense_and_sensibility_01_austen_64kb-0880.wav"
    samples = np.concatenate([audio(name), silence(GAP_S)])
    run = await transcribe(stt, samples, prompt="ill-disposed, Kubernetes")
    assert run.stream.keyterms == ("ill disposed",)
    assert run.stream.ignored_keyterms == ("kubernetes",)
    check_order(run.events)
    assert "ill disposed" in run.text, run.text
    errors, _ = word_errors(references()[name], run.text)
    assert errors <= 2, run.text  # measured 1 ("not and ill disposed")
    final = run.finals[-1]
    check_words(final)  # a phrase keyterm is split into timed words


async def test_unrelated_keyterms_do_not_hurt(stt: LocalSTT) -> None:
    samples = np.concatenate([audio("goforward.raw"), silence(GAP_S)])
    run = await transcribe(stt, samples, prompt="clubs, spades, github, kubernetes")
    assert run.stream.keyterms == ("clubs", "spades", "github")
    assert normalize(run.text) == "go forward ten meters"


async def test_keyterms_are_reported_without_speech(stt: LocalSTT) -> None:
    run = await transcribe(stt, silence(0.5), prompt="spades, zyxwvut")
    assert run.events == []
    assert run.stream.keyterms == ("spades",)
    assert run.stream.ignored_keyterms == ("zyxwvut",)


async def test_a_session_moving_between_local_engines_keeps_its_place(
    stt: LocalSTT, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A session's update from pocketsphinx to Whisper (or back) was refused as
    # "saturated", though its one stream's load only moves (docs/protocol.md:
    # a session already on the engine keeps its place through an update).
    stream = await stt.open_stream(StreamOptions(model=MODEL, session_id="s1"))
    monkeypatch.setattr(type(stt.pool), "saturated", property(lambda self: True))
    try:
        moved = await stt.open_stream(StreamOptions(model="whisper-tiny.en", session_id="s1"))
        await moved.aclose()
        with pytest.raises(ProviderAtCapacity, match="saturated"):  # a new session is not
            await stt.open_stream(StreamOptions(model="whisper-tiny.en", session_id="s2"))
    finally:
        await stream.aclose()


async def test_whisper_and_pocketsphinx_sessions_share_the_workers() -> None:
    # Each family was admitted up to its own cap as if the other took nothing:
    # 16 Whisper and 4 pocketsphinx sessions on two workers, all far behind.
    stt = LocalSTT(Settings(local=LocalSettings(workers=1, max_sessions_per_worker=2)))
    streams = []
    try:
        streams.append(await stt.open_stream(StreamOptions(model=MODEL, session_id="s1")))
        # pocketsphinx takes half the worker (2 a worker), Whisper a half for each
        # (2 a worker): one Whisper session fits beside it, not two.
        streams.append(
            await stt.open_stream(StreamOptions(model="whisper-tiny.en", session_id="s2"))
        )
        with pytest.raises(ProviderAtCapacity, match="1 Whisper and 1 pocketsphinx"):
            await stt.open_stream(StreamOptions(model="whisper-tiny.en", session_id="s3"))
        with pytest.raises(ProviderAtCapacity):
            await stt.open_stream(StreamOptions(model=MODEL, session_id="s3"))
        # A session moving between them keeps its place.
        moved = await stt.open_stream(StreamOptions(model="whisper-tiny.en", session_id="s1"))
        await streams.pop(0).aclose()
        streams.append(moved)
    finally:
        for stream in streams:
            await stream.aclose()
        await stt.aclose()
