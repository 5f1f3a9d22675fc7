"""Voice activity (PROTOCOL.md "speech.started" / "speech.stopped", ``endpointing`` and
``vad`` tuning): Silero on real speech, and the endpointer on scripted probabilities."""

from __future__ import annotations

import asyncio
import functools
import threading
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from transcribe_gateway.audio import vad as vad_module
from transcribe_gateway.audio.decode import Samples, decode_audio, encode_mulaw
from transcribe_gateway.audio.files import read_audio
from transcribe_gateway.audio.resample import Resampler, resample
from transcribe_gateway.audio.vad import (
    FRAME,
    SAMPLE_RATE,
    TRAILING_MS,
    Endpointer,
    NarrowbandVad,
    SileroVad,
    VadEvent,
    VoiceActivity,
    Widen,
)

AUDIO = Path(__file__).resolve().parents[3] / "shared" / "audio"
SPEECH = ["goforward.raw", "jfk.flac", "sense_and_sensibility_01_austen_64kb-0870.wav"]
SECOND = SAMPLE_RATE


@functools.cache
def speech(name: str, silence_s: float = 1.0) -> Samples:
    """A shared file at 16 kHz followed by digital silence; missing audio fails, never skips."""
    path = AUDIO / name
    assert path.is_file(), f"{path} is missing: the tests need ../shared/audio beside the repo"
    samples = read_audio(path)
    return np.concatenate([samples, np.zeros(int(silence_s * SECOND), dtype=np.int16)])


def detect(samples: Samples, chunk_ms: float = 20, **options: int) -> list[tuple[str, int]]:
    activity = VoiceActivity(Endpointer(**options))
    step = max(1, int(chunk_ms * SECOND / 1000))
    events: list[VadEvent] = []
    for i in range(0, len(samples), step):
        events += activity.process(samples[i : i + step])
    assert activity.in_speech == (bool(events) and events[-1].kind == "start")
    return [(e.kind, e.sample) for e in events]


def loud_span(samples: Samples, fraction: float = 0.2) -> tuple[int, int]:
    """First and last sample of 20 ms frames whose RMS is over ``fraction`` of the loudest."""
    n = len(samples) // 320
    frames = samples[: n * 320].reshape(n, 320).astype(np.float64)
    rms = np.sqrt((frames**2).mean(axis=1))
    loud = np.flatnonzero(rms > fraction * rms.max())
    return int(loud[0]) * 320, (int(loud[-1]) + 1) * 320


