"""Bad input never makes a 5xx or stops ``leaplm serve``: each case of a 40-kind list is answered 4xx in OpenAI's
error shape (the ``openai`` client raises its matching class), the server stays healthy, and a good request after
them all still gives the right answer. Also: the API key, the body cap (413), the queue cap (429 + Retry-After),
client disconnects (KV blocks freed) and SIGTERM (exit 0)."""
from __future__ import annotations

import json
import re
import time

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.real

USER = [{"role": "user", "content": "hi"}]
CHAT, COMP = "/v1/chat/completions", "/v1/completions"


def chat(**kw):
    return {"messages": USER, "max_tokens": 4, **kw}


def comp(**kw):
    return {"prompt": "hello", "max_tokens": 4, **kw}


# (name, method, path, body: dict | bytes | None, expected status)
CASES = [
    ("malformed json", "POST", CHAT, b'{"messages": [', 400),
    ("body is a list", "POST", CHAT, b"[]", 400),
    ("body is not json at all", "POST", CHAT, b"hello", 400),
    ("deeply nested json", "POST", CHAT, b"[" * 100000 + b"]" * 100000, 400),
    ("messages missing", "POST", CHAT, {"max_tokens": 4}, 400),
    ("messages empty", "POST", CHAT, {"messages": []}, 400),
    ("unknown role", "POST", CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, 400),
    ("content is a number", "POST", CHAT, {"messages": [{"role": "user", "content": 5}]}, 400),
    ("image content part", "POST", CHAT, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400),
    ("max_tokens 0", "POST", CHAT, chat(max_tokens=0), 400),
    ("max_tokens negative", "POST", CHAT, chat(max_tokens=-5), 400),
    ("max_tokens a string", "POST", CHAT, chat(max_tokens="ten"), 400),
    ("max_completion_tokens 0", "POST", CHAT, chat(max_completion_tokens=0), 400),
    ("temperature negative", "POST", CHAT, chat(temperature=-1), 400),
    ("temperature a string", "POST", CHAT, chat(temperature="hot"), 400),
    ("top_p 0", "POST", CHAT, chat(top_p=0), 400),
    ("top_p above 1", "POST", CHAT, chat(top_p=1.5), 400),
    ("top_k negative", "POST", CHAT, chat(top_k=-5), 400),
    ("min_p above 1", "POST", CHAT, chat(min_p=2), 400),
    ("repetition_penalty 0", "POST", CHAT, chat(repetition_penalty=0), 400),
    ("presence_penalty 5", "POST", CHAT, chat(presence_penalty=5), 400),
    ("seed negative", "POST", CHAT, chat(seed=-1), 400),
    ("n 0", "POST", CHAT, chat(n=0), 400),
    ("n above the cap", "POST", CHAT, chat(n=100), 400),
    ("top_logprobs above the cap", "POST", CHAT, chat(logprobs=True, top_logprobs=50), 400),
    ("top_logprobs without logprobs", "POST", CHAT, chat(top_logprobs=2), 400),
    ("stop a number", "POST", CHAT, chat(stop=5), 400),
    ("five stop strings", "POST", CHAT, chat(stop=["a", "b", "c", "d", "e"]), 400),
    ("stream not a bool", "POST", CHAT, chat(stream="yes"), 400),
    ("stop_token_ids negative", "POST", CHAT, chat(stop_token_ids=[-1]), 400),
    ("unknown model", "POST", CHAT, chat(model="gpt-9"), 404),
    ("prompt longer than the context", "POST", CHAT,
     {"messages": [{"role": "user", "content": "word " * 9000}], "max_tokens": 4}, 400),
    ("json_schema that does not compile", "POST", CHAT,
     chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}), 400),
    ("json_schema without schema", "POST", CHAT, chat(response_format={"type": "json_schema"}), 400),
    ("response_format of unknown type", "POST", CHAT, chat(response_format={"type": "yaml"}), 400),
    ("regex that does not compile", "POST", CHAT, chat(leaplm={"regex": "("}), 400),
    ("response_format and regex both", "POST", CHAT,
     chat(response_format={"type": "json_object"}, leaplm={"regex": "a+"}), 400),
    ("unknown speculative method", "POST", CHAT, chat(leaplm={"speculative": "telepathy"}), 400),
    ("speculative method that loads a model", "POST", CHAT,
     chat(leaplm={"speculative": {"method": "draft_model", "model": "/etc/passwd"}}), 400),
    ("speculative knob of the wrong kind", "POST", CHAT,
     chat(leaplm={"speculative": {"method": "prompt_lookup", "num_draft": "many"}}), 400),
    ("token id outside the vocabulary", "POST", COMP, comp(prompt=[999999]), 400),
    ("negative token id", "POST", COMP, comp(prompt=[-3]), 400),
    ("empty string prompt", "POST", COMP, comp(prompt=""), 400),
    ("empty token prompt", "POST", COMP, comp(prompt=[]), 400),
    ("prompt of mixed types", "POST", COMP, comp(prompt=[1, "a"]), 400),
    ("completions logprobs above the cap", "POST", COMP, comp(logprobs=10), 400),
    ("echo", "POST", COMP, comp(echo=True), 400),
    ("unknown route", "GET", "/v1/nothing", None, 404),
    ("wrong method", "GET", CHAT, None, 405),
    ("body over the size cap", "POST", CHAT, b'{"messages": [{"role": "user", "content": "' + b"x" * (5 * 2 ** 20) + b'"}]}', 413),
]


