"""The Whisper stream in process: segmentation, speculative finals, trailing speech,
finals in context; the engine's encoder on every core."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from faster_whisper.transcribe import Word

from tests.conftest import SHARED_AUDIO
from tests.providers.held_worker import held_worker
from tests.providers.loop_watch import longest_stall, push_all
from tests.textnorm import normalize, references
from transcribe_gateway.audio.files import read_audio
from transcribe_gateway.audio.vad import SAMPLE_RATE
from transcribe_gateway.config import LocalSettings, Settings
from transcribe_gateway.exceptions import ProviderUnavailable
from transcribe_gateway.providers import local as local_module
from transcribe_gateway.providers import pool as pool_module
from transcribe_gateway.providers.base import SpeechEvent, SpeechEventType, StreamOptions
from transcribe_gateway.providers.local import LocalSTT
from transcribe_gateway.providers.local_whisper import CONTEXT_MS, WhisperStream, ends_sentence
from transcribe_gateway.providers.pool import LATE_FINALS_S
from transcribe_gateway.providers.whisper_copies import copies, repeats_itself
from transcribe_gateway.providers.whisper_encoder import FRAMES_PER_S
from transcribe_gateway.providers.whisper_engine import (
    BUNDLED_MODEL,
    REPEAT_GAP_MS,
    SHORT_PADDING_MS,
    WINDOW,
    Transcript,
    WhisperEngine,
    in_context,
    resolve_whisper_model,
    token_budget,
)

JFK_REFERENCE = (
    "and so my fellow americans ask not what your country can do for you "
    "ask what you can do for your country"
)


@pytest.fixture(scope="module")
async def stt() -> LocalSTT:
    engine = LocalSTT(Settings())
    await engine.start()
    return engine


@pytest.fixture(scope="module")
async def stt_alone() -> LocalSTT:
    """Each final decoded alone (``final_context = false``)."""
    engine = LocalSTT(Settings(local=LocalSettings(final_context=False)))
    await engine.start()
    return engine


@dataclass
class Run:
    stream: WhisperStream
    events: list[SpeechEvent] = field(default_factory=list)
    waited: int = 0
    """Chunks ``push_audio_nowait`` refused, pushed with ``push_audio`` instead."""
    held: int = 0
    """The most audio the stream held at once (samples)."""


async def run(
    stt: LocalSTT,
    audio: np.ndarray,
    *,
    live: bool = True,
    patient: bool = False,
    paced: bool = False,
    partials: bool = False,
    **options: Any,
) -> Run:
    """Push ``audio`` in 20 ms chunks the way the gateway does: at once when the
    stream takes them, else awaited.  ``live``: yield between chunks, as a live
    stream would (the decode tasks get to run); otherwise flood.  ``patient``:
    let each speculative final finish before the next chunk, as on a machine
    that decodes faster than the pause lasts, so what the stream decides from
    it does not depend on this machine's speed.  ``paced``: one chunk per 20 ms,
    as a caller sends.  ``partials``: let each partial's decode finish before the
    next chunk, so that every partial due is decoded, whatever this machine's speed."""
    stream = await stt.open_stream(StreamOptions(model="whisper-tiny.en", **options))
    assert isinstance(stream, WhisperStream)
    result = Run(stream)

    async def collect() -> None:
        async for event in stream:
            result.events.append(event)

    collector = asyncio.create_task(collect())
    for i in range(0, len(audio), 320):
        if not stream.push_audio_nowait(audio[i : i + 320]):
            result.waited += 1
            await stream.push_audio(audio[i : i + 320])
        result.held = max(result.held, stream._audio.end - stream._audio.start)
        if paced:
            await asyncio.sleep(0.02)
        elif live:
            await asyncio.sleep(0)
        if patient and stream._early is not None:
            await asyncio.wait_for(asyncio.shield(stream._early[2].task), 30)
        if partials and stream._partial is not None:
            await asyncio.wait_for(asyncio.shield(stream._partial.task), 30)
    await stream.end_input()
    await asyncio.wait_for(collector, 60)
    await stream.aclose()
    return result


def go_forward() -> np.ndarray:
    """goforward.raw, one utterance, and a second of silence: its endpoint comes."""
    return np.concatenate([read_audio(SHARED_AUDIO / "goforward.raw"), np.zeros(16000, np.int16)])


def finals(events: list[SpeechEvent]) -> list[SpeechEvent]:
    return [e for e in events if e.type is SpeechEventType.FINAL]


async def test_final_is_decoded_during_the_endpointing_silence(stt: LocalSTT) -> None:
    audio = go_forward()
    result = await run(stt, audio)
    (final,) = finals(result.events)
    assert normalize(final.text) == "go forward ten meters"
    assert result.stream.early_finals == 1  # the speculative decode became the final
    assert result.waited == 0  # every chunk was taken at once, without a task
    assert stt.active["whisper"] == 0


async def test_a_flood_of_utterances_waits_for_the_final_queue(stt: LocalSTT) -> None:
    # Six utterances pushed without yielding: the stream's task cannot decode
    # meanwhile, so after FINAL_QUEUE pending finals the stream stops taking
    # chunks at once, and push_audio waits; every utterance is still final.
    phrase = go_forward()
    result = await run(stt, np.tile(phrase, 6), live=False)
    texts = [normalize(f.text) for f in finals(result.events)]
    assert texts == ["go forward ten meters"] * 6, texts
    assert [f.utterance for f in finals(result.events)] == list(range(6))
    assert result.waited >= 1
    # The finals' context is bounded: CONTEXT_MS of history and the open
    # utterance (each ~2.8 s here), not the whole ~23 s stream.
    assert len(phrase) * 6 > (CONTEXT_MS + 8000) * 16
    assert result.held <= (CONTEXT_MS + 3000) * 16
    assert result.held > CONTEXT_MS * 16 * 3 // 4


