"""Benchmark of the embedded engine (LOCAL): accuracy, latency, real-time factor, sessions per core.

Run by hand (never in CI), from the repository root:

    .venv/bin/python bench/local_engine.py [--model whisper-tiny.en] [--sessions 1,2,4,8,12,16] [--runs 3]
        [--sessions-all-cores 8,16,20]   # the same on every core, a decode worker each
    .venv/bin/python bench/local_engine.py --synth [...]   # synthesized speech (needs espeak-ng)
    .venv/bin/python bench/local_engine.py --endpointing 1500 --sessions ''   # accuracy at a longer pause
    .venv/bin/python bench/local_engine.py --heldout --unfinished 1500 --sessions ''   # semantic endpointing
    .venv/bin/python bench/local_engine.py --heldout --calls --sessions ''   # a session per voice
    .venv/bin/python bench/local_engine.py --heldout --calls --sessions 4,8 --probe 30   # admission
    TRANSCRIBE_CONFIG=models.toml .venv/bin/python bench/local_engine.py --model whisper-base --sessions ''
        # a model of [local.whisper_models] (batch and the gateway both read that config)

It starts a real gateway process (pinned to core 0 with ``taskset`` for the
capacity part, one decode worker; then, with ``--sessions-all-cores``, on every
core with the default pool, to show sessions scale with cores) and streams ``../shared/audio`` through
``/ws`` in real time, 20 ms chunks, as a phone or a browser would.  Latencies are
measured on the client: the wall time a final arrived minus the wall time the
audio of the end of speech was sent, less the endpointing silence.  The end of
speech is the final's ``end_ms`` less the little silence the VAD keeps after
the last voiced frame (``Endpointer.trailing_ms``, 96 ms by default).  Results
are printed as a Markdown block for BENCHMARKS.md.

With ``--unfinished MS`` the sessions ask for semantic endpointing
(``endpointing_unfinished``); a held final's wait beyond ``--endpointing``
counts in its latency.  ``--heldout`` streams ``SYNTH_HELDOUT`` (below), ``--fresh``
``SYNTH_FRESH``, ``--repeats`` ``SYNTH_REPEATS``.

With ``--calls`` (synthesized sets) each voice's clips are streamed one after
another as one session, a call of many turns, instead of a session per clip.

With ``--probe S`` each capacity run opens one session more, S seconds in, and
reports whether the gateway admitted it (admission control: LOCAL refuses a new
session with a retryable ``provider_unavailable`` while it is behind real time,
``DecodePool.saturated``; the count limit is lifted here, so the probe sees that
check alone).  Each capacity run starts after the pool has idled long enough
(``IDLE_FORGETS_S``) for that check to forget the last.

With ``--synth`` the clips are synthesized speech instead, spoken by espeak-ng
(a system package: ``apt-get install espeak-ng``): ``SYNTH``, sentences with
numbers, commands and pauses in one voice, and ``SYNTH_TURNS``, clips of two or
three sentences with a pause after each (a new utterance each) in three voices:
known words in voices unlike the recordings, 38 clips, ~450 words.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
import websockets

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from tests.conftest import free_port  # noqa: E402
from tests.textnorm import LIBRIVOX, SHARED_AUDIO, corpus_wer, normalize, references  # noqa: E402

from transcribe_gateway.audio.files import read_audio  # noqa: E402
from transcribe_gateway.audio.vad import SAMPLE_RATE, Endpointer  # noqa: E402
from transcribe_gateway.providers.pool import IDLE_FORGETS_S  # noqa: E402

if TYPE_CHECKING:
    from transcribe_gateway.providers.whisper_engine import WhisperEngine

KEY = "bench-key"
ENDPOINTING_MS = 500
SYNTH: dict[str, str] = {
    "synth-weather": "The weather today is sunny, with a high of seventy two degrees.",
    "synth-order": "I would like to order two large pizzas. One with mushrooms, one without.",
    "synth-account": "My order number is twelve, and I need it delivered by Friday.",
    "synth-meeting": "Please move the meeting to Thursday at three thirty. Thank you.",
    "synth-robot": "Turn left, go forward ten meters, then stop.",
    "synth-story": "She opened the old wooden door slowly. Inside, the room was dark and quiet.",
    "synth-support": "My internet connection keeps dropping every evening around eight o'clock.",
    "synth-travel": "The train to Boston leaves from platform nine at a quarter past six.",
}
"""Synthesized clips (``--synth``), one espeak-ng call each (US voice): name -> text."""
SYNTH_TURNS: dict[str, tuple[str, tuple[str, ...]]] = {
    "h01": (
        "en-us",
        (
            "The birch canoe slid on the smooth planks.",
            "Glue the sheet to the dark blue background.",
        ),
    ),
    "h02": (
        "en-gb",
        ("It's easy to tell the depth of a well.", "These days a chicken leg is a rare dish."),
    ),
    "h03": (
        "en-us+f3",
        ("Rice is often served in round bowls.", "The juice of lemons makes fine punch."),
    ),
    "h04": (
        "en-us",
        (
            "The box was thrown beside the parked truck.",
            "The hogs were fed chopped corn and garbage.",
        ),
    ),
    "h05": (
        "en-gb",
        ("Four hours of steady work faced us.", "A large size in stockings is hard to sell."),
    ),
    "h06": (
        "en-us+f3",
        ("The boy was there when the sun rose.", "A rod is used to catch pink salmon."),
    ),
    "h07": (
        "en-us",
        (
            "The source of the huge river is the clear spring.",
            "Kick the ball straight and follow through.",
        ),
    ),
    "h08": (
        "en-gb",
        ("Help the woman get back to her feet.", "A pot of tea helps to pass the evening."),
    ),
    "h09": (
        "en-us+f3",
        ("Smoky fires lack flame and heat.", "The soft cushion broke the man's fall."),
    ),
    "h10": (
        "en-us",
        ("The salt breeze came across from the sea.", "The girl at the booth sold fifty bonds."),
    ),
    "h11": (
        "en-gb",
        (
            "The small pup gnawed a hole in the sock.",
            "The fish twisted and turned on the bent hook.",
        ),
    ),
    "h12": (
        "en-us+f3",
        (
            "Press the pants and sew a button on the vest.",
            "The swan dive was far short of perfect.",
        ),
    ),
    "h13": (
        "en-us",
        ("The beauty of the view stunned the young boy.", "Two blue fish swam in the tank."),
    ),
    "h14": (
        "en-gb",
        ("Her purse was full of useless trash.", "The colt reared and threw the tall rider."),
    ),
    "a01": ("en-us", ("Okay.", "Let me check that for you.")),
    "a02": ("en-gb", ("Yes, please.", "Book it for Monday morning.")),
    "a03": ("en-us+f3", ("Hello.", "I am calling about my bill.")),
    "a04": ("en-us", ("No, thanks.", "That will be all for today.")),
    "a05": ("en-gb", ("Sure.", "My zip code is nine four one one zero.")),
    "a06": ("en-us+f3", ("Good morning.", "I would like to speak to a manager.")),
    "a07": ("en-us", ("Hold on.", "I need to find my card.")),
    "a08": ("en-gb", ("Thank you.", "Goodbye.")),
    "a09": ("en-us+f3", ("Cancel my order.", "It has not shipped yet.")),
    "a10": ("en-us", ("Can you repeat that?", "I did not hear the last part.")),
    "a11": ("en-gb", ("What time do you close?", "Is it open on Sunday?")),
    "a12": ("en-us+f3", ("Right.", "And the total is forty dollars?")),
    "a13": ("en-us", ("Please move the meeting to Thursday at three thirty.", "Thank you.")),
    "a14": ("en-gb", ("Turn left.", "Go forward ten meters.", "Then stop.")),
    "a15": (
        "en-us+f3",
        ("The train to Boston leaves from platform nine.", "At a quarter past six."),
    ),
    "a16": ("en-us", ("My name is Sarah.", "I live on Oak Street.")),
}
"""More clips (``--synth``): name -> (voice, sentences), the sentences spoken one by one
with :data:`SYNTH_PAUSE_S` of silence between, so each is its own utterance (as callers
speak).  Harvard sentences (IEEE 1969) and short voice-agent turns, in three voices."""
SYNTH_PAUSE_S = 0.8
SYNTH_HELDOUT: dict[str, tuple[str, tuple[str, ...]]] = {
    "h1": (
        "en-us+m3",
        ("The wide road shimmered in the hot sun.", "The lazy cow lay in the cool grass."),
    ),
    "h2": (
        "en-gb-x-rp",
        ("Lift the square stone over the fence.", "The rope will bind the seven books at once."),
    ),
    "h3": (
        "en-us+f2",
        ("Hop over the fence and plunge in.", "The friendly gang left the drug store."),
    ),
    "h4": (
        "en-gb-scotland",
        ("Mesh wire keeps chicks inside.", "The frosty air passed through the coat."),
    ),
    "h5": (
        "en-us+m3",
        ("The crooked maze failed to fool the mouse.", "Adding fast leads to wrong sums."),
    ),
    "h6": (
        "en-gb-x-rp",
        ("The show was a flop from the very start.", "A saw is a tool used for making boards."),
    ),
    "h7": (
        "en-us+f2",
        ("The wagon moved on well oiled wheels.", "March the soldiers past the next hill."),
    ),
    "h8": (
        "en-gb-scotland",
        ("A cup of sugar makes sweet fudge.", "Place a rosebush near the porch steps."),
    ),
    "h9": (
        "en-us+m3",
        ("Both lost their lives in the raging storm.", "We talked of the side show in the circus."),
    ),
    "h10": (
        "en-gb-x-rp",
        ("Use a pencil to write the first draft.", "He ran half way to the hardware store."),
    ),
    "h11": (
        "en-us+f2",
        ("The clock struck to mark the third period.", "A small creek cut across the field."),
    ),
    "h12": (
        "en-gb-scotland",
        ("Cars and busses stalled in snow drifts.", "The set of china hit the floor with a crash."),
    ),
    "h13": (
        "en-us+m3",
        (
            "The dune rose from the edge of the water.",
            "Those words were the cue for the actor to leave.",
        ),
    ),
    "h14": (
        "en-gb-x-rp",
        ("A yacht slid around the point into the bay.", "The two met while playing on the sand."),
    ),
    "h15": (
        "en-us+f2",
        (
            "The ink stain dried on the finished page.",
            "The walled town was seized without a fight.",
        ),
    ),
    "h16": (
        "en-gb-scotland",
        ("A tame squirrel makes a nice pet.", "The horn of the car woke the sleeping cop."),
    ),
    "h17": (
        "en-us+m3",
        ("The pearl was worn in a thin silver ring.", "The fruit peel was cut in thick slices."),
    ),
    "a1": ("en-gb-x-rp", ("Hi.", "I want to change my address.")),
    "a2": ("en-us+f2", ("Yes.", "The account number is five five two eight.")),
    "a3": ("en-gb-scotland", ("Not really.", "Can you send me an email instead?")),
    "a4": ("en-us+m3", ("Perfect.", "See you on Friday at noon.")),
    "a5": ("en-gb-x-rp", ("One moment.", "Let me get my glasses.")),
    "a6": ("en-us+f2", ("Great.", "What is the next step?")),
    "a7": ("en-gb-scotland", ("Sorry.", "I missed that.", "Could you say it again?")),
    "a8": ("en-us+m3", ("No.", "I never got the package.")),
    "p1": ("en-gb-x-rp", ("And so,", "my fellow citizens,", "we begin again.")),
    "p2": ("en-us+f2", ("Well,", "I think that", "should be fine.")),
    "p3": ("en-gb-scotland", ("If you could,", "please send the invoice", "by tomorrow.")),
    "p4": ("en-us+m3", ("My order number", "is four two seven.")),
    "p5": ("en-gb-x-rp", ("The thing is,", "I was never charged", "for the first month.")),
    "p6": ("en-us+f2", ("So what I need", "is a refund.")),
    "p7": ("en-gb-scotland", ("First,", "open the settings,", "then press save.")),
    "p8": ("en-us+m3", ("Honestly,", "the second option", "sounds better to me.")),
}
"""Held out (``--heldout``, for bench/final_variants.py): clips no setting was chosen on,
spoken like ``SYNTH_TURNS`` but in four other voices.  ``h``: Harvard sentences not
in ``SYNTH_TURNS``; ``a``: voice-agent turns; ``p``: one sentence spoken in pieces
with a pause after each, as a caller thinking aloud (and as ``jfk.flac``)."""
SYNTH_FRESH: dict[str, tuple[str, tuple[str, ...]]] = {
    "f1": (
        "en-us+f4",
        ("Hoist the load to your left shoulder.", "Take the winding path to reach the lake."),
    ),
    "f2": (
        "en-gb-x-gbclan",
        ("Note closely the size of the gas tank.", "Wipe the grease off his dirty face."),
    ),
    "f3": (
        "en-029",
        ("Mend the coat before you go out.", "The wrist was badly strained and hung limp."),
    ),
    "f4": (
        "en-us-nyc",
        ("The stray cat gave birth to kittens.", "The young girl gave no clear response."),
    ),
    "f5": (
        "en-us+f4",
        ("The meal was cooked before the bell rang.", "What joy there is in living."),
    ),
    "f6": (
        "en-gb-x-gbclan",
        ("A king ruled the state in the early days.", "The ship was torn apart on the sharp reef."),
    ),
    "f7": (
        "en-029",
        (
            "Sickness kept him home the third week.",
            "It snowed, rained, and hailed the same morning.",
        ),
    ),
    "f8": (
        "en-us-nyc",
        ("Read verse out loud for pleasure.", "The navy attacked the big task force."),
    ),
    "f9": (
        "en-us+f4",
        ("See the cat glaring at the scared mouse.", "There are more than two factors here."),
    ),
    "f10": (
        "en-gb-x-gbclan",
        ("The hat brim is wide and too droopy.", "The lawyer tried to lose his case."),
    ),
    "f11": ("en-029", ("The grass curled around the fence post.", "Cut the pie into large parts.")),
    "f12": ("en-us-nyc", ("Men strive but seldom get rich.", "Always close the barn door tight.")),
    "f13": (
        "en-us+f4",
        ("He lay prone and hardly moved a limb.", "The slush lay deep along the street."),
    ),
    "f14": (
        "en-gb-x-gbclan",
        ("A wisp of cloud hung in the blue air.", "A pound of sugar costs more than eggs."),
    ),
    "f15": (
        "en-029",
        ("The fin was sharp and cut the clear water.", "The play seems dull and quite stupid."),
    ),
    "f16": (
        "en-us-nyc",
        ("Bail the boat to stop it from sinking.", "The term ended in late June that year."),
    ),
    "b1": ("en-us+f4", ("Hello there.", "I need help with my router.")),
    "b2": ("en-gb-x-gbclan", ("Okay, got it.", "What is your phone number?")),
    "b3": ("en-029", ("Absolutely.", "Send it to my work address.")),
    "b4": ("en-us-nyc", ("Not yet.", "The technician never showed up.")),
    "b5": ("en-us+f4", ("Let me think.", "Maybe next Tuesday works.")),
    "b6": ("en-gb-x-gbclan", ("That's right.", "It was twenty five dollars.")),
    "b7": ("en-029", ("Wait.", "Can you spell that for me?")),
    "b8": ("en-us-nyc", ("Thanks a lot.", "Have a good day.")),
    "q1": ("en-us+f4", ("To be honest,", "I expected", "a faster answer.")),
    "q2": ("en-gb-x-gbclan", ("Well, actually,", "the date", "is wrong.")),
    "q3": ("en-029", ("When you get a chance,", "call me back", "after lunch.")),
    "q4": ("en-us-nyc", ("The code", "is three one nine.")),
    "q5": ("en-us+f4", ("In that case,", "I would rather", "cancel the plan.")),
    "q6": ("en-gb-x-gbclan", ("Look,", "all I want", "is my money back.")),
    "q7": ("en-029", ("Second,", "check the cable,", "then restart it.")),
    "q8": ("en-us-nyc", ("Frankly,", "neither option", "works for me.")),
}
"""A second held-out set (``--fresh``), made on 2026-11-26 to check a setting chosen
with the help of ``SYNTH_HELDOUT`` on clips nothing was yet chosen on: the same
three kinds (``f``: Harvard sentences in neither set, ``b``: agent turns, ``q``:
sentences in pieces) in four voices neither set uses."""
_REPEATED = (
    ("No, no, no.", "That is not my address."),
    ("Yes, yes.", "Go ahead."),
    ("Thank you, thank you.", "That helps a lot."),
    ("Sorry, sorry.", "I missed that."),
    ("Hello? Hello?", "Can you hear me?"),
    ("Okay, okay.", "Let me check."),
    ("Wait, wait.", "Not that one."),
    ("Right, right.", "The blue one."),
)
_REPEAT_VOICES = ("en-us", "en-gb-x-rp", "en-us+f2", "en-us+m3", "en-gb-scotland")
SYNTH_REPEATS: dict[str, tuple[str, tuple[str, ...]]] = {
    f"r{i + 1}-{voice}": (voice, turn)
    for i, turn in enumerate(_REPEATED)
    for voice in (_REPEAT_VOICES[:3] if i % 2 else _REPEAT_VOICES[2:])
}
"""Utterances that say a word or a phrase twice in a row (``--repeats``), as callers
do ("No, no, no."; "Hello? Hello?"), each followed by a plain sentence: 24 clips in
the voices of the sets above, made on 2026-12-07 (BENCHMARKS.md, *Utterances that
repeat themselves*)."""
ClipSet = Literal["recordings", "synth", "heldout", "fresh", "repeats"]
SPOKEN: dict[ClipSet, dict[str, tuple[str, tuple[str, ...]]]] = {
    "synth": SYNTH_TURNS,
    "heldout": SYNTH_HELDOUT,
    "fresh": SYNTH_FRESH,
    "repeats": SYNTH_REPEATS,
}
"""Each synthesized set's clips of sentences spoken one by one (``synth`` has ``SYNTH`` too)."""