def send(base: str, method: str, path: str, body, headers: dict | None = None):
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    return httpx.request(method, base + path, content=data, timeout=60,
                         headers={"Content-Type": "application/json", **(headers or {})})


def test_bad_input_list_is_answered_4xx_and_the_server_stays_up(server):
    assert len(CASES) >= 30
    wrong = []
    for name, method, path, body, status in CASES:
        r = send(server.url, method, path, body)
        ok_shape = False
        try:
            err = r.json()["error"]
            ok_shape = isinstance(err["message"], str) and err["message"] and "type" in err and "param" in err \
                and "code" in err
        except (ValueError, KeyError, TypeError):
            pass
        if r.status_code != status or not ok_shape:
            wrong.append(f"{name}: {r.status_code} {r.text[:200]}")
        assert server.healthy(), f"server down after {name!r}"
    assert not wrong, "\n".join(wrong)
    # the messages name the problem
    r = send(server.url, "POST", CHAT, chat(temperature=-1))
    assert "temperature" in r.json()["error"]["message"]
    r = send(server.url, "POST", CHAT, {"messages": [{"role": "user", "content": "word " * 9000}]})
    assert r.json()["error"]["code"] == "context_length_exceeded" and "context window" in r.json()["error"]["message"]
    r = send(server.url, "POST", CHAT, chat(model="gpt-9"))
    assert r.json()["error"]["code"] == "model_not_found"
    good = send(server.url, "POST", CHAT, chat(temperature=0))
    assert good.status_code == 200 and good.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_openai_client_raises_its_matching_error_classes(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=model, messages=USER, max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="context window"):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "word " * 9000}])
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-9", messages=USER)
    with pytest.raises(openai.BadRequestError, match="vocabulary"):
        client.completions.create(model=model, prompt=[10 ** 7], max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=USER, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}})
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x" * (5 * 2 ** 20)}])
    assert e.value.status_code == 413
    assert server.healthy()


def metric(base: str, name: str) -> float:
    text = httpx.get(base + "/metrics", timeout=10).text
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def test_dropped_streams_free_their_requests_and_blocks(server):
    """16 streaming clients go away after their first content chunk: within seconds nothing runs and no KV block
    is held (each request would otherwise generate 400 more tokens)."""
    body = json.dumps({"messages": [{"role": "user", "content": "Write a very long story about a dragon."}],
                       "max_tokens": 400, "temperature": 0.8, "stream": True, "ignore_eos": True}).encode()
    clients = [httpx.Client(timeout=60) for _ in range(16)]
    streams = []
    for c in clients:
        cm = c.stream("POST", server.url + CHAT, content=body, headers={"Content-Type": "application/json"})
        streams.append((cm, cm.__enter__()))
    readers = []   # kept: a line iterator dropped early closes its connection (httpx), which is the point later
    for cm, r in streams:
        assert r.status_code == 200
        readers.append(r.iter_lines())
        for line in readers[-1]:
            if line.startswith("data: ") and '"content": "' in line and '"content": ""' not in line:
                break
    assert metric(server.url, "leaplm_requests_running") + metric(server.url, "leaplm_requests_waiting") > 0
    for (cm, r), c in zip(streams, clients):
        cm.__exit__(None, None, None)
        c.close()
    deadline = time.time() + 15
    while time.time() < deadline:
        running = metric(server.url, "leaplm_requests_running") + metric(server.url, "leaplm_requests_waiting")
        used = metric(server.url, "leaplm_kv_blocks_used")
        if running == 0 and used == 0:
            break
        time.sleep(0.2)
    assert (running, used) == (0, 0), f"{running} requests and {used} KV blocks still held 15 s after the clients left"
    assert 'leaplm_requests_total{status="aborted"}' in httpx.get(server.url + "/metrics").text