async def test_a_final_decoded_in_context_reads_as_batch(
    stt: LocalSTT, stt_alone: LocalSTT
) -> None:
    # jfk's pauses cut it into four utterances. Decoded alone, the first loses
    # two words to what batch reads from the whole file (BENCHMARKS.md); in
    # context, after the earlier speech and before its own repeat, it does not.
    audio = np.concatenate([read_audio(SHARED_AUDIO / "jfk.flac"), np.zeros(16000, np.int16)])
    alone = [normalize(f.text) for f in finals((await run(stt_alone, audio, patient=True)).events)]
    assert alone[0] == "and so am i fellow americans", alone
    result = await run(stt, audio, patient=True)
    in_context_ = finals(result.events)
    assert normalize(in_context_[0].text) == "and so my fellow americans"
    assert normalize(" ".join(f.text for f in in_context_)) == JFK_REFERENCE
    # The first copy reads on into the repeat ("Americans,"); the final ends as
    # the repeat, which ends the window, does.
    assert ends_sentence(in_context_[0].text), in_context_[0].text
    for final in in_context_:
        assert [normalize(w.word) for w in final.words] == normalize(final.text).split()
        assert all(final.start_ms <= w.start_ms <= w.end_ms <= final.end_ms for w in final.words)
    assert result.held <= (CONTEXT_MS + 4000) * 16


async def test_an_utterance_read_in_context_as_nothing_is_decoded_alone(stt: LocalSTT) -> None:
    # "Go forward" (goforward's first second) after jfk: in its final's window
    # tiny.en reads jfk's last words and stops, reading neither copy of it. The
    # words were spoken: decoded alone, the utterance reads them.
    go = read_audio(SHARED_AUDIO / "goforward.raw")[:SAMPLE_RATE]
    jfk = read_audio(SHARED_AUDIO / "jfk.flac")
    audio = np.concatenate([jfk, np.zeros(8000, np.int16), go, np.zeros(16000, np.int16)])
    result = await run(stt, audio, patient=True)
    starts = [e for e in result.events if e.type is SpeechEventType.SPEECH_STARTED]
    last = finals(result.events)[-1]
    assert last.utterance == starts[-1].utterance
    assert normalize(last.text) == "go forward"


