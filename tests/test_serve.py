"""`primasim serve` tested as its users use it: a real server process on loopback, the official
`openai` client (strict response validation, no retries), streaming, cancellation, the API's
error objects, the API key and the size limits. The device-leaves test is in test_serve_recovery.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx
import pytest

openai = pytest.importorskip("openai")

KEY = "test-key-123"
MODEL = "llama-tiny"
ROOT = Path(__file__).resolve().parents[1]


def start_server(tmp: Path, *args: str, timeout: float = 600) -> tuple[subprocess.Popen, str]:
    ready = tmp / "ready.json"
    log = open(tmp / "serve.log", "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen([sys.executable, "-m", "primasim", "serve", "--listen", "127.0.0.1:0", "--ready-file",
                             str(ready), *args], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    t0 = time.monotonic()
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError("server did not start:\n" + (tmp / "serve.log").read_text()[-4000:])
        time.sleep(0.2)
    return proc, json.loads(ready.read_text())["url"]


def stop_server(proc: subprocess.Popen, tmp: Path) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError("server did not stop on SIGTERM") from None
    assert proc.returncode == 0, (tmp / "serve.log").read_text()[-4000:]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("serve")
    proc, url = start_server(tmp, "--cluster", "local", "--model", MODEL, "--random-weights", "--api-key", KEY,
                             "--slots", "2", "--n-ctx", "128", "--max-tokens", "100", "--prefill-buckets", "16,64",
                             "--max-body-kb", "64", "--max-queue", "8")
    yield url
    stop_server(proc, tmp)


@pytest.fixture
def client(server: str):  # type: ignore[no-untyped-def]
    return openai.OpenAI(base_url=server, api_key=KEY, max_retries=0, timeout=120, _strict_response_validation=True)


@pytest.fixture
def loose(server: str):  # type: ignore[no-untyped-def]
    """Without strict validation: openai's `Completion` type requires a finish_reason, which the
    legacy completions stream (OpenAI's own as well) leaves null until the last chunk."""
    return openai.OpenAI(base_url=server, api_key=KEY, max_retries=0, timeout=120)


def _reference_text(prompt_ids: list[int], n: int) -> str:
    """What the model generates greedily, computed in this process (runtime.model.generate)."""
    from primasim.core.model_sources import load_model
    from primasim.runtime import generate, load_params, load_tokenizer, open_checkpoint
    from primasim.runtime.head import cached_random_weights

    path = cached_random_weights(load_model(MODEL))
    ck = open_checkpoint(path)
    params = load_params(ck, range(ck.spec.n_layers), embed=True, head=True)
    out = generate(params, prompt_ids, n)
    tok = load_tokenizer(path)
    return tok.decode(list(out.tokens))


def test_models_and_health(client, server: str) -> None:  # type: ignore[no-untyped-def]
    ids = [m.id for m in client.models.list()]
    assert ids == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    r = httpx.get(server.replace("/v1", "/health"))
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_completion_is_the_models_greedy_output(client) -> None:  # type: ignore[no-untyped-def]
    ids = [5, 17, 42, 9]
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == 4 and r.usage.completion_tokens == 12
    assert r.choices[0].text == _reference_text(ids, 12)


def test_streaming_equals_the_whole_answer(client, loose) -> None:  # type: ignore[no-untyped-def]
    kw = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 10, "temperature": 0,
          "extra_body": {"ignore_eos": True}}
    whole = client.completions.create(**kw).choices[0].text
    chunks = list(loose.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == whole and finals == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10
    assert len({c.id for c in chunks}) == 1
    assert sum(1 for c in chunks if c.choices) == 11  # one chunk per token, then the finish


def test_sampling_is_seeded(client) -> None:  # type: ignore[no-untyped-def]
    kw = {"model": MODEL, "prompt": "abc", "max_tokens": 16, "temperature": 1.0, "top_p": 0.9,
          "extra_body": {"ignore_eos": True}}
    a = client.completions.create(seed=7, **kw).choices[0].text
    b = client.completions.create(seed=7, **kw).choices[0].text
    c = client.completions.create(seed=8, **kw).choices[0].text
    assert a == b and a != c


def test_chat_completion_and_stream(client) -> None:  # type: ignore[no-untyped-def]
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_completion_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens == 6
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_concurrent_requests_share_the_slots(client) -> None:  # type: ignore[no-untyped-def]
    out: dict[int, str] = {}

    def one(i: int) -> None:
        r = client.completions.create(model=MODEL, prompt=[i + 1, 2, 3], max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})
        out[i] = r.choices[0].text

    ts = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert sorted(out) == list(range(6))
    for i in range(6):  # batching did not change anybody's tokens
        assert out[i] == _reference_text([i + 1, 2, 3], 8)