def add_clip_set_arguments(parser: argparse.ArgumentParser) -> None:
    """``--synth``, ``--heldout`` and ``--fresh``: which clips a benchmark reads."""
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--synth", action="store_true", help="synthesized speech (espeak-ng)")
    which.add_argument(
        "--heldout", action="store_true", help="the held-out synthesized set (SYNTH_HELDOUT)"
    )
    which.add_argument("--fresh", action="store_true", help="the second held-out set (SYNTH_FRESH)")
    which.add_argument(
        "--repeats", action="store_true", help="phrases said twice in a row (SYNTH_REPEATS)"
    )


def clip_set_of(args: argparse.Namespace) -> ClipSet:
    """The clip set ``add_clip_set_arguments``' flags chose (the recordings by default)."""
    return next((name for name in SPOKEN if getattr(args, name)), "recordings")


def synthesize(
    directory: Path, clip_set: ClipSet = "synth"
) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, list[str]]]:
    """Speak ``SYNTH`` and ``SYNTH_TURNS`` (or ``SYNTH_HELDOUT``, ``SYNTH_FRESH``) with
    espeak-ng: clips at 16 kHz, references, groups."""

    def speak(voice: str, text: str, path: Path) -> np.ndarray:
        subprocess.run(["espeak-ng", "-v", voice, "-s", "165", "-w", str(path), text], check=True)
        return read_audio(path)

    clips: dict[str, np.ndarray] = {}
    refs: dict[str, str] = {}
    if clip_set == "synth":
        clips = {n: speak("en-us", text, directory / f"{n}.wav") for n, text in SYNTH.items()}
        refs = {name: normalize(text) for name, text in SYNTH.items()}
    pause = np.zeros(int(SYNTH_PAUSE_S * SAMPLE_RATE), dtype=np.int16)
    for name, (voice, sentences) in SPOKEN[clip_set].items():
        parts = [pause[:4800]]
        for k, text in enumerate(sentences):
            parts += [speak(voice, text, directory / f"{name}-{k}.wav"), pause]
        clips[name] = np.concatenate(parts)
        refs[name] = normalize(" ".join(sentences))
    if clip_set == "synth":
        groups = {
            "sentences (en-us)": list(SYNTH),
            "turns (3 voices)": list(SYNTH_TURNS),
            "all synthesized": list(refs),
        }
        return clips, refs, groups
    if clip_set == "repeats":
        return clips, refs, {"repeated phrases (5 voices)": list(refs)}
    # The held-out sets: each name's first letter is its kind.
    kinds = ("h", "a", "p") if clip_set == "heldout" else ("f", "b", "q")
    labels = ("Harvard", "agent turns", "paused phrases")
    groups = {
        f"{label} (4 voices)": [n for n in refs if n[0] == kind]
        for kind, label in zip(kinds, labels, strict=True)
    }
    everything = "all held out" if clip_set == "heldout" else "all fresh"
    return clips, refs, {**groups, everything: list(refs)}