def assert_alternating(events: list[tuple[str, int]]) -> None:
    kinds = [kind for kind, _ in events]
    assert kinds == ["start", "end"] * (len(kinds) // 2), events
    samples = [sample for _, sample in events]
    assert samples == sorted(samples), events


class TestSileroOnSpeech:
    @pytest.mark.parametrize("name", SPEECH)
    def test_vad_reports_alternating_events(self, name: str) -> None:
        events = detect(speech(name))
        assert len(events) >= 2
        assert_alternating(events)

    @pytest.mark.parametrize("name", SPEECH)
    def test_vad_brackets_the_words(self, name: str) -> None:
        samples = speech(name)
        first_word, last_word = loud_span(samples)
        events = detect(samples)
        start, end = events[0][1], events[-1][1]
        assert start <= first_word, (start, first_word)
        assert end >= last_word, (end, last_word)
        # ...and not by much: the padding is 300 ms, the rest is quiet breath.
        assert first_word - start < SECOND
        assert end - last_word < SECOND
        assert end <= len(samples)

    def test_vad_finds_one_utterance_in_a_command(self) -> None:
        assert len(detect(speech("goforward.raw"))) == 2

    def test_vad_splits_jfk_at_short_endpointing(self) -> None:
        samples = speech("jfk.flac", silence_s=2.0)
        short = detect(samples, endpointing_ms=500)
        long = detect(samples, endpointing_ms=1500)
        assert_alternating(short)
        assert_alternating(long)
        assert len(short) // 2 >= 3  # "...fellow Americans / ask not / what your country..."
        assert 1 <= len(long) // 2 < len(short) // 2
        # Same speech, so the same outer bounds.
        assert abs(short[0][1] - long[0][1]) <= FRAME

    @pytest.mark.parametrize("chunk_ms", [7, 100, 1000])
    @pytest.mark.parametrize("name", ["jfk.flac", "goforward.raw"])
    def test_vad_does_not_depend_on_chunk_size(self, name: str, chunk_ms: int) -> None:
        samples = speech(name)
        assert detect(samples, chunk_ms) == detect(samples, 20)

    def test_vad_takes_a_whole_file_at_once(self) -> None:
        samples = speech("jfk.flac")
        activity = VoiceActivity(Endpointer())
        whole = [(e.kind, e.sample) for e in activity.process(samples)]
        assert whole == detect(samples, 20)

    def test_silero_probabilities_do_not_depend_on_chunk_size(self) -> None:
        samples = speech("goforward.raw")

        def probs(step: int) -> npt.NDArray[np.float32]:
            vad = SileroVad()
            return np.concatenate(
                [vad.process(samples[i : i + step]) for i in range(0, len(samples), step)]
            )

        a, b = probs(320), probs(1601)
        assert len(a) == len(b) == len(samples) // FRAME
        np.testing.assert_allclose(a, b, atol=1e-4)
        assert a.max() > 0.9 and a.min() < 0.1

    def test_vad_cuts_long_utterances(self) -> None:
        samples = speech("sense_and_sensibility_01_austen_64kb-0870.wav")
        events = detect(samples, max_utterance_ms=2000)
        assert_alternating(events)
        assert len(events) // 2 >= 3
        starts = dict.fromkeys(s for k, s in events if k == "start")
        cuts = [s for k, s in events if k == "end" and s in starts]
        assert len(cuts) >= 2  # an end and a new start at the same sample
        for (_, start), (_, end) in zip(events[::2], events[1::2], strict=True):
            assert end - start <= 2 * SECOND + FRAME


class TestSileroOnNonSpeech:
    def test_vad_ignores_digital_silence(self) -> None:
        assert detect(np.zeros(5 * SECOND, dtype=np.int16)) == []

    @pytest.mark.parametrize("std", [30.0, 100.0])
    def test_vad_ignores_low_white_noise(self, std: float) -> None:
        rng = np.random.default_rng(20240601)
        noise = np.clip(rng.normal(0, std, 5 * SECOND), -32768, 32767).astype(np.int16)
        assert detect(noise) == []

    def test_vad_ignores_empty_chunks(self) -> None:
        activity = VoiceActivity(Endpointer())
        assert activity.process(np.zeros(0, dtype=np.int16)) == []
        assert not activity.in_speech


# ----------------------------------------------------- endpointer on its own


def probs(*runs: tuple[float, int]) -> npt.NDArray[np.float32]:
    """Frame probabilities from (value, number of frames) runs."""
    return np.concatenate([np.full(n, p, dtype=np.float32) for p, n in runs])


def endpoint(p: npt.NDArray[np.float32], **options: Any) -> list[tuple[str, int]]:
    return [(e.kind, e.sample) for e in Endpointer(**options).process(p)]


class TestEndpointer:
    def test_endpointer_reports_one_utterance(self) -> None:
        # 32 ms frames: speech from frame 20 to 49, then silence.
        events = endpoint(probs((0.0, 20), (0.9, 30), (0.0, 40)))
        pad = 300 * SAMPLE_RATE // 1000
        assert events[0] == ("start", 20 * FRAME - pad)
        assert events[1][0] == "end"
        # Ends a little after the last voiced frame, once 500 ms of silence passed.
        assert events[1][1] == 50 * FRAME + TRAILING_MS * SAMPLE_RATE // 1000
        assert len(events) == 2

    @pytest.mark.parametrize(
        ("options", "trailing_ms"),
        [
            ({}, TRAILING_MS),
            ({"prefix_padding_ms": 100}, 50),  # never more than half the prefix padding
            ({"prefix_padding_ms": 0}, 0),
            ({"endpointing_ms": 10}, 32),  # nor past the frame that completes the endpoint
        ],
    )
    def test_endpointer_says_how_far_past_the_speech_it_dates_an_end(
        self, options: dict[str, int], trailing_ms: int
    ) -> None:
        # What a client adds back to end_ms to find the end of speech (bench/local_engine.py).
        endpointer = Endpointer(**options)
        end = [e for e in endpointer.process(probs((0.9, 30), (0.0, 40))) if e.kind == "end"]
        assert endpointer.trailing_ms == trailing_ms
        assert end[0].sample == 30 * FRAME + trailing_ms * SAMPLE_RATE // 1000

    def test_endpointer_ignores_blips_shorter_than_min_speech(self) -> None:
        # min_speech_ms=100 needs 4 frames of 32 ms.
        assert endpoint(probs((0.0, 10), (0.9, 3), (0.0, 40))) == []
        assert endpoint(probs((0.0, 10), (0.9, 4), (0.0, 40)))[0][0] == "start"

    def test_endpointer_holds_through_short_pauses(self) -> None:
        # 320 ms of silence is under the 500 ms endpointing.
        events = endpoint(probs((0.9, 20), (0.0, 10), (0.9, 20), (0.0, 40)))
        assert [k for k, _ in events] == ["start", "end"]

    def test_endpointer_splits_on_long_pauses(self) -> None:
        events = endpoint(probs((0.9, 20), (0.0, 30), (0.9, 20), (0.0, 40)))
        assert [k for k, _ in events] == ["start", "end", "start", "end"]

    def test_endpointer_uses_hysteresis(self) -> None:
        # 0.4 is under the 0.5 start threshold but over the 0.35 stop threshold.
        assert endpoint(probs((0.4, 50))) == []
        events = endpoint(probs((0.9, 10), (0.4, 50), (0.0, 40)))
        assert [k for k, _ in events] == ["start", "end"]
        assert events[1][1] >= 60 * FRAME

    def test_endpointer_ends_now_when_told(self) -> None:
        # Semantic endpointing: the engine ends an utterance before the silence is
        # complete, at the end it would have had, and the endpointer moves on.
        endpointer = Endpointer(endpointing_ms=1500)
        assert endpointer.end_now() is None  # nothing open
        assert [e.kind for e in endpointer.process(probs((0.9, 20)))] == ["start"]
        assert endpointer.end_now() is None  # no silence yet: no pending end
        assert endpointer.process(probs((0.0, 16))) == []  # 512 ms of silence, under 1500
        pending = endpointer.pending_end
        assert pending == 20 * FRAME + TRAILING_MS * SAMPLE_RATE // 1000
        event = endpointer.end_now()
        assert event is not None and (event.kind, event.sample) == ("end", pending)
        assert not endpointer.in_speech and endpointer.end_now() is None
        # More silence ends nothing twice; new speech starts a new utterance.
        assert endpointer.process(probs((0.0, 60))) == []
        assert [e.kind for e in endpointer.process(probs((0.9, 10)))] == ["start"]

    def test_an_end_told_early_is_never_past_what_it_saw(self) -> None:
        # endpointing 10 ms told early after one silent frame: the trailing margin
        # (96 ms, capped by the long endpointing's silence) would reach past it.
        endpointer = Endpointer(endpointing_ms=1000)
        endpointer.process(probs((0.9, 10), (0.0, 1)))
        event = endpointer.end_now()
        assert event is not None and event.sample <= 11 * FRAME

    def test_endpointer_never_starts_before_the_stream(self) -> None:
        assert endpoint(probs((0.9, 10), (0.0, 30)))[0] == ("start", 0)

    def test_endpointer_never_ends_past_what_it_saw(self) -> None:
        events = endpoint(probs((0.9, 10), (0.0, 1)), endpointing_ms=10)
        assert events[-1] == ("end", 11 * FRAME)

    def test_endpointer_cuts_at_max_utterance(self) -> None:
        events = endpoint(probs((0.9, 100)), max_utterance_ms=1000, prefix_padding_ms=0)
        limit = 1000 * SAMPLE_RATE // 1000
        assert events[0] == ("start", 0)
        cut = -(-limit // FRAME) * FRAME  # the first frame boundary at or past 1 s
        assert events == [
            ("start", 0),
            ("end", cut),
            ("start", cut),
            ("end", 2 * cut),
            ("start", 2 * cut),
            ("end", 3 * cut),
            ("start", 3 * cut),
        ]

    def test_endpointer_is_incremental(self) -> None:
        p = probs((0.0, 7), (0.9, 33), (0.0, 20), (0.8, 9), (0.0, 30))
        endpointer = Endpointer()
        split = [
            (e.kind, e.sample) for i in range(len(p)) for e in endpointer.process(p[i : i + 1])
        ]
        assert split == endpoint(p)

    @pytest.mark.parametrize(
        ("endpointing_ms", "prefix_padding_ms"), [(10, 300), (300, 300), (500, 1000)]
    )
    def test_endpointer_never_overlaps_utterances(
        self, endpointing_ms: int, prefix_padding_ms: int
    ) -> None:
        silence = -(-endpointing_ms // 32)
        events = endpoint(
            probs((0.9, 10), (0.0, silence), (0.9, 10), (0.0, 70)),
            endpointing_ms=endpointing_ms,
            prefix_padding_ms=prefix_padding_ms,
        )
        assert [k for k, _ in events] == ["start", "end", "start", "end"]
        assert_alternating(events)


class TestPhoneLine:
    """8 kHz audio resampled to 16 kHz: nothing above 4 kHz, which Silero needs."""

    @staticmethod
    def phone(name: str) -> list[Samples]:
        """A file as an 8 kHz mu-law session's engine receives it: 20 ms chunks at 16 kHz."""
        narrow = decode_audio(encode_mulaw(resample(speech(name), SAMPLE_RATE, 8000)), "mulaw")
        up = Resampler(8000, SAMPLE_RATE)
        return [up.push(narrow[i : i + 160]) for i in range(0, len(narrow), 160)]

    @staticmethod
    def starts(chunks: list[Samples], narrowband: bool) -> list[int]:
        activity = VoiceActivity(Endpointer(), narrowband=narrowband)
        events = [e for chunk in chunks for e in activity.process(chunk)]
        return [e.sample for e in events if e.kind == "start"]

    def test_widen_is_the_same_in_chunks_of_any_size(self) -> None:
        samples = np.random.default_rng(3).integers(-3000, 3000, 10001).astype(np.int16)
        whole = Widen().process(samples)
        widen, sizes = Widen(), np.random.default_rng(4).integers(0, 7, len(samples))
        bounds = np.cumsum(sizes)[np.cumsum(sizes) < len(samples)]
        parts = [widen.process(p) for p in np.split(samples, bounds)]
        assert np.array_equal(np.concatenate(parts), whole)
        # The 8 kHz samples (even indexes), each preceded by the mean of it and the last.
        even = samples[::2].astype(np.int32)
        assert len(whole) == 2 * len(even)
        assert np.array_equal(whole[1::2], even)
        assert np.array_equal(whole[2::2], (even[:-1] + even[1:]) // 2)

    def test_narrowband_hears_the_onset_the_plain_model_misses(self) -> None:
        # cards-005 begins "eight of spades" at once: at 16 kHz Silero starts at
        # 0; on the phone line's audio as it is, only at "four of clubs" (>1 s).
        chunks = self.phone("cards-005.wav")
        assert self.starts(chunks, narrowband=False)[0] > SECOND
        assert self.starts(chunks, narrowband=True)[0] < 0.3 * SECOND

    @pytest.mark.parametrize("name", SPEECH)
    def test_narrowband_gives_a_probability_per_frame(self, name: str) -> None:
        chunks = self.phone(name)
        plain, narrow = SileroVad(), NarrowbandVad()
        counts = np.array([(len(plain.process(c)), len(narrow.process(c))) for c in chunks])
        # As many frames as Silero alone, at most one behind at any chunk (the
        # widened audio may lag by a sample).
        behind = counts[:, 0].cumsum() - counts[:, 1].cumsum()
        assert behind.min() >= 0 and behind.max() <= 1


class TestOffTheLoop:
    """A long chunk is heard on a worker thread (a client sending faster than real
    time must not stall the event loop, every session's); a short one inline."""

    async def test_a_long_chunk_is_heard_on_a_thread_with_the_same_boundaries(self) -> None:
        audio = np.concatenate([speech("goforward.raw"), speech("jfk.flac")])
        expected = VoiceActivity(Endpointer(), narrowband=True).process(audio)
        assert expected
        activity = VoiceActivity(Endpointer(), narrowband=True)
        heard_on: list[threading.Thread] = []
        process = activity._vad.process

        def spy(samples: Samples) -> npt.NDArray[np.float32]:
            heard_on.append(threading.current_thread())
            return process(samples)

        activity._vad.process = spy  # type: ignore[method-assign]
        assert not activity.inline(audio)
        assert await activity.process_async(audio) == expected
        assert heard_on[-1] is not threading.main_thread()
        short = np.zeros(vad_module.OFF_LOOP_SAMPLES, np.int16)
        assert activity.inline(short)
        await activity.process_async(short)
        assert heard_on[-1] is threading.main_thread()  # no thread hop for a short one

    async def test_a_chunk_whose_caller_was_cancelled_is_heard_before_the_next(self) -> None:
        # Its caller gone (the session ending), the thread still hears the chunk and
        # Silero's state moves on with it: its boundaries come first with the next
        # chunk's, in order, as if nothing had been cancelled; never two chunks on
        # Silero at once.
        first, second = (
            speech("goforward.raw"),
            speech("sense_and_sensibility_01_austen_64kb-0870.wav"),
        )
        reference = VoiceActivity(Endpointer())
        expected = reference.process(first) + reference.process(second)
        activity = VoiceActivity(Endpointer())
        gate = threading.Event()
        process = activity._vad.process

        def held(samples: Samples) -> npt.NDArray[np.float32]:
            assert gate.wait(30)
            return process(samples)

        activity._vad.process = held  # type: ignore[method-assign]
        hearing = asyncio.create_task(activity.process_async(first))
        await asyncio.sleep(0.05)
        assert not activity.inline(second[:320])  # a short chunk must wait its turn
        hearing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await hearing
        assert activity.heard == len(first)  # taken: its caller's buffer must keep it
        gate.set()
        assert await activity.process_async(second) == expected

    async def test_short_chunks_taken_at_once_let_the_loop_run_every_second_of_audio(
        self,
    ) -> None:
        # Chunks heard inline one after the other, with no turn of the loop between
        # them (a flood the gateway reads at once), stop being taken inline past
        # INLINE_RUN_MS: the next one waits for the loop (process_async).
        activity = VoiceActivity(Endpointer())
        chunk = np.zeros(320, np.int16)
        taken = 0
        while activity.inline(chunk):
            activity.process(chunk)
            taken += 1
        assert taken == vad_module.INLINE_RUN_SAMPLES // 320
        await asyncio.sleep(0)  # the loop runs: inline again
        assert activity.inline(chunk)
