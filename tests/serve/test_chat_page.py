"""The chat page of ``leaplm serve`` (GET /, leaplm/serve/static/index.html) in a real browser.

Debian's Chromium (``/usr/bin/chromium``), driven headless by playwright's Python API, talks to a real
``leaplm serve`` with SmolLM2 (the ``server`` fixture): the speculative-method picker is filled from
GET /v1/leaplm/info, a message is sent with the chosen method, the answer streams into the assistant
bubble and its stats line (tok/s, tokens/pass, TTFT) appears from the final usage chunk; the next turn
sends the whole conversation; Stop aborts a request; an API-key server asks for the key. Two more tests
need no model: the page's SSE reader on events split at every byte, and model text rendered as text
(routed responses: HTML in an answer stays text, an error chunk shows in the bubble).
Skipped when Chromium or playwright is missing (``scripts/test`` installs Chromium with apt when it can).
Set ``LEAPLM_CHAT_SCREENSHOT=/path.png`` to save a screenshot of the page after the first answer.
"""
from __future__ import annotations

import json
import os
import re
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.real, pytest.mark.browser]

PAGE = Path(__file__).resolve().parents[2] / "leaplm" / "serve" / "static" / "index.html"
CHROMIUM = Path("/usr/bin/chromium")
# without the background-networking flags Chromium's own connections are refused in a closed network
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ANSWER_TIMEOUT_MS = 180_000
# "37 tokens · 61.3 tok/s · 2.41 tokens/pass · TTFT 0.12 s · prompt_lookup"
STATS = re.compile(r"^(\d+) tokens? · \d+\.\d tok/s · (\d+\.\d\d) tokens/pass · TTFT \d+\.\d\d s")


def get_json(url: str, key: str | None = None) -> dict:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (Python) not installed")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A fresh page (own localStorage); fails the test on an uncaught JavaScript error."""
    context = browser.new_context(viewport={"width": 1000, "height": 760})
    page = context.new_page()
    js_errors: list[str] = []
    page.on("pageerror", lambda e: js_errors.append(str(e)))
    yield page
    context.close()
    assert not js_errors, f"JavaScript errors on the chat page: {js_errors}"


def chat_bodies(page) -> list[dict]:
    """The JSON bodies of every POST /v1/chat/completions the page sends (filled as requests go out)."""
    bodies: list[dict] = []
    page.on("request", lambda r: bodies.append(r.post_data_json)
            if r.method == "POST" and r.url.endswith("/v1/chat/completions") else None)
    return bodies


def watch_stream(page) -> None:
    """Record the length of the newest assistant bubble's text after every DOM change (window.__lengths)."""
    page.evaluate("""() => {
      window.__lengths = [];
      new MutationObserver(() => {
        const all = document.querySelectorAll('#messages .assistant .content');
        if (all.length) window.__lengths.push(all[all.length - 1].textContent.length);
      }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    }""")


def wait_for_answer(page, index: int) -> tuple[str, str]:
    """Wait until assistant bubble ``index`` has its stats line; returns (answer text, stats text)."""
    from playwright.sync_api import expect

    stats = page.locator("#messages .stats").nth(index)
    expect(stats).to_contain_text("tok/s", timeout=ANSWER_TIMEOUT_MS)
    bubble = page.locator("#messages .assistant").nth(index)
    assert bubble.locator(".error").text_content() == "", bubble.locator(".error").text_content()
    return bubble.locator(".content").text_content(), stats.text_content()