def load_clips(
    clip_set: ClipSet,
) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, list[str]]]:
    """The clips to stream (each followed by a second of silence), references, groups."""
    if clip_set != "recordings":
        with tempfile.TemporaryDirectory() as tmp:
            spoken, refs, groups = synthesize(Path(tmp), clip_set)
    else:
        refs = references()
        spoken = {n: read_audio(SHARED_AUDIO / n) for n in refs}
        groups = {"LibriVox": LIBRIVOX, "all files": list(refs)}
    trail = np.zeros(SAMPLE_RATE, dtype=np.int16)
    return {n: np.concatenate([a, trail]) for n, a in spoken.items()}, refs, groups


def calls(
    clips: dict[str, np.ndarray],
    refs: dict[str, str],
    spoken: dict[str, tuple[str, tuple[str, ...]]],
) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, list[str]], dict[str, list[str]]]:
    """Each voice's clips of ``spoken`` (each with its second of silence after it) one
    after another, in the set's order, as one clip: a call of many turns in one
    session; ``SYNTH``'s single sentences stay as they are.  Clips, references,
    groups ("sentences" if any, and "all calls"), and the clips each call joins."""
    members: dict[str, list[str]] = {}
    for name, (voice, _said) in spoken.items():
        members.setdefault(f"call {voice}", []).append(name)
    solo = [n for n in clips if n not in spoken]
    joined = {c: np.concatenate([clips[n] for n in names]) for c, names in members.items()}
    texts = {c: " ".join(refs[n] for n in names) for c, names in members.items()}
    groups = {"sentences": solo} if solo else {}
    return (
        {**{n: clips[n] for n in solo}, **joined},
        {**{n: refs[n] for n in solo}, **texts},
        {**groups, "all calls": list(members)},
        members,
    )