def test_the_window_holds_context_utterance_silence_and_repeat() -> None:
    before = np.full(16000, 1, np.int16)
    utterance = np.full(8000, 2, np.int16)
    gap = REPEAT_GAP_MS * 16
    window, keep_from, keep_to = in_context(before, utterance)
    expected = np.concatenate([before, utterance, np.zeros(gap, np.int16), utterance])
    assert np.array_equal(window, expected)
    assert (keep_from, keep_to) == (16000, 24000 + gap // 2)  # to the silence's middle
    # Context beyond Whisper's 30 s window is dropped from its oldest end.
    long_before = np.arange(WINDOW, dtype=np.int64).astype(np.int16)
    window, keep_from, _ = in_context(long_before, utterance)
    assert len(window) == WINDOW and keep_from == WINDOW - 2 * 8000 - gap
    assert np.array_equal(window[:keep_from], long_before[-keep_from:])
    # An utterance too long to fit twice is decoded alone, without context.
    long = np.full(WINDOW // 2, 3, np.int16)
    window, keep_from, keep_to = in_context(before, long)
    assert window is long and (keep_from, keep_to) == (0, len(long))


def _words(*timed: tuple[str, float, float]) -> list[Word]:
    return [
        Word(start=start, end=end, word=f" {word}", probability=0.9) for word, start, end in timed
    ]


def _spoken(words: list[Word]) -> str:
    return "".join(w.word for w in words).strip()


def test_the_copies_are_split_by_their_words_when_whisper_times_one_into_the_gap() -> None:
    # A window of context (to 1 s), the utterance (to 2 s), the gap, and its repeat:
    # the first copy's words are those in [1 s, 2.5 s), the middle of the gap.
    keep_from, keep_to = 16000, 40000
    context = [("okay.", 0.2, 0.6)]
    repeat = [("sound", 3.0, 3.3), ("better", 3.3, 3.6), ("to", 3.6, 3.8), ("me.", 3.8, 4.2)]
    # The first copy's last word timed past the gap's middle: split one word later.
    drifted_late = _words(
        *context, ("sound", 1.0, 1.3), ("better", 1.3, 1.6), ("to", 1.6, 2.0),
        ("me", 2.3, 2.9), *repeat,
    )  # fmt: skip
    assert copies(drifted_late, keep_from, keep_to) == (drifted_late[1:5], drifted_late[5:])
    # Its first word timed back into the context: the copy starts one word sooner.
    drifted_early = _words(
        *context, ("sound", 0.7, 1.1), ("better", 1.3, 1.6), ("to", 1.6, 1.8),
        ("me", 1.8, 2.0), *repeat,
    )  # fmt: skip
    pair = copies(drifted_early, keep_from, keep_to)
    assert pair == (drifted_early[1:5], drifted_early[5:])
    assert _spoken(pair[0]) == "sound better to me"
    # Timed right, the split is the timed one (the context is never taken in).
    timed = _words(
        *context, ("okay", 1.0, 1.2), ("sound", 1.2, 1.5), ("better", 1.5, 1.8),
        ("to", 1.8, 1.9), ("me", 1.9, 2.1), ("okay", 2.9, 3.0), *repeat,
    )  # fmt: skip
    assert copies(timed, keep_from, keep_to) == (timed[1:6], timed[6:])
    # Two readings that differ in a word disagree whatever the split (no copies)...
    misheard = _words(
        *context, ("sound", 1.0, 1.3), ("bitter", 1.3, 1.6), ("to", 1.6, 2.0),
        ("me", 2.0, 2.2), *repeat,
    )  # fmt: skip
    assert copies(misheard, keep_from, keep_to) is None
    # ... and a split two words off the timed one is not looked for.
    far = _words(
        *context, ("sound", 1.0, 1.3), ("better", 1.3, 1.6), ("to", 2.6, 2.8),
        ("me", 2.8, 2.9), *repeat,
    )  # fmt: skip
    assert copies(far, keep_from, keep_to) is None


def test_a_first_copy_with_nothing_read_after_it_is_kept() -> None:
    # tiny.en may stop after a short utterance's first copy: no repeat to
    # compare, nothing against the first reading, which is kept (no decode
    # alone). Not when Whisper lost its place in it (words stacked at one
    # instant), when nothing was read in it, or when the repeat read otherwise.
    keep_from, keep_to = 16000, 40000
    context = [("okay.", 0.2, 0.6)]
    stopped = _words(*context, ("sorry.", 1.1, 1.6))
    assert copies(stopped, keep_from, keep_to) == (stopped[1:], stopped[1:])
    stacked = _words(*context, ("yes", 1.5, 1.5), ("please", 1.5, 1.5))
    assert copies(stacked, keep_from, keep_to) is None
    only_in_the_repeat = _words(*context, ("sorry.", 3.0, 3.4))
    assert copies(only_in_the_repeat, keep_from, keep_to) is None
    otherwise = _words(*context, ("sorry.", 1.1, 1.6), ("story.", 3.0, 3.4))
    assert copies(otherwise, keep_from, keep_to) is None


def test_a_window_read_only_in_its_context_is_not_an_empty_final() -> None:
    # Whisper read the earlier speech and stopped before the utterance: two
    # empty copies are not two readings of silence, and the utterance is decoded
    # alone (None). A window read as nothing at all is noise: an empty final,
    # not a decode alone, where Whisper makes words of it ("Thank you.").
    keep_from, keep_to = 16000, 40000
    context_only = _words(("okay.", 0.2, 0.6), ("sure.", 0.6, 0.9))
    assert copies(context_only, keep_from, keep_to) is None
    assert copies([], keep_from, keep_to) == ([], [])
    assert copies(_words(("...", 1.2, 1.6)), keep_from, keep_to) == ([], [])


def test_a_repeated_phrase_in_the_context_is_neither_doubled_nor_lost(
    engines: Engines, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same recording again and again before it: tiny.en then skips copies
    # and stacks the words it keeps at one instant (with three copies on the
    # two-thread encoder, the first reading was the phrase twice). The check
    # that both readings agree and kept their place sends those to a decode
    # of the utterance alone, which is one decode at temperature 0, like the
    # decode in context: no sampled retries, and a bound on the tokens.
    phrase = engines.audio
    decodes: list[tuple[object, object]] = []
    for engine in (engines.alone, engines.engine):

        def spy(audio: np.ndarray, _decode: Any = engine.model.transcribe, **kwargs: Any) -> Any:
            expected = token_budget(len(audio))  # a float32 copy of the decoded samples
            decodes.append((kwargs.get("temperature"), kwargs.get("max_new_tokens") == expected))
            return _decode(audio, **kwargs)

        monkeypatch.setattr(engine.model, "transcribe", spy)
    before = engines.engine.repeat_mismatches + engines.alone.repeat_mismatches
    for said_before in range(6):
        context = np.tile(np.concatenate([phrase, np.zeros(16000, np.int16)]), said_before)
        for engine in (engines.alone, engines.engine):
            text = engine.transcribe(phrase, final=True, context=context).text
            said = normalize(text).replace("metres", "meters")  # tiny.en spells it both ways
            assert said == "go forward ten meters", (said_before, engine, text)
    mismatches = engines.engine.repeat_mismatches + engines.alone.repeat_mismatches - before
    assert mismatches > 0
    # Every decode, in context or alone after a mismatch: 12 in context, one more per mismatch.
    assert decodes == [(0.0, True)] * (12 + mismatches)


def test_the_token_budget_leaves_speech_room_and_stops_a_loop(
    engines: Engines, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each recording in its final's window (itself, then itself again), decoded at
    # temperature 0 with no budget: speech takes under half of the budget, but
    # cards-004 reads "5, 5, 5, ..." to the model's limit, ~1 s of a core.
    def written(window: np.ndarray) -> int:
        found, _ = engines.alone.model.transcribe(
            window.astype(np.float32) / 32768.0,
            language="en",
            beam_size=5,
            word_timestamps=True,
            temperature=0.0,
            condition_on_previous_text=False,
        )
        return sum(len(segment.tokens) for segment in found)

    nothing = np.zeros(0, np.int16)
    for name in references():
        window, _, _ = in_context(nothing, read_audio(SHARED_AUDIO / name))
        tokens = written(window)
        if name == "cards-004.wav":
            assert tokens > 3 * token_budget(len(window)), tokens
        else:
            assert 0 < 2 * tokens < token_budget(len(window)), (name, tokens)
    # Through the engine the loop stops at the budget, and the final (decoded
    # alone, since the repeat reads otherwise) is the card.
    lengths: list[tuple[int, int]] = []
    decode = engines.alone.model.transcribe

    def spy(audio: np.ndarray, **kwargs: Any) -> Any:
        found, info = decode(audio, **kwargs)
        segments = list(found)
        lengths.append((sum(len(s.tokens) for s in segments), kwargs["max_new_tokens"]))
        return iter(segments), info

    monkeypatch.setattr(engines.alone.model, "transcribe", spy)
    card = read_audio(SHARED_AUDIO / "cards-004.wav")
    text = engines.alone.transcribe(card, final=True, context=nothing).text
    assert normalize(text) == normalize(references()["cards-004.wav"])
    assert len(lengths) == 2 and all(n <= budget for n, budget in lengths), lengths
    # A whole window's budget leaves the rest of the model's 448 tokens to a
    # prompt as long as faster-whisper keeps (223): a partial over 30 s of audio
    # with a long prompt decodes (faster-whisper refuses a budget that leaves no room).
    monkeypatch.undo()
    jfk = read_audio(SHARED_AUDIO / "jfk.flac")
    prompt = "Queen of clubs, seven of spades. " * 100
    partial = engines.alone.transcribe(np.tile(jfk, 3), final=False, prompt=prompt).text
    assert normalize(partial).startswith("and so my fellow americans")


@pytest.mark.parametrize(
    ("chunk_s", "chunks"),
    [(120.0, 4), (0.2, 2000), (0.02, 10000)],
    ids=["long-chunks", "200ms-chunks", "20ms-chunks"],
)
async def test_a_flood_of_silence_never_stalls_the_event_loop(
    stt: LocalSTT, chunk_s: float, chunks: int
) -> None:
    # A client may send faster than real time: silence back to back, from a
    # phone line (8 kHz: Silero hears it twice), which makes no final to wait
    # for. Heard on the event loop, a 120 s chunk stopped every session of the
    # server for ~0.4 s, and chunks that were all taken at once never let it run
    # until the client paused. Now a long chunk is heard on a worker thread, and
    # short ones let the loop run every INLINE_RUN_MS of audio. Speech after
    # them is found where it is.
    stream = await stt.open_stream(StreamOptions(model="whisper-tiny.en", source_rate=8000))
    events: list[SpeechEvent] = []

    async def collect() -> None:
        async for event in stream:
            events.append(event)

    size = int(chunk_s * SAMPLE_RATE)

    collector = asyncio.create_task(collect())
    try:
        flood = push_all(stream, (np.zeros(size, np.int16) for _ in range(chunks)))
        waited, stall = await longest_stall(flood)
        assert stall < 0.3, stall  # before: 0.5-2 s (all of it), more on a busy machine
        assert waited >= 1 if chunk_s <= 0.2 else waited == chunks  # pushed back
        speech = go_forward()
        await push_all(stream, (speech[i : i + 320] for i in range(0, len(speech), 320)))
        await stream.end_input()
        await asyncio.wait_for(collector, 60)
    finally:
        collector.cancel()
        await stream.aclose()
    (final,) = finals(events)
    assert normalize(final.text) == "go forward ten meters"
    flood_ms = chunks * size * 1000 // SAMPLE_RATE
    assert flood_ms < final.start_ms < flood_ms + 500  # speech starts ~0.46 s in


async def test_speculation_is_dropped_when_speech_resumes(stt: LocalSTT) -> None:
    # Two phrases ~0.4 s apart (goforward's tail, 150 ms of zeros, the lead-in
    # of cards-001): longer than the speculation point, shorter than the 500 ms
    # endpointing, so they are one utterance and the guess made in the gap is wrong.
    encoder = stt._engines[BUNDLED_MODEL].encoder
    stopped = encoder.stopped
    words = read_audio(SHARED_AUDIO / "goforward.raw")
    gap = np.zeros(int(0.15 * 16000), np.int16)
    cards = read_audio(SHARED_AUDIO / "cards-001.wav")
    audio = np.concatenate([words[: int(2.35 * 16000)], gap, cards, np.zeros(16000, np.int16)])
    result = await run(stt, audio)
    stream, events = result.stream, result.events
    (final,) = finals(events)  # the dropped guess was never emitted
    assert normalize(final.text).startswith("go forward ten meters ten of")  # "clubs": "close"
    assert [e.type for e in events].count(SpeechEventType.SPEECH_STARTED) == 1
    assert final.end_ms > 2350 + 150  # one utterance: its final covers both phrases
    assert stream.early_finals <= 1
    # The dropped guess (and any partial a final overtook) stopped after its
    # encoder instead of decoding for nothing.
    assert encoder.stopped > stopped


async def test_trailing_speech_is_finalized_at_end_of_input(stt: LocalSTT) -> None:
    audio = read_audio(SHARED_AUDIO / "goforward.raw")[: int(2.35 * 16000)]
    events = (await run(stt, audio)).events
    assert normalize(" ".join(f.text for f in finals(events))) == "go forward ten meters"
    kinds = [e.type for e in events if e.type is not SpeechEventType.PARTIAL]
    assert kinds == [
        SpeechEventType.SPEECH_STARTED,
        SpeechEventType.FINAL,
        SpeechEventType.SPEECH_STOPPED,
    ]


async def test_a_long_minimum_speech_keeps_the_head_of_the_utterance(stt: LocalSTT) -> None:
    # The VAD dates a start back by the prefix padding and the voiced time it
    # waits for (1.5 s here): the audio kept before an utterance covers both, in
    # a prompted session too (finals decoded alone, no history kept).
    lead = np.zeros(3 * SAMPLE_RATE, np.int16)
    audio = np.concatenate([lead, go_forward()])
    result = await run(stt, audio, prompt="Go forward.", vad_min_speech_ms=1500)
    (started,) = [e for e in result.events if e.type is SpeechEventType.SPEECH_STARTED]
    (final,) = finals(result.events)
    assert final.start_ms == started.start_ms
    assert normalize(final.text) == "go forward ten meters"


@pytest.mark.parametrize(
    ("text", "finished"),
    [
        ("Go forward 10 meters.", True),
        ("Can you repeat that?", True),
        ("Stop!", True),
        ('He said "stop."', True),
        ("ask not", False),
        ("And so, my fellow citizens,", False),
        ("My fellow kid isn't...", False),  # tiny.en's mark for speech breaking off
        ("Well\u2026", False),
        ("", False),
    ],
)
def test_a_sentence_is_finished_by_its_punctuation(text: str, finished: bool) -> None:
    assert ends_sentence(text) is finished


async def test_semantic_endpointing_holds_an_unfinished_sentence(stt: LocalSTT) -> None:
    # jfk pauses ~0.7 s after "And so my fellow Americans" and after "ask not":
    # at 500 ms endpointing both pauses end an utterance. With
    # endpointing_unfinished the first still does (its guess ends in a period),
    # and "ask not", unpunctuated, waits and joins the rest of its sentence.
    audio = np.concatenate([read_audio(SHARED_AUDIO / "jfk.flac"), np.zeros(16000, np.int16)])
    plain = [normalize(f.text) for f in finals((await run(stt, audio, patient=True)).events)]
    assert plain[1] == "ask not" and len(plain) == 4, plain
    result = await run(stt, audio, patient=True, endpointing_ms=500, endpointing_unfinished_ms=1500)
    held = [normalize(f.text) for f in finals(result.events)]
    assert held[0] == plain[0] == "and so my fellow americans"
    assert held[1].startswith("ask not what your country can do for you"), held
    assert len(held) < len(plain) and " ".join(held) == JFK_REFERENCE, held
    starts = [e for e in result.events if e.type is SpeechEventType.SPEECH_STARTED]
    assert len(starts) == len(held)  # one utterance for each held sentence


async def test_semantic_endpointing_ends_a_finished_sentence_at_the_endpointing(
    stt: LocalSTT,
) -> None:
    # "Go forward 10 meters." then 0.9 s of silence, then "ten of clubs": under
    # the 1500 ms hold, so only the guess's full stop keeps them apart.
    words = read_audio(SHARED_AUDIO / "goforward.raw")[: int(2.35 * 16000)]
    cards = read_audio(SHARED_AUDIO / "cards-001.wav")
    gap = np.zeros(int(0.9 * 16000), np.int16)
    audio = np.concatenate([words, gap, cards, np.zeros(16000, np.int16)])
    options: dict[str, Any] = {"endpointing_ms": 500, "endpointing_unfinished_ms": 1500}
    result = await run(stt, audio, patient=True, **options)
    first, second = finals(result.events)
    assert normalize(first.text) == "go forward ten meters" and first.end_ms < 2400
    assert second.start_ms > first.end_ms + 500
    assert result.stream.early_finals >= 1  # the guess that judged it became its final
    # Without time to guess (a flood: no speculative final is ready when the
    # endpointing silence has passed, nor before speech resumes) the hold is
    # the longer silence, and the two are one utterance.
    flood = await run(stt, audio, live=False, **options)
    (final,) = finals(flood.events)
    assert normalize(final.text).startswith("go forward ten meters")


@dataclass
class HeldReplica:
    """The engine's real extra encoder replica, holding its first encode until released."""

    replica: Any
    inside: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    def encode(self, features: Any) -> Any:
        if not self.inside.is_set():
            self.inside.set()
            assert self.release.wait(30)
        return self.replica.encode(features)


@dataclass
class Engines:
    alone: WhisperEngine
    """One worker: no extra replica."""
    engine: WhisperEngine
    """Two workers."""
    audio: np.ndarray
    expected: Transcript
    """``alone``'s final of ``audio``."""


@pytest.fixture(scope="module")
def engines() -> Engines:
    path = resolve_whisper_model(BUNDLED_MODEL, {}, False)
    alone = WhisperEngine(BUNDLED_MODEL, path, 1)
    audio = read_audio(SHARED_AUDIO / "goforward.raw")
    return Engines(
        alone, WhisperEngine(BUNDLED_MODEL, path, 2), audio, alone.transcribe(audio, final=True)
    )


def hold(engine: WhisperEngine) -> HeldReplica:
    held = HeldReplica(engine.encoder._wide)
    engine.encoder._wide = held
    return held


def test_the_extra_replica_takes_one_encode_at_a_time(engines: Engines) -> None:
    # An encode while another is on the extra replica runs on the pool's own
    # one-thread replica instead; every result is the one-worker engine's.
    engine, audio, expected = engines.engine, engines.audio, engines.expected
    assert engines.alone.encoder._wide is None
    wide_before = engine.encoder.wide_encodes
    held = hold(engine)
    try:
        with ThreadPoolExecutor(1) as executor:
            first = executor.submit(engine.transcribe, audio, final=True)
            assert held.inside.wait(30)
            second = engine.transcribe(audio, final=True)  # while the first holds the replica
            assert engine.encoder.wide_encodes == wide_before + 1
            held.release.set()
            assert first.result(30) == second == expected
    finally:
        engine.encoder._wide = held.replica
    assert engine.transcribe(audio, final=True) == expected
    assert engine.encoder.wide_encodes == wide_before + 2  # free again after the first


def test_the_extra_replica_is_for_a_decode_alone(engines: Engines) -> None:
    # Another decode under way (held here between its encoder and its decoder)
    # keeps an encode on its own core: the extra replica's threads beside
    # another busy core are no faster.  An abandoned one does not count.
    engine, audio, expected = engines.engine, engines.audio, engines.expected
    other, entered, done = threading.Event(), threading.Event(), threading.Event()

    def another_decode() -> None:
        with engine.encoder.decoding(other):
            entered.set()
            assert done.wait(30)

    wide_before = engine.encoder.wide_encodes
    with ThreadPoolExecutor(1) as executor:
        held = executor.submit(another_decode)
        assert entered.wait(30)
        try:
            assert engine.transcribe(audio, final=True) == expected
            assert engine.encoder.wide_encodes == wide_before
            other.set()
            assert engine.transcribe(audio, final=True) == expected
            assert engine.encoder.wide_encodes == wide_before + 1
        finally:
            done.set()
            held.result(30)


def test_an_abandoned_decode_stops_after_its_encoder(engines: Engines) -> None:
    # The first decode is abandoned while it encodes on the extra replica: it
    # returns an empty transcript without decoding, and the second decode waits
    # for the replica (it is about to be free) instead of encoding on one core.
    engine, audio, expected = engines.engine, engines.audio, engines.expected
    wide_before, stopped_before = engine.encoder.wide_encodes, engine.encoder.stopped
    held = hold(engine)
    abandoned = threading.Event()
    try:
        with ThreadPoolExecutor(2) as executor:
            first = executor.submit(engine.transcribe, audio, final=True, abandoned=abandoned)
            assert held.inside.wait(30)
            abandoned.set()
            second = executor.submit(engine.transcribe, audio, final=True)
            with pytest.raises(TimeoutError):
                second.result(1.5)  # waiting: on its own core it would be done by now
            held.release.set()
            assert first.result(30) == Transcript("", ())
            assert second.result(30) == expected
    finally:
        engine.encoder._wide = held.replica
    assert engine.encoder.wide_encodes == wide_before + 2
    assert engine.encoder.stopped == stopped_before + 1
    # Abandoned before it starts, a decode stops at once, and sets nothing aside.
    assert engines.alone.transcribe(audio, final=True, abandoned=abandoned) == Transcript("", ())


def test_a_partial_is_encoded_over_its_audio_and_part_of_the_padding(engines: Engines) -> None:
    # The encoder's cost grows faster than its window: a partial's window is cut
    # to its audio and SHORT_PADDING_MS; a final's stays whole (30 s).
    engine, audio = engines.alone, engines.audio
    seen: list[int] = []
    narrow = engine.encoder._narrow

    def encode(features: np.ndarray) -> Any:
        seen.append(features.shape[-1])
        return narrow(features)

    engine.encoder._narrow = encode
    try:
        partial = engine.transcribe(audio, final=False)
        final = engine.transcribe(audio, final=True)
        engine.short_padding_ms = None
        whole = engine.transcribe(audio, final=False)
    finally:
        engine.encoder._narrow = narrow
        engine.short_padding_ms = SHORT_PADDING_MS
    frames = WINDOW // SAMPLE_RATE * FRAMES_PER_S
    audio_frames = len(audio) * FRAMES_PER_S // SAMPLE_RATE
    padding = SHORT_PADDING_MS * FRAMES_PER_S // 1000
    assert seen[0] % 2 == 0 and 0 <= seen[0] - audio_frames - padding <= 3
    assert seen[1:] == [frames, frames]
    assert final == engines.expected
    # The short window reads the words the whole one does.
    assert normalize(partial.text).startswith("go forward ten meters")
    assert normalize(whole.text).startswith("go forward ten meters")


def test_only_the_padding_is_cut_from_a_window(engines: Engines) -> None:
    # faster-whisper pads a window with zero frames; a frame of audio, even
    # silence, is never all zeros. Without padding (or outside a decode with a
    # padding bound) a window is encoded whole.
    encoder = engines.alone.encoder
    window = np.zeros((1, 80, 3000), np.float32)
    window[..., :501] = -1.5  # 5 s of digital silence's log-mel
    assert encoder._shortened(window) is window
    with encoder.decoding(threading.Event(), padding_ms=1000):
        assert encoder._shortened(window).shape == (1, 80, 602)
        full = np.full((80, 3000), -0.5, np.float32)
        assert encoder._shortened(full) is full
    with encoder.decoding(threading.Event()):
        assert encoder._shortened(window) is window
    assert encoder._shortened(window) is window


@pytest.mark.parametrize("paced", [True, False], ids=["real-time", "faster"])
async def test_a_final_decoded_while_others_wait_takes_a_short_window(paced: bool) -> None:
    # One worker, held: two sessions' finals wait for it. The first to get it
    # has the other waiting behind it (more to do than workers) and, if its
    # client streams in real time, is decoded on a short window; the second,
    # with nobody behind it, on the whole one. A client sending faster than
    # real time keeps the whole window. Both read the words.
    async with held_worker() as held:
        encoder = held.stt._engines[BUNDLED_MODEL].encoder
        before = encoder.short_encodes
        audio = go_forward()
        runs = [asyncio.create_task(run(held.stt, audio, paced=paced)) for _ in range(2)]
        await held.until_waiting(2)
        assert encoder.short_encodes == before  # no partial, no guess: the worker was busy
        await held.release()
        for result in await asyncio.gather(*runs):
            (final,) = finals(result.events)
            assert normalize(final.text) == "go forward ten meters"
            assert result.stream.early_finals == 0
        assert encoder.short_encodes == before + paced


@pytest.mark.parametrize("paced", [True, False], ids=["real-time", "faster"])
async def test_late_finals_of_a_real_time_stream_stop_admission(
    paced: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A final held behind a busy worker for over LATE_FINALS_S: a caller heard
    # it late, so a new session is refused even once the worker is free (callers
    # who talk without pause keep a worker busy with partials, and their finals
    # wait in short turns: no queue shows). A client sending faster than real
    # time is paced by the queue instead; its finals' lateness is not the pool's.
    monkeypatch.setattr(pool_module, "LATE_FINALS_MIN", 1)  # one session, one final
    async with held_worker() as held:
        stt = held.stt
        pending = asyncio.create_task(run(stt, go_forward(), paced=paced))
        await held.until_waiting(1)
        await asyncio.sleep(LATE_FINALS_S + 0.2)
        await held.release()
        (final,) = finals((await pending).events)
        assert normalize(final.text) == "go forward ten meters"
        await held.check_admission("whisper-tiny.en", late=paced)


def test_a_short_final_whose_readings_disagree_is_decoded_alone_on_the_whole_window(
    engines: Engines,
) -> None:
    # "five five" with its repeat loops in context (fourteen fives: the repeat
    # check rejects it). Decoded alone again on a short window it loops again;
    # on the whole window it reads as batch does.
    engine = engines.alone
    audio = read_audio(SHARED_AUDIO / "cards-004.wav")
    mismatches = engine.repeat_mismatches
    final = engine.transcribe(audio, final=True, context=audio[:0], short_window=True)
    assert engine.repeat_mismatches == mismatches + 1
    assert normalize(final.text) == "five five"


@pytest.mark.parametrize(
    ("text", "repeats"),
    [
        ("No, no.", True),
        ("5, 5, 5, 5,", True),
        ("Hello? Hello?", True),
        ("Thank you, thank you.", True),
        ("I want the red one, the red one.", True),
        ("Bye-bye.", True),
        ("Go forward ten meters.", False),
        ("That is what it is.", False),  # the same words, not in a row
        ("one two three four, one two three four", False),  # four words: past the bound
        ("", False),
    ],
)
def test_an_utterance_that_says_words_twice_in_a_row_repeats_itself(
    text: str, repeats: bool
) -> None:
    assert repeats_itself(text) is repeats


def spy_on_decodes(
    engine: WhisperEngine, monkeypatch: pytest.MonkeyPatch
) -> list[tuple[int, object, object]]:
    """Each decode the model runs from now: (samples, temperature, max_new_tokens)."""
    decoded: list[tuple[int, object, object]] = []
    model_transcribe = engine.model.transcribe

    def spy(audio: np.ndarray, **kwargs: Any) -> Any:
        decoded.append((len(audio), kwargs.get("temperature"), kwargs.get("max_new_tokens")))
        return model_transcribe(audio, **kwargs)

    monkeypatch.setattr(engine.model, "transcribe", spy)
    return decoded


def test_a_final_without_its_repeat_is_one_decode_alone_at_temperature_0(
    engines: Engines, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a final whose copies disagree gets after its decode in context,
    # without that decode: the utterance alone, on the whole window, once.
    engine = engines.alone
    decoded = spy_on_decodes(engine, monkeypatch)
    audio = read_audio(SHARED_AUDIO / "cards-004.wav")
    mismatches = engine.repeat_mismatches
    final = engine.transcribe(audio, final=True, context=audio, with_repeat=False)
    assert normalize(final.text) == "five five"
    # Not the window of context and two copies.
    assert decoded == [(len(audio), 0.0, token_budget(len(audio)))]
    assert engine.repeat_mismatches == mismatches


def test_a_final_too_long_for_its_repeat_is_one_decode_alone_at_temperature_0(
    engines: Engines, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An utterance too long to fit twice in the window (~17 s here) is decoded
    # alone, and once at temperature 0 with the token budget too: faster-whisper's
    # fallback resampled a long unsure reading up to five times, at random.
    engine = engines.alone
    decoded = spy_on_decodes(engine, monkeypatch)
    utterance = np.concatenate(
        [
            read_audio(SHARED_AUDIO / "jfk.flac"),
            read_audio(SHARED_AUDIO / "goforward.raw"),
            read_audio(SHARED_AUDIO / "sense_and_sensibility_01_austen_64kb-0880.wav"),
        ]
    )
    assert 2 * len(utterance) > WINDOW
    final = engine.transcribe(utterance, final=True, context=go_forward())
    assert "fellow americans" in normalize(final.text)
    assert decoded == [(len(utterance), 0.0, token_budget(len(utterance)))]


async def test_a_final_whose_partial_repeats_itself_is_decoded_without_its_repeat(
    stt: LocalSTT, monkeypatch: pytest.MonkeyPatch
) -> None:
    # cards-004 ("five five"): its partial reads "5, 5, 5, ..."; goforward's
    # does not repeat itself, so its final keeps its repeat.
    engine = stt._engines[BUNDLED_MODEL]
    repeats: list[bool] = []
    transcribe = engine.transcribe

    def spy(audio: np.ndarray, **kwargs: Any) -> Transcript:
        if kwargs["final"]:
            repeats.append(kwargs["with_repeat"])
        return transcribe(audio, **kwargs)

    monkeypatch.setattr(engine, "transcribe", spy)
    lead = np.zeros(SAMPLE_RATE // 2, np.int16)
    five_five = read_audio(SHARED_AUDIO / "cards-004.wav")
    for audio, expected, with_repeat in (
        (np.concatenate([lead, five_five, lead, lead]), "five five", False),
        (go_forward(), "go forward ten meters", True),
    ):
        repeats.clear()
        result = await run(stt, audio, patient=True, partials=True)
        assert [e for e in result.events if e.type is SpeechEventType.PARTIAL]
        assert [normalize(f.text) for f in finals(result.events)] == [expected]
        # The last decode is the final's (a guess dropped in the pause between
        # the fives may come before it).
        assert repeats and repeats[-1] is with_repeat, repeats


async def test_a_final_with_earlier_speech_before_it_takes_a_short_window(
    stt: LocalSTT, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A session's first final has nothing before it: the whole window. The
    # second has the first's speech in its window: a short one (as a call's
    # finals do). Both read the words.
    engine = stt._engines[BUNDLED_MODEL]
    windows: list[tuple[int, bool]] = []  # (offset_ms, short_window) of each final's decode
    transcribe = engine.transcribe

    def spy(audio: np.ndarray, **kwargs: Any) -> Transcript:
        if kwargs["final"]:
            windows.append((kwargs["offset_ms"], kwargs.get("short_window", False)))
        return transcribe(audio, **kwargs)

    monkeypatch.setattr(engine, "transcribe", spy)
    phrase = go_forward()
    result = await run(stt, np.tile(phrase, 2), patient=True)
    texts = [normalize(f.text) for f in finals(result.events)]
    assert texts == ["go forward ten meters"] * 2, texts
    second = len(phrase) * 1000 // SAMPLE_RATE
    assert {short for at, short in windows if at < second} == {False}
    assert {short for at, short in windows if at >= second} == {True}


async def test_a_failed_decode_neither_fails_the_close_nor_keeps_the_slot(
    stt: LocalSTT, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A partial's decode raised, and nobody but the close awaits a partial: the
    # session still closes, and gives its place in the engine back.
    engine = stt._engines[BUNDLED_MODEL]
    transcribe = engine.transcribe

    def failing(audio: np.ndarray, **kwargs: Any) -> Transcript:
        if not kwargs["final"]:
            raise RuntimeError("the engine failed a partial")
        return transcribe(audio, **kwargs)

    monkeypatch.setattr(engine, "transcribe", failing)
    active = stt.active["whisper"]
    stream = await stt.open_stream(StreamOptions(model=BUNDLED_MODEL))
    assert isinstance(stream, WhisperStream)
    assert stt.active["whisper"] == active + 1
    speech = read_audio(SHARED_AUDIO / "goforward.raw")
    for i in range(0, len(speech), 320):
        await stream.push_audio(speech[i : i + 320])
        if stream._partial is not None:
            break
    assert stream._partial is not None
    await asyncio.wait([stream._partial.task])
    assert isinstance(stream._partial.task.exception(), RuntimeError)
    await stream.aclose()
    assert stt.active["whisper"] == active


async def test_a_speculative_final_awaited_as_the_session_closes_is_abandoned(
    stt: LocalSTT, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The utterance ended while its speculative final decoded (held here), and
    # the stream's task waits for it: closing the session stops that decode
    # after its encoder, as it does a final decode that waits for a worker.
    engine = stt._engines[BUNDLED_MODEL]
    transcribe = engine.transcribe
    loop = asyncio.get_running_loop()
    entered, left, gate = asyncio.Event(), asyncio.Event(), threading.Event()
    flags: list[threading.Event] = []

    def held(audio: np.ndarray, **kwargs: Any) -> Transcript:
        if not kwargs["final"]:
            return transcribe(audio, **kwargs)
        flags.append(kwargs["abandoned"])
        loop.call_soon_threadsafe(entered.set)
        try:
            assert gate.wait(60)
            return transcribe(audio, **kwargs)
        finally:
            loop.call_soon_threadsafe(left.set)

    monkeypatch.setattr(engine, "transcribe", held)
    stream = await stt.open_stream(StreamOptions(model=BUNDLED_MODEL))
    assert isinstance(stream, WhisperStream)
    audio = go_forward()
    try:
        for i in range(0, len(audio), 320):
            await stream.push_audio(audio[i : i + 320])
            if stream._partial is not None:  # done: the guess finds a worker free
                await asyncio.wait([stream._partial.task])
        await entered.wait()
        # Until the stream's task has taken the utterance: it waits for the guess.
        while not stream._finals.empty():  # noqa: ASYNC110 (the queue has no event for it)
            await asyncio.sleep(0)
        assert len(flags) == 1  # the one final decode is the guess
        await stream.aclose()
        assert flags[0].is_set()
    finally:
        gate.set()
    await left.wait()


async def test_a_loaded_model_opens_while_another_model_loads(
    stt: LocalSTT, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another model's weights are on their way (a download, held here): a
    # session of the loaded model opens meanwhile, and a second session of the
    # other model waits for the same load rather than starting another.
    loop = asyncio.get_running_loop()
    resolving, gate = asyncio.Event(), threading.Event()
    resolved: list[str] = []

    def slow_resolve(name: str, *args: Any) -> str:
        resolved.append(name)
        loop.call_soon_threadsafe(resolving.set)
        gate.wait(60)
        raise ProviderUnavailable("LOCAL", f"model {name} is not installed", retryable=False)

    monkeypatch.setattr(local_module, "resolve_whisper_model", slow_resolve)
    other = StreamOptions(model="whisper-other.en")
    loads = [asyncio.create_task(stt.open_stream(other)) for _ in range(2)]
    try:
        await resolving.wait()
        opened = asyncio.create_task(stt.open_stream(StreamOptions(model=BUNDLED_MODEL)))
        done, _ = await asyncio.wait([opened, *loads], return_when=asyncio.FIRST_COMPLETED)
        assert done == {opened}
        await opened.result().aclose()
        assert resolved == ["whisper-other.en"]
    finally:
        gate.set()
    for load in loads:
        with pytest.raises(ProviderUnavailable, match="not installed"):
            await load
    assert resolved == ["whisper-other.en"]