def test_chat_page_streams_answers_with_speculation(server, page):
    info = get_json(server.url + "/v1/leaplm/info")
    methods = [m for m in info["speculative_methods"] if m != "none"]
    assert methods, f"the server offers no speculative method: {info}"
    bodies = chat_bodies(page)
    page.goto(server.url + "/")

    # the picker lists the server's methods (filled from /v1/leaplm/info) after "none"
    page.wait_for_function("n => document.querySelectorAll('#method option').length === n", arg=len(methods) + 1)
    assert page.eval_on_selector_all("#method option", "os => os.map(o => o.value)") == ["none", *methods]
    method = "prompt_lookup" if "prompt_lookup" in methods else methods[0]
    page.select_option("#method", method)
    page.click("#settings summary")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "40")
    watch_stream(page)

    first = "Count from 1 to 30, separated by commas."
    page.fill("#message", first)
    page.click("#send")
    text, stats = wait_for_answer(page, 0)
    assert text.strip(), "the assistant bubble stayed empty"
    m = STATS.match(stats)
    assert m, f"stats line not as expected: {stats!r}"
    assert 1 <= int(m.group(1)) <= 40 and float(m.group(2)) >= 1.0, stats
    lengths = [n for n in page.evaluate("window.__lengths") if n > 0]
    assert len(set(lengths)) > 1, f"the answer arrived in one piece, not streamed: lengths {lengths}"
    assert page.locator("#message").input_value() == "", "the message box was not cleared"
    if path := os.environ.get("LEAPLM_CHAT_SCREENSHOT"):
        page.screenshot(path=path)

    body = bodies[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}, body
    assert body["leaplm"] == {"speculative": method}, body
    assert body["messages"] == [{"role": "user", "content": first}], body
    assert body["max_tokens"] == 40 and body["temperature"] == 0, body

    # second turn with Enter: the whole conversation goes out, the first answer as the assistant turn
    second = "Now count from 31 to 35."
    page.fill("#message", second)
    page.press("#message", "Enter")
    text2, _ = wait_for_answer(page, 1)
    assert text2.strip()
    assert len(bodies) == 2
    assert bodies[1]["messages"] == [{"role": "user", "content": first}, {"role": "assistant", "content": text},
                                     {"role": "user", "content": second}], bodies[1]

    # New chat forgets it; Stop aborts a long answer and leaves the page (and the server) usable
    page.click("#new-chat")
    assert page.locator("#messages .assistant").count() == 0
    page.select_option("#method", "none")
    page.fill("#max-tokens", "2000")
    page.fill("#message", "Write a long story about a lighthouse keeper.")
    page.click("#send")
    page.wait_for_function("() => (document.querySelector('#messages .assistant .content') || {}).textContent")
    page.click("#stop")
    page.wait_for_function("() => !document.getElementById('send').hidden")
    stats = page.locator("#messages .stats").first.text_content()
    assert "stopped" in stats and "tokens ·" not in stats, stats
    assert bodies[2]["messages"] == [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
    assert bodies[2]["leaplm"] == {"speculative": "none"}
    assert server.healthy()


def test_chat_page_asks_for_the_api_key(start_server, page):
    s = start_server(api_key="page-test-key")
    page.goto(s.url + "/")  # the page itself needs no key
    key_field = page.locator("#api-key")
    key_field.wait_for(state="visible", timeout=30_000)
    key_field.fill("page-test-key")
    page.click("#save-key")
    methods = [m for m in get_json(s.url + "/v1/leaplm/info", "page-test-key")["speculative_methods"] if m != "none"]
    page.wait_for_function("n => document.querySelectorAll('#method option').length === n", arg=len(methods) + 1)
    assert page.evaluate("localStorage.getItem('leaplm.apiKey')") == "page-test-key"
    page.click("#settings summary")
    page.fill("#max-tokens", "8")
    page.fill("#message", "Hi")
    page.click("#send")
    text, _ = wait_for_answer(page, 0)
    assert text.strip()


def test_chat_page_is_self_contained(server):
    with urllib.request.urlopen(server.url + "/", timeout=30) as r:
        assert r.status == 200
        assert r.headers.get_content_type() == "text/html"
        html = r.read().decode()
    assert re.findall(r"https?://\S*", html) == [], "the page must fetch nothing from the internet"
    assert not re.search(r"""(?:src|href|action)\s*=\s*["']?//""", html), "protocol-relative URL in the page"
    assert "@import" not in html and "url(" not in html, "the page must not load stylesheets, fonts or images"
    for element_id in ("message", "send", "stop", "method", "messages", "api-key"):
        assert f'id="{element_id}"' in html, f"#{element_id} missing"


SSE = ('data: {"a": "h\u00e9llo \u2713"}\n\n: a comment\r\ndata:{"b": 1}\r\n\r\nevent: x\ndata: [DONE]\n\n'
       'data: {"after": "done"}\n\n')


def test_chat_page_reads_sse_split_anywhere(page):
    """readEvents joins lines and UTF-8 characters split across reads, and stops at [DONE]."""
    page.set_content(PAGE.read_text())
    runs = page.evaluate("""async (text) => {
      const bytes = new TextEncoder().encode(text);
      const runs = [];
      for (const size of [1, 2, 3, 5, 7, 64, bytes.length]) {
        const stream = new ReadableStream({ start(c) {
          for (let i = 0; i < bytes.length; i += size) c.enqueue(bytes.slice(i, i + size));
          c.close();
        } });
        const seen = [];
        const done = await window.leaplmChat.readEvents(stream, (p) => { seen.push(p); return p === "[DONE]"; });
        runs.push({ size, done, seen });
      }
      return runs;
    }""", SSE)
    for run in runs:
        assert run["done"] is True and run["seen"] == ['{"a": "h\u00e9llo \u2713"}', '{"b": 1}', "[DONE]"], run
    # a stream that ends without [DONE] (and without a last newline) still yields its last line
    assert page.evaluate("""async () => {
      const stream = new ReadableStream({ start(c) { c.enqueue(new TextEncoder().encode('data: {"x": 1}')); c.close(); } });
      const seen = [];
      const done = await window.leaplmChat.readEvents(stream, (p) => { seen.push(p); return false; });
      return [done, seen];
    }""") == [False, ['{"x": 1}']]


def test_chat_page_shows_model_text_as_text_and_errors(page):
    """Routed responses (no server): HTML in an answer stays text, an error chunk shows in the bubble, the
    stats line handles null speeds (a one-token answer)."""
    origin = "http://leaplm.test"
    info = {"model": "m", "speculative_methods": ["prompt_lookup"], "speculative_default": "prompt_lookup",
            "max_model_len": 2048, "quantization": None}
    chunk = lambda content: {"choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]}
    answers = [
        [chunk("<img src=x onerror=window.pwned=1>"), chunk("<b>bold</b>"),
         {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
          "leaplm": {"speculative": "prompt_lookup", "tokens_per_s": None, "ttft_s": 0.25,
                     "mean_accepted_tokens": None}}],
        [chunk("partial"), {"error": {"message": "engine failed: out of blocks", "type": "server_error"}}],
    ]

    def handle(route):
        path = route.request.url[len(origin):]
        if path == "/":
            route.fulfill(body=PAGE.read_text(), content_type="text/html")
        elif path == "/v1/leaplm/info":
            route.fulfill(json=info)
        elif path == "/v1/chat/completions":
            events = answers.pop(0)
            route.fulfill(body="".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n",
                          content_type="text/event-stream")
        else:
            route.fulfill(status=404, body="")

    page.route(origin + "/**", handle)
    page.goto(origin + "/")
    page.wait_for_function("document.getElementById('method').value === 'prompt_lookup'")
    page.fill("#message", "show me html")
    page.click("#send")
    page.wait_for_function("() => !document.getElementById('send').hidden")
    first = page.locator("#messages .assistant").first
    assert first.locator(".content").text_content() == "<img src=x onerror=window.pwned=1><b>bold</b>"
    assert first.locator("img, b").count() == 0 and page.evaluate("window.pwned") is None
    assert page.locator("#messages .stats").first.text_content() == "1 token · TTFT 0.25 s · prompt_lookup"

    page.fill("#message", "again")
    page.click("#send")
    page.wait_for_function("() => document.querySelectorAll('#messages .stats').length === 2 "
                           "&& !document.getElementById('send').hidden")
    second = page.locator("#messages .assistant").nth(1)
    assert second.locator(".content").text_content() == "partial"
    assert second.locator(".error").text_content() == "engine failed: out of blocks"