class FinalSeen(NamedTuple):
    latency_s: float
    """After the end of speech, less the endpointing silence."""
    words: int


@dataclass
class SessionResult:
    name: str
    text: str = ""
    first_partial_s: float | None = None
    finals: list[FinalSeen] = field(default_factory=list)
    partials: int = 0
    errors: list[str] = field(default_factory=list)


def start_server(workers: int, cpus: str | None) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "TRANSCRIBE_API_KEYS": KEY,
        "TRANSCRIBE_LOCAL_WORKERS": str(workers),
        "TRANSCRIBE_LOCAL_MAX_SESSIONS_PER_WORKER": "1000",
        "TRANSCRIBE_LOCAL_SPHINX_SESSIONS_PER_WORKER": "1000",
        "TRANSCRIBE_LOG_LEVEL": "warning",
        "PYTHONPATH": str(ROOT / "src"),
    }
    cmd = [sys.executable, "-m", "transcribe_gateway", "serve", "--port", str(port)]
    if cpus:
        cmd = ["taskset", "-c", cpus, *cmd]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            import urllib.request

            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                if json.loads(r.read())["ready"]:
                    return proc, f"ws://127.0.0.1:{port}/ws"
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


async def configure(ws: websockets.ClientConnection, session: dict[str, object]) -> dict[str, Any]:
    """Take ``session.created``, ask for ``session``; the reply (updated, or an error)."""
    await ws.recv()
    await ws.send(json.dumps({"type": "session.update", "session": session}))
    reply: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 30))
    return reply