def test_api_key_and_queue_limit(start_server):
    s = start_server("--max-num-seqs", "1", "--max-queue", "0", api_key="s3cret")
    assert httpx.get(s.url + "/health").status_code == 200          # open without the key
    assert httpx.get(s.url + "/").status_code in (200, 404)         # the page itself is open; its API calls are not
    r = httpx.get(s.url + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    bad = openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret", max_retries=0, timeout=60)
    model = good.models.list().data[0].id
    # one running request fills the server (--max-num-seqs 1, --max-queue 0): the next is refused with 429
    auth = {"Authorization": "Bearer s3cret", "Content-Type": "application/json"}
    long = json.dumps({"messages": USER, "max_tokens": 300, "ignore_eos": True, "stream": True}).encode()
    with httpx.Client(timeout=60) as c, c.stream("POST", s.url + CHAT, content=long, headers=auth) as first:
        assert first.status_code == 200
        lines = first.iter_lines()   # kept alive: dropping it would close the connection
        next(lines)
        r = send(s.url, "POST", CHAT, chat(), headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 429 and r.headers.get("retry-after") == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
        with pytest.raises(openai.RateLimitError):
            good.chat.completions.create(model=model, messages=USER, max_tokens=2)
    assert s.stop() == 0


def test_non_streaming_clients_that_give_up_abort_their_requests(server):
    """A non-streaming client that times out (closes its connection) aborts its request too."""
    body = {"messages": [{"role": "user", "content": "Write a very long story about a cat."}], "max_tokens": 3000,
            "ignore_eos": True}
    for _ in range(4):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + CHAT, json=body, timeout=httpx.Timeout(60, read=1.0))
    deadline = time.time() + 15
    while time.time() < deadline:
        if metric(server.url, "leaplm_requests_running") + metric(server.url, "leaplm_requests_waiting") == 0:
            break
        time.sleep(0.2)
    assert metric(server.url, "leaplm_requests_running") + metric(server.url, "leaplm_requests_waiting") == 0
    assert metric(server.url, "leaplm_kv_blocks_used") == 0


def test_sigterm_stops_accepting_aborts_what_runs_and_exits_0(start_server):
    s = start_server("--shutdown-timeout", "2")
    body = json.dumps({"messages": USER, "max_tokens": 3000, "ignore_eos": True, "stream": True}).encode()
    with httpx.Client(timeout=60) as c, c.stream("POST", s.url + CHAT, content=body,
                                                 headers={"Content-Type": "application/json"}) as r:
        lines = r.iter_lines()
        next(lines)
        started = time.time()
        s.proc.send_signal(15)
        rest = list(lines)   # the stream ends (aborted after the 2 s grace), it does not hang
        assert time.time() - started < 30
    assert s.proc.wait(30) == 0, s.log()[-2000:]
    assert not any('"finish_reason": "length"' in line for line in rest)   # cut short, not run to 3000 tokens
    data = [line for line in rest if line.startswith("data: ")]
    assert "shutting down" in data[-2] and data[-1] == "data: [DONE]"   # the stream ends cleanly, saying why
    with pytest.raises(httpx.HTTPError):
        httpx.get(s.url + "/health", timeout=5)


def test_a_port_in_use_is_a_clear_error_and_exit_1(smollm_gguf):
    import socket
    import subprocess
    import sys

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "leaplm.cli", "serve", "--model", str(smollm_gguf), "--port",
                              str(port)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    assert f"the server did not start on 127.0.0.1:{port}" in out.stderr and "address already in use" in out.stderr
