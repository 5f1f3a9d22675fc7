"""A real headless Chromium (Debian's) with a fake microphone fed from ../shared/audio.

The demo page served at ``/`` (token from the dev helper, AudioWorklet capture
through the JS client) and the public docs' browser example (ScriptProcessor,
``auth`` first message) must both show the spoken words.
"""

from __future__ import annotations

import contextlib
import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import ARTIFACTS, TEST_KEYS, GatewayProcess
from tests.textnorm import normalize
from tests.web.conftest import write_wav

DOCS_BROWSER_EXAMPLE = Path(__file__).parents[1] / "compat" / "voicerun_docs_browser.html"
WORDS = "go forward ten meters"


@pytest.fixture
def goforward_wav(tmp_path: Path, shared_audio: Path) -> Path:
    pcm = np.frombuffer((shared_audio / "goforward.raw").read_bytes(), dtype="<i2")
    return write_wav(tmp_path / "goforward.wav", pcm)


async def test_demo_page_shows_the_spoken_words(
    gateway: GatewayProcess, browser: Any, goforward_wav: Path
) -> None:
    # Under the page's Content-Security-Policy (WEB_HEADERS): locator waits only,
    # as the policy forbids the strings Playwright's polling waits evaluate.
    context = await browser(goforward_wav, bypass_csp=False)
    page = await context.new_page()
    bodies: list[str] = []
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on(
        "console",
        lambda msg: errors.append(msg.text) if "Content Security Policy" in msg.text else None,
    )

    async def keep_body(response: Any) -> None:
        if response.url.startswith(gateway.http):
            with contextlib.suppress(Exception):  # redirects, aborted requests: no body
                bodies.append(await response.text())

    page.on("response", keep_body)
    await page.goto(f"{gateway.http}/")
    await page.locator("body[data-state='idle']").wait_for(timeout=15_000)
    providers = await page.eval_on_selector_all("#provider option", "els => els.map(e => e.value)")
    assert "LOCAL" in providers and "DEEPGRAM" in providers
    assert await page.input_value("#model") == "whisper-tiny.en"

    await page.click("#start")
    await page.locator("body[data-state='live']").wait_for(timeout=30_000)
    await page.locator("#finals li").first.wait_for(timeout=60_000)
    await page.click("#stop")
    await page.locator("body[data-state='closed']").wait_for(timeout=30_000)

    finals = await page.eval_on_selector_all("#finals .text", "els => els.map(e => e.textContent)")
    assert normalize(" ".join(finals)) == WORDS, finals
    assert re.fullmatch(r"\d+ ms", await page.inner_text("#latency"))
    assert re.search(r"\d+\.\d\d\u2013\d+\.\d\d s", await page.inner_text("#finals"))
    assert "closed (1000)" in await page.inner_text("#status")
    assert not errors, errors
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "web-demo.png"), full_page=True)
    # The page got a token, never a key.
    assert bodies and not any(key in body for body in bodies for key in TEST_KEYS)
    assert any('"token":"tst_' in body.replace(" ", "") for body in bodies)