async def stream_one(
    url: str,
    name: str,
    samples: np.ndarray,
    model: str,
    endpointing_ms: int = ENDPOINTING_MS,
    unfinished_ms: int | None = None,
) -> SessionResult:
    result = SessionResult(name)
    trailing_ms = Endpointer(endpointing_ms=endpointing_ms).trailing_ms
    async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {KEY}"}) as ws:
        session: dict[str, object] = {
            "provider": "LOCAL",
            "model": model,
            "endpointing": endpointing_ms,
        }
        if unfinished_ms is not None:
            session["endpointing_unfinished"] = unfinished_ms
        updated = await configure(ws, session)
        if updated["type"] != "session.updated":
            result.errors.append(updated["error"]["code"])
            return result
        data = samples.astype("<i2").tobytes()
        start = time.monotonic()
        speech_start_wall: dict[str, float] = {}
        texts: list[str] = []

        def sent_at(audio_ms: float) -> float:
            return start + audio_ms / 1000.0

        async def receive() -> None:
            async for raw in ws:
                msg = json.loads(raw)
                now = time.monotonic()
                kind = msg["type"]
                if kind == "speech.started":
                    speech_start_wall[msg["utterance_id"]] = sent_at(msg["audio_start_ms"])
                elif kind == "transcription.partial":
                    result.partials += 1
                    if result.first_partial_s is None and msg["utterance_id"] in speech_start_wall:
                        result.first_partial_s = now - speech_start_wall[msg["utterance_id"]]
                elif kind == "transcription.completed":
                    texts.append(msg["text"])
                    speech_end = sent_at(msg["end_ms"] - trailing_ms)
                    latency = now - speech_end - endpointing_ms / 1000
                    result.finals.append(FinalSeen(latency, len(msg["text"].split())))
                elif kind == "error":
                    result.errors.append(msg["error"]["code"])

        receiver = asyncio.create_task(receive())
        try:
            for n, i in enumerate(range(0, len(data), 640)):
                chunk = base64.b64encode(data[i : i + 640]).decode()
                await ws.send(json.dumps({"type": "audio.append", "audio": chunk}))
                delay = start + (n + 1) * 0.02 - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            await ws.send(json.dumps({"type": "session.close"}))
            await asyncio.wait_for(receiver, 120)
        except websockets.ConnectionClosed as closed:
            # Past capacity the gateway stops reading a session that its engine
            # cannot keep up with (backpressure), and the client's keepalive
            # pings time out: counted as an error, not a crash of the benchmark.
            receiver.cancel()
            await asyncio.gather(receiver, return_exceptions=True)
            result.errors.append(f"closed {closed.rcvd.code if closed.rcvd else 'abnormally'}")
        result.text = " ".join(texts)
    return result