def test_disconnect_frees_the_slot(client, loose, server: str) -> None:  # type: ignore[no-untyped-def]
    status = server + "/primasim/status"
    hdr = {"Authorization": f"Bearer {KEY}"}
    for _ in range(2):  # both slots taken by streams that are dropped after two chunks
        stream = loose.completions.create(model=MODEL, prompt=[1, 2], max_tokens=100, stream=True,
                                           extra_body={"ignore_eos": True})
        it = iter(stream)
        next(it), next(it)
        stream.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        st = httpx.get(status, headers=hdr).json()
        if st["running"] == 0 and st["waiting"] == 0:
            break
        time.sleep(0.1)
    assert st["running"] == 0 and st["waiting"] == 0, st
    r = client.completions.create(model=MODEL, prompt=[3], max_tokens=3, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3


def test_stop_strings_cut_the_text(client) -> None:  # type: ignore[no-untyped-def]
    base = client.completions.create(model=MODEL, prompt=[7, 7, 7], max_tokens=20, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    assert len(base) > 4
    stop = base[2:4]
    r = client.completions.create(model=MODEL, prompt=[7, 7, 7], max_tokens=20, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == base[:base.find(stop)]


@pytest.mark.parametrize("kw, code", [
    ({"prompt": "x", "n": 2}, "unsupported"),
    ({"prompt": "x", "max_tokens": 1000}, "invalid_value"),
    ({"prompt": [1] * 120, "max_tokens": 20}, "context_length_exceeded"),
    ({"prompt": "x", "temperature": 3}, "invalid_value"),
    ({"prompt": [999999]}, None),
    ({"prompt": ["a", "b"]}, None),
    ({"prompt": "x", "logit_bias": {"1": 5}}, "unsupported"),
])
def test_bad_requests_get_error_objects(client, kw, code) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, **kw)
    assert e.value.status_code == 400
    body = e.value.body
    assert isinstance(body, dict) and body["message"] and body["type"] == "invalid_request_error"
    if code:
        assert body["code"] == code


def test_wrong_model_key_and_size(server: str) -> None:
    bad = openai.OpenAI(base_url=server, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    ok = openai.OpenAI(base_url=server, api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        ok.completions.create(model="other", prompt="x")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.APIStatusError) as e2:
        ok.completions.create(model=MODEL, prompt="x" * 100_000)
    assert e2.value.status_code == 413
    r = httpx.post(server + "/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}",
                                                                          "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(server + "/nope", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and "error" in r.json()


def test_refuses_to_listen_beyond_loopback_without_a_key(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "primasim", "serve", "--cluster", "local", "--model", MODEL,
                          "--random-weights", "--listen", "0.0.0.0:0"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PRIMASIM_API_KEY": ""})
    assert out.returncode == 2 and "--api-key" in out.stderr and "Traceback" not in out.stderr


def test_queue_bound(client) -> None:  # type: ignore[no-untyped-def]
    """More requests than --max-queue (8) at once: the rest get 429 (the client would retry them)."""
    errors, done = [], []
    go = threading.Barrier(14)  # all at once: started one by one, early ones finished before the last was sent

    def one() -> None:
        go.wait(60)
        try:
            client.completions.create(model=MODEL, prompt=[1], max_tokens=30, extra_body={"ignore_eos": True})
            done.append(1)
        except openai.RateLimitError as exc:
            errors.append(exc)

    ts = [threading.Thread(target=one) for _ in range(14)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(180)
    assert errors and done and len(errors) + len(done) == 14
    assert all(e.status_code == 429 for e in errors)