def test_demo_token_helper_answers_and_providers_endpoint_lists_offers(
    gateway: GatewayProcess,
) -> None:
    req = urllib.request.Request(f"{gateway.http}/demo/token", data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        assert json.loads(r.read())["token"].startswith("tst_")
    with urllib.request.urlopen(f"{gateway.http}/v1/providers", timeout=10) as r:
        listing = json.loads(r.read())
    by_name = {p["name"]: p for p in listing["providers"]}
    assert listing["default"] == {"provider": "LOCAL", "model": "whisper-tiny.en"}
    assert by_name["LOCAL"]["available"] is True
    assert "whisper-tiny.en" in [m["name"] for m in by_name["LOCAL"]["models"]]
    deepgram = by_name["DEEPGRAM"]
    assert "nova-3" in [m["name"] for m in deepgram["models"]]
    if not deepgram["available"]:  # no DEEPGRAM_API_KEY here: served by LOCAL (development)
        assert deepgram["reason"] and deepgram["substitute"] == "LOCAL/whisper-tiny.en"


def test_demo_files_may_not_be_framed_sniffed_or_run_others(gateway: GatewayProcess) -> None:
    # The page takes the microphone: another site framing it could get the user to
    # click Start (clickjacking). The demo tests above run under this policy.
    for path in ("/", "/app.js", "/style.css", "/client/pcm-worklet.js"):
        with urllib.request.urlopen(f"{gateway.http}{path}", timeout=10) as r:
            headers = r.headers
        assert headers["X-Content-Type-Options"] == "nosniff", path
        assert headers["Referrer-Policy"] == "no-referrer", path
        policy = headers["Content-Security-Policy"]
        assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy, path


@pytest.fixture
def token(gateway: GatewayProcess) -> str:
    """What a web app's backend does: mint a token with its key, hand it to the page."""
    req = urllib.request.Request(
        f"{gateway.http}/v1/tokens",
        data=b"",
        headers={"Authorization": f"Bearer {TEST_KEYS[0]}"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        minted: str = json.loads(r.read())["token"]
        return minted


async def test_docs_browser_example_shows_the_spoken_words(
    gateway: GatewayProcess, browser: Any, goforward_wav: Path, tmp_path: Path, token: str
) -> None:
    source = DOCS_BROWSER_EXAMPLE.read_text()
    html = source.replace('"wss://transcribe.voicerun.com/ws"', f'"{gateway.url}"')
    html = html.replace('token: "YOUR_API_KEY"', f'token: "{token}"')
    assert html.count("\n") == source.count("\n") and gateway.url in html and token in html
    page_path = tmp_path / "example.html"
    page_path.write_text(html)

    context = await browser(goforward_wav)
    page = await context.new_page()
    await page.goto(page_path.as_uri())
    await page.wait_for_function(
        "document.querySelectorAll('#transcript p').length > 0", timeout=60_000
    )
    texts = await page.eval_on_selector_all("#transcript p", "els => els.map(e => e.textContent)")
    assert normalize(" ".join(texts)) == WORDS, texts
    await page.screenshot(path=str(ARTIFACTS / "web-docs-example.png"))


async def test_client_resamples_a_48k_audio_context_to_the_session_rate(
    gateway: GatewayProcess, browser: Any, goforward_wav: Path
) -> None:
    """The worklet's own resampler (used where a browser will not run at 16 kHz)."""
    context = await browser(goforward_wav)
    page = await context.new_page()
    await page.goto(f"{gateway.http}/")
    result = await page.evaluate(
        """async () => {
          const { TranscribeClient, startMicrophone } = await import("/client/index.js");
          const { token } = await (await fetch("/demo/token", { method: "POST" })).json();
          const client = new TranscribeClient({
            url: `ws://${location.host}/ws`, token,
            session: { provider: "LOCAL", model: "whisper-tiny.en", sample_rate: 16000 },
          });
          const finals = [];
          client.on("completed", (m) => finals.push(m.text));
          await client.connect();
          const audio = new AudioContext({ sampleRate: 48000 });
          const mic = await startMicrophone(client, { context: audio });
          const deadline = Date.now() + 30000;
          while (!finals.length && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
          await mic.stop();
          const closed = await client.close();
          return { finals, rate: audio.sampleRate, code: closed.code, seconds: closed.audio_seconds };
        }"""
    )
    assert result["rate"] == 48000
    assert normalize(" ".join(result["finals"])) == WORDS, result
    assert result["code"] == 1000 and result["seconds"] > 2.0


# Before the page's scripts: every microphone track and AudioContext the page makes is kept.
TRACK_MEDIA = """
(() => {
  const real = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
  window.__tracks = [];
  navigator.mediaDevices.getUserMedia = async (constraints) => {
    const stream = await real(constraints);
    window.__tracks.push(...stream.getTracks());
    return stream;
  };
  const RealContext = window.AudioContext;
  window.__contexts = [];
  window.AudioContext = class extends RealContext {
    constructor(options) { super(options); window.__contexts.push(this); }
  };
})();
"""
MEDIA_STATE = """() => ({
  tracks: window.__tracks.map((t) => t.readyState),
  contexts: window.__contexts.map((c) => `${c.sampleRate}:${c.state}`),
})"""
ECHO_SESSION = {"provider": "FAULTY", "model": "echo", "sample_rate": 16000}


async def test_microphone_failing_after_the_prompt_releases_the_microphone(
    gateway: GatewayProcess, browser: Any, goforward_wav: Path
) -> None:
    """A worklet that does not load: the track is stopped and the context closed."""
    context = await browser(goforward_wav)
    await context.add_init_script(TRACK_MEDIA)
    page = await context.new_page()
    await page.goto(f"{gateway.http}/")
    error = await page.evaluate(
        """async (session) => {
          const { TranscribeClient, startMicrophone } = await import("/client/index.js");
          const { token } = await (await fetch("/demo/token", { method: "POST" })).json();
          const client = new TranscribeClient({ url: `ws://${location.host}/ws`, token, session });
          await client.connect();
          let error = null;
          try {
            await startMicrophone(client, { workletUrl: "/no-such-worklet.js" });
          } catch (err) {
            error = String(err);
          }
          await client.close();
          return error;
        }""",
        ECHO_SESSION,
    )
    assert error and "AbortError" in error, error
    state = await page.evaluate(MEDIA_STATE)
    assert state["tracks"] and all(t == "ended" for t in state["tracks"]), state
    assert state["contexts"] and all(c.endswith(":closed") for c in state["contexts"]), state


# Firefox's refusal, emulated: a MediaStream source only on a context at the device's rate.
FIREFOX_RATES = """
(() => {
  const RealContext = window.AudioContext;
  let deviceRate = null;
  window.AudioContext = class extends RealContext {
    constructor(options) {
      super(options);
      if (!options || !options.sampleRate) deviceRate = this.sampleRate;
    }
    createMediaStreamSource(stream) {
      if (this.sampleRate !== (deviceRate ?? 48000)) {
        throw new DOMException("Connecting AudioNodes from AudioContexts with different "
          + "sample-rate is currently not supported.", "NotSupportedError");
      }
      return super.createMediaStreamSource(stream);
    }
  };
})();
"""


async def test_microphone_closes_the_context_a_browser_refused(
    gateway: GatewayProcess, browser: Any, goforward_wav: Path
) -> None:
    """The 16 kHz context refused by createMediaStreamSource is closed, not left running."""
    context = await browser(goforward_wav)
    # One script: the order of several is not defined; the tracking wraps the emulation.
    await context.add_init_script(FIREFOX_RATES + TRACK_MEDIA)
    page = await context.new_page()
    await page.goto(f"{gateway.http}/")
    await page.evaluate(
        """async (session) => {
          const { TranscribeClient, startMicrophone } = await import("/client/index.js");
          const { token } = await (await fetch("/demo/token", { method: "POST" })).json();
          const client = new TranscribeClient({ url: `ws://${location.host}/ws`, token, session });
          await client.connect();
          const mic = await startMicrophone(client);
          await mic.stop();
          await client.close();
        }""",
        ECHO_SESSION,
    )
    state = await page.evaluate(MEDIA_STATE)
    assert len(state["contexts"]) == 2 and state["contexts"][0].startswith("16000:"), state
    assert all(c.endswith(":closed") for c in state["contexts"]), state
    assert state["tracks"] and all(t == "ended" for t in state["tracks"]), state


# The user answers the permission prompt only after the session ended (the gateway's
# 3 s idle timeout, no audio meanwhile): getUserMedia resolves once the page shows it.
SLOW_PROMPT = """
(() => {
  const real = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
  navigator.mediaDevices.getUserMedia = async (constraints) => {
    while (!["closed", "error"].includes(document.body.dataset.state)) {
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    window.__promptAnswered = true;
    return real(constraints);
  };
})();
"""


async def test_demo_page_stays_closed_when_the_session_ends_during_the_prompt(
    gateway: GatewayProcess, browser: Any, goforward_wav: Path
) -> None:
    context = await browser(goforward_wav)
    # One script: the order of several is not defined; the tracking sees the prompt's stream.
    await context.add_init_script(SLOW_PROMPT + TRACK_MEDIA)
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(f"{gateway.http}/")
    await page.wait_for_function("document.body.dataset.state === 'idle'", timeout=15_000)
    await page.click("#start")
    # Either the page went live on the closed session, or it let the microphone go.
    await page.wait_for_function(
        """() => window.__promptAnswered && (document.body.dataset.state === 'live'
          || (window.__tracks.length > 0 && window.__tracks.every((t) => t.readyState === 'ended')
              && window.__contexts.every((c) => c.state === 'closed')))""",
        timeout=60_000,
    )
    assert await page.evaluate("document.body.dataset.state") == "closed"
    assert (await page.inner_text("#status")).startswith("closed (1000)")
    assert await page.is_enabled("#start") and not await page.is_enabled("#stop")
    state = await page.evaluate(MEDIA_STATE)
    assert all(t == "ended" for t in state["tracks"]), state
    assert not errors, errors


NOT_DEVELOPMENT = (
    "this server is not in the development profile: the demo token helper is off; "
    "mint tokens from your backend with POST /v1/tokens"
)


@pytest.fixture(scope="module")
def production_gateway() -> Iterator[GatewayProcess]:
    """The production profile: no ``/demo/token`` route (the static mount answers 405)."""
    server = GatewayProcess("web-production", env={"TRANSCRIBE_PROFILE": "production"})
    yield server
    server.stop()


async def demo_page_failure(page: Any, http: str) -> dict[str, Any]:
    """Open the demo page, press Start, and return what it shows once it gave up."""
    await page.goto(f"{http}/")
    await page.wait_for_function("document.body.dataset.state === 'idle'", timeout=15_000)
    await page.click("#start")
    await page.wait_for_function("document.body.dataset.state === 'error'", timeout=30_000)
    await page.wait_for_function("!document.getElementById('start').disabled", timeout=30_000)
    return {
        "status": await page.inner_text("#status"),
        "errors": await page.eval_on_selector_all(
            "#errors li", "els => els.map(e => e.textContent)"
        ),
    }


async def test_demo_page_in_production_says_the_token_helper_is_off(
    production_gateway: GatewayProcess, browser: Any, goforward_wav: Path
) -> None:
    # The 405 text/plain reply was parsed as JSON: "Unexpected token 'M'...".
    context = await browser(goforward_wav)
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    shown = await demo_page_failure(page, production_gateway.http)
    assert shown == {"status": NOT_DEVELOPMENT, "errors": [NOT_DEVELOPMENT]}, shown
    assert not errors, errors


async def test_demo_page_reports_a_token_reply_that_is_not_json(
    gateway: GatewayProcess, browser: Any, goforward_wav: Path
) -> None:
    """A proxy's HTML error page: its status, not a JSON parse error."""
    context = await browser(goforward_wav)
    page = await context.new_page()
    await page.route(
        "**/demo/token",
        lambda route: route.fulfill(
            status=502, content_type="text/html", body="<h1>Bad Gateway</h1>"
        ),
    )
    shown = await demo_page_failure(page, gateway.http)
    text = "token request failed (502)"
    assert shown == {"status": text, "errors": [text]}, shown


# Before the page's scripts: the close code of every WebSocket the page opens.
TRACK_CLOSES = """
(() => {
  const Real = window.WebSocket;
  window.__closes = [];
  window.WebSocket = class extends Real {
    constructor(...args) {
      super(...args);
      this.addEventListener("close", (ev) => window.__closes.push(ev.code));
    }
  };
})();
"""


async def test_demo_page_shows_a_refused_session_once_and_keeps_its_reason(
    gateway: GatewayProcess, browser: Any, goforward_wav: Path
) -> None:
    # The error showed twice (the error event, then connect()'s rejection), and the
    # close that followed replaced the status with "closed (1005)": the client
    # closed without a code.
    context = await browser(goforward_wav)
    await context.add_init_script(TRACK_CLOSES)
    page = await context.new_page()
    await page.goto(f"{gateway.http}/")
    await page.wait_for_function("document.body.dataset.state === 'idle'", timeout=15_000)
    await page.select_option("#provider", "FAULTY")
    await page.select_option("#model", "refuse-on-open")
    await page.click("#start")
    # The close event is handled by the client right after this listener: wait past it.
    await page.wait_for_function("window.__closes.length > 0", timeout=30_000)
    await page.wait_for_timeout(200)
    assert await page.evaluate("window.__closes") == [1000]
    errors = await page.eval_on_selector_all("#errors li", "els => els.map(e => e.textContent)")
    assert len(errors) == 1 and errors[0].startswith("provider_error: "), errors
    assert "authentication refused" in errors[0], errors
    assert await page.inner_text("#status") == errors[0]
    assert await page.evaluate("document.body.dataset.state") == "error"
    assert await page.is_enabled("#start") and not await page.is_enabled("#stop")


async def test_demo_page_says_when_the_close_gave_up_before_the_server_finished(
    gateway: GatewayProcess, browser: Any, goforward_wav: Path
) -> None:
    """hang-on-finalize never sends ``session.closed``: the page's close() gives up
    after its 20 s (the page's clock is run forward, before the server's own 5 s
    drain timeout ends the session) and must not read as a clean close."""
    context = await browser(goforward_wav)
    page = await context.new_page()
    await page.clock.install()
    await page.goto(f"{gateway.http}/")
    await page.wait_for_function("document.body.dataset.state === 'idle'", timeout=15_000)
    await page.select_option("#provider", "FAULTY")
    await page.select_option("#model", "hang-on-finalize")
    await page.click("#start")
    await page.wait_for_function("document.body.dataset.state === 'live'", timeout=30_000)
    await page.wait_for_function(
        "document.querySelectorAll('#finals li').length > 0", timeout=30_000
    )
    await page.click("#stop")
    await page.wait_for_function("document.body.dataset.state === 'closing'", timeout=10_000)
    await page.clock.run_for(21_000)
    await page.wait_for_function("document.body.dataset.state !== 'closing'", timeout=10_000)
    status = await page.inner_text("#status")
    assert status.startswith("closed (1000)"), status
    assert "the server did not finish in time" in status, status
    assert await page.evaluate("document.body.dataset.state") == "error"