def median_or_nan(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


async def probe(url: str, model: str, after_s: float) -> str:
    """Whether one more LOCAL session is admitted ``after_s`` seconds from now:
    ``admitted``, or the error code it was refused with."""
    await asyncio.sleep(after_s)
    async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {KEY}"}) as ws:
        reply = await configure(ws, {"provider": "LOCAL", "model": model})
        return "admitted" if reply["type"] == "session.updated" else str(reply["error"]["code"])


async def run_sessions(
    url: str,
    model: str,
    n: int,
    clips: dict[str, np.ndarray],
    endpointing_ms: int,
    unfinished_ms: int | None,
    probe_after_s: float | None = None,
) -> tuple[list[SessionResult], str | None]:
    """``n`` sessions at once, and the outcome of a probe (:func:`probe`) if asked."""
    names = list(clips)
    chosen = [names[i % len(names)] for i in range(n)]
    sessions = asyncio.gather(
        *(stream_one(url, c, clips[c], model, endpointing_ms, unfinished_ms) for c in chosen)
    )
    if probe_after_s is None:
        return await sessions, None
    results, outcome = await asyncio.gather(sessions, probe(url, model, probe_after_s))
    return results, outcome


def whisper_engine(model: str, workers: int) -> WhisperEngine:
    """``model`` loaded as the gateway loads it: the bundled one, or one that
    ``[local.whisper_models]`` maps in the config ``TRANSCRIBE_CONFIG`` names
    (the gateway the benchmark starts reads the same), never downloaded."""
    from transcribe_gateway.config import load_settings
    from transcribe_gateway.providers.whisper_engine import WhisperEngine, resolve_whisper_model

    configured = load_settings().local.whisper_models
    return WhisperEngine(model, resolve_whisper_model(model, configured, False), workers)


def batch_figures(
    model: str, clips: dict[str, np.ndarray], refs: dict[str, str], groups: dict[str, list[str]]
) -> tuple[dict[str, float], float]:
    """WER per group of clips, and CPU real-time factor of batch decoding on one thread."""
    texts: dict[str, str] = {}
    cpu = audio = 0.0
    if model.startswith("whisper"):
        engine = whisper_engine(model, 1)
        engine.transcribe(clips[next(iter(clips))], final=True)  # warm-up
        for name, samples in clips.items():
            t = time.process_time()
            texts[name] = engine.transcribe(samples, final=True).text
            cpu += time.process_time() - t
            audio += len(samples) / SAMPLE_RATE
    else:
        from pocketsphinx import Decoder

        decoder = Decoder(fwdflat=False, bestpath=False, loglevel="FATAL")
        for name, samples in clips.items():
            t = time.process_time()
            decoder.start_utt()
            decoder.process_raw(samples.astype("<i2").tobytes(), False, True)
            decoder.end_utt()
            hyp = decoder.hyp()
            texts[name] = hyp.hypstr if hyp else ""
            cpu += time.process_time() - t
            audio += len(samples) / SAMPLE_RATE
    wers = {g: corpus_wer([(refs[n], texts[n]) for n in names]) for g, names in groups.items()}
    return wers, cpu / audio


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="whisper-tiny.en")
    parser.add_argument(
        "--sessions", default="1,2,4,6,8,12", help="levels on one core; none if empty"
    )
    parser.add_argument(
        "--sessions-all-cores",
        default="",
        help="levels on every core (default pool: a decode worker per core); none if empty",
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per figure; medians reported")
    add_clip_set_arguments(parser)
    parser.add_argument(
        "--endpointing",
        type=int,
        default=ENDPOINTING_MS,
        help="the sessions' endpointing silence, ms (the accuracy/latency knob)",
    )
    parser.add_argument(
        "--unfinished",
        type=int,
        default=None,
        help="the sessions' endpointing_unfinished, ms (semantic endpointing); off if unset",
    )
    parser.add_argument(
        "--calls",
        action="store_true",
        help="each voice's clips in turn as one session, a call (synthesized sets)",
    )
    parser.add_argument(
        "--probe",
        type=float,
        default=None,
        help="seconds into each capacity run to ask for one session more (admission)",
    )
    args = parser.parse_args()
    endpointing, unfinished = args.endpointing, args.unfinished
    clip_set = clip_set_of(args)
    clips, refs, groups = load_clips(clip_set)
    if args.calls and clip_set != "recordings":
        clips, refs, groups, _ = calls(clips, refs, SPOKEN[clip_set])

    batch, rtf = batch_figures(args.model, clips, refs, groups)
    # Streamed clips end in enough silence for the endpoint to fire before the
    # session closes (else the close finalizes the last utterance early, and
    # its latency is meaningless); one second covers the default 500 ms.
    extra = max(0, (max(endpointing, unfinished or 0) + 500) * SAMPLE_RATE // 1000 - SAMPLE_RATE)
    streamed_clips = {n: np.concatenate([a, np.zeros(extra, np.int16)]) for n, a in clips.items()}
    semantic = f", endpointing_unfinished {unfinished} ms" if unfinished else ""
    print(f"## LOCAL {args.model}, {clip_set}, endpointing {endpointing} ms{semantic}\n")
    shown = ", ".join(f"{g} {w:.3f}" for g, w in batch.items())
    print(f"batch (one thread): WER {shown}, CPU real-time factor {rtf:.3f}")

    # Streaming accuracy and single-session latency: both cores, one session at a time.
    med = statistics.median
    wer_runs: dict[str, list[float]] = {g: [] for g in groups}
    first_runs, final_runs, final_p95_runs = [], [], []
    late, finals_seen = 0, 0  # finals more than 0.5 s after the endpointing (held ones)
    latest: list[tuple[float, str, int]] = []  # (latency, clip, words) of every final
    by_position: dict[str, list[float]] = {"first": [], "later": []}  # finals of a session
    # A failed session (refused, an engine error, closed by the server) loses the
    # words after its failure (deletions in the WER) and the latency of finals
    # that never came: reported beside the WER, so the figures are read with it.
    solo_errors: Counter[str] = Counter()
    failed, solo_sessions = 0, 0
    proc, url = start_server(workers=0, cpus=None)
    try:
        for _ in range(args.runs):
            solo = [
                asyncio.run(
                    stream_one(url, n, streamed_clips[n], args.model, endpointing, unfinished)
                )
                for n in refs
            ]
            texts = {r.name: r.text for r in solo}
            for g, names in groups.items():
                wer_runs[g].append(corpus_wer([(refs[n], texts[n]) for n in names]))
            firsts = [r.first_partial_s for r in solo if r.first_partial_s is not None]
            finals = [f.latency_s for r in solo for f in r.finals]
            if firsts:
                first_runs.append(med(firsts))
            if finals:  # none if every session failed: that run has no latency
                final_runs.append(med(finals))
                final_p95_runs.append(pct(finals, 0.95))
            solo_errors.update(e for r in solo for e in r.errors)
            failed += sum(bool(r.errors) for r in solo)
            solo_sessions += len(solo)
            late += sum(x > 0.5 for x in finals)
            finals_seen += len(finals)
            latest += [(f.latency_s, r.name, f.words) for r in solo for f in r.finals]
            for r in solo:
                by_position["first"] += [f.latency_s for f in r.finals[:1]]
                by_position["later"] += [f.latency_s for f in r.finals[1:]]
    finally:
        proc.terminate()
        proc.wait()
    print(f"medians of {args.runs} runs")
    streamed = ", ".join(
        f"{g} {med(w):.3f} ({med(w) / max(batch[g], 1e-9):.2f}x batch)" for g, w in wer_runs.items()
    )
    codes = ", ".join(f"{code} {n}" for code, n in solo_errors.most_common())
    solo_failed = f"{solo_errors.total()} ({codes}) in {failed} of {solo_sessions} sessions"
    print(
        f"streaming (real time, one session at a time): WER {streamed}; "
        f"errors {solo_failed if solo_errors else 0}"
    )
    print(f"time to first partial after speech onset: median {median_or_nan(first_runs):.3f} s")
    print(
        f"time to final after end of speech, excluding {endpointing} ms endpointing: "
        f"median {median_or_nan(final_runs):.3f} s, p95 {median_or_nan(final_p95_runs):.3f} s "
        f"(per run: {', '.join(f'{x:.3f}' for x in final_runs)}); "
        f"{late} of {finals_seen} finals more than 0.5 s after it"
    )
    # A session's first final has nothing before it in its window: the whole one.
    print(
        "time to final, a session's first / the later ones: "
        + "; ".join(
            f"{position} {len(xs)}, median {med(xs):.3f} s, p95 {pct(xs, 0.95):.3f} s"
            for position, xs in by_position.items()
            if xs
        )
    )
    # What sets the p95: which finals come last, and how long they are.
    slowest = sorted(latest, reverse=True)[: max(3, len(latest) // 20)]
    print(
        "latest finals (the slowest 5%, at least 3): "
        + ", ".join(f"{name} ({words} words) {x:.3f} s" for x, name, words in slowest)
        + "\n"
    )

    # Capacity: the server pinned to one core with one decode worker, then (with
    # --sessions-all-cores) on every core with the default pool, one worker per core.
    setups: list[tuple[str, int, str | None, str]] = (
        [("1", 1, "0", args.sessions)] if args.sessions else []
    )
    if args.sessions_all_cores:
        setups.append((str(os.cpu_count()), 0, None, args.sessions_all_cores))
    if setups:
        probed = " probe admitted |" if args.probe is not None else ""
        print(
            "| cores | sessions | final latency p50 (s) | p95 (s) | mean (s) | partials/session "
            "| WER | errors |" + probed
        )
        print("|---|---|---|---|---|---|---|---|" + "---|" * bool(probed))
    for cores, workers, cpus, levels in setups:
        proc, url = start_server(workers=workers, cpus=cpus)
        try:
            for n in [int(x) for x in levels.split(",")]:
                rows, outcomes = [], []
                for _ in range(args.runs):
                    # Admission remembers how late the last run's finals were until
                    # the pool has idled: so this run's sessions start on a fresh pool.
                    time.sleep(IDLE_FORGETS_S + 1)
                    results, outcome = asyncio.run(
                        run_sessions(
                            url, args.model, n, streamed_clips, endpointing, unfinished, args.probe
                        )
                    )
                    outcomes.append(outcome)
                    lat = [f.latency_s for r in results for f in r.finals]
                    rows.append(
                        (
                            pct(lat, 0.5),
                            pct(lat, 0.95),
                            statistics.fmean(lat) if lat else float("nan"),
                            statistics.mean(r.partials for r in results),
                            corpus_wer([(refs[r.name], r.text) for r in results]),
                            sum(len(r.errors) for r in results),
                        )
                    )
                p50, p95, mean, parts, wer = (med(row[i] for row in rows) for i in range(5))
                errors = sum(row[5] for row in rows)
                admitted = sum(o == "admitted" for o in outcomes)
                refused = ", ".join(sorted({o for o in outcomes if o and o != "admitted"}))
                probe_cell = f" {admitted} of {len(outcomes)}"
                probe_cell += f" (refused: {refused}) |" if refused else " |"
                print(
                    f"| {cores} | {n} | {p50:.3f} | {p95:.3f} | {mean:.3f} | {parts:.1f} | {wer:.3f} "
                    f"| {errors} |" + (probe_cell if args.probe is not None else "")
                )
        finally:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
