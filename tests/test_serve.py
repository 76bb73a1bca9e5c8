"""The Serve application over HTTP on 127.0.0.1: OpenAI routes, learning, limits, listeners.

Ray starts once for this module (embedded, loopback-only, 2 CPUs) with a tiny byte-level
checkpoint; every test talks to the running application through HTTP.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading

import importlib.util

import numpy as np
import pytest

from actors.runtime import LOOPBACK_ENVIRONMENT

# Ray reads its listen addresses when it is first imported, so the loopback settings are
# applied before anything in this module can import it.
os.environ.update(LOOPBACK_ENVIRONMENT)
if importlib.util.find_spec("ray") is None:
    pytest.skip("ray[serve] is not installed", allow_module_level=True)
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

LEARN_TOKEN = "learn-secret"
CHECKPOINT: dict[str, str] = {}  # "path": the served checkpoint folder, set by the server fixture
SPECIAL = "<|endoftext|>"


def make_checkpoint(path: str) -> None:
    """A SOMI checkpoint with a byte-level BPE tokenizer (256 bytes + one special token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from somi_ray.config import SomiConfig
    from somi_ray.lineage import Lineage, save_checkpoint
    from somi_ray.model import SomiModel

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[SPECIAL],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    model = SomiModel(SomiConfig.auto(32, 2, vocab_size=vocab), seed=0)
    lineage = Lineage()
    lineage.append("init", {"hidden_size": 32, "n_parts": 2}, {})
    save_checkpoint(path, model, tokenizer.to_str(), lineage)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_session):
    """A running Serve application on the session's Ray; yields its base URL."""
    from actors.serve_app import ServeOptions, run_server

    temp = tempfile.mkdtemp(prefix="sv", dir="/tmp")
    checkpoint = os.path.join(temp, "ckpt")
    make_checkpoint(checkpoint)
    CHECKPOINT["path"] = checkpoint
    options = ServeOptions(checkpoint_dir=checkpoint, model_name="somi-test", replicas=2, learn_tokens=[LEARN_TOKEN],
                           learn_rate=1000.0, learn_burst=1000, refresh_ms=50, max_prompt_tokens=64,
                           max_tokens_limit=32, max_body_bytes=8192)
    port = free_port()
    from ray import serve

    try:
        url = run_server(options, "127.0.0.1", port, block=False)
        yield url
    finally:
        serve.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def model_version(url: str) -> int:
    return httpx.get(f"{url}/status").json()["version"]


def client(url: str, token: str = "none") -> "openai.OpenAI":
    return openai.OpenAI(base_url=url, api_key=token, max_retries=0, timeout=60)


# ------------------------------------------------------------------------------ OpenAI routes


def test_models_lists_served_model(server):
    models = client(server).models.list()
    assert [m.id for m in models.data] == ["somi-test"]


def test_completion_has_somi_scores(server):
    completion = client(server).completions.create(model="somi-test", prompt="the quick", max_tokens=4, seed=1)
    choice = completion.choices[0]
    somi = choice.model_extra["somi"]
    assert isinstance(choice.text, str)
    assert completion.usage.completion_tokens >= 1
    assert choice.finish_reason in ("length", "stop")
    assert np.isfinite(somi["mean_stress"])
    assert 0.0 <= somi["settle_stability"] <= 1.0
    assert -1.0 <= somi["consistency"] <= 1.0
    assert somi["mean_logprob"] <= 0.0
    assert somi["version"] >= 1


def test_completion_seed_is_reproducible(server):
    first = client(server).completions.create(model="somi-test", prompt="the lazy", max_tokens=6, seed=7)
    second = client(server).completions.create(model="somi-test", prompt="the lazy", max_tokens=6, seed=7)
    if first.choices[0].model_extra["somi"]["version"] == second.choices[0].model_extra["somi"]["version"]:
        assert first.choices[0].text == second.choices[0].text


def test_completion_n_and_fusion_select(server):
    openai_client = client(server)
    many = openai_client.completions.create(model="somi-test", prompt="the fox", max_tokens=3, n=3, seed=3)
    assert [c.index for c in many.choices] == [0, 1, 2]

    chosen = openai_client.completions.create(model="somi-test", prompt="the fox", max_tokens=3, n=3, seed=3,
                                              extra_body={"somi_select": "fusion"})
    candidates = chosen.model_extra["somi"]["candidates"]
    best = max(range(3), key=lambda i: candidates[i]["fusion"])
    assert len(chosen.choices) == 1
    assert chosen.choices[0].model_extra["somi"]["candidate"] == best


def test_completion_stop_string(server):
    completion = client(server).completions.create(model="somi-test", prompt="the", max_tokens=32, seed=5,
                                                   temperature=1.5, stop=["o", "e", " "])
    choice = completion.choices[0]
    assert not any(s in choice.text for s in ("o", "e", " "))


def test_chat_completion(server):
    chat = client(server).chat.completions.create(
        model="somi-test", messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        max_tokens=4, temperature=0.0)
    assert chat.choices[0].message.role == "assistant"
    assert isinstance(chat.choices[0].message.content, str)
    assert "consistency" in chat.choices[0].model_extra["somi"]


def test_completion_stream_matches_batch(server):
    openai_client = client(server)
    stream = openai_client.completions.create(model="somi-test", prompt="the quick", max_tokens=8, seed=11,
                                              stream=True)
    pieces, finish, somi = [], None, None
    for chunk in stream:
        pieces.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
        somi = chunk.choices[0].model_extra.get("somi") or somi
    whole = openai_client.completions.create(model="somi-test", prompt="the quick", max_tokens=8, seed=11)
    assert finish in ("length", "stop")
    assert somi is not None
    if somi["version"] == whole.choices[0].model_extra["somi"]["version"]:
        assert "".join(pieces) == whole.choices[0].text


def test_chat_stream(server):
    stream = client(server).chat.completions.create(
        model="somi-test", messages=[{"role": "user", "content": "the fox"}], max_tokens=5, stream=True, seed=2)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant" or chunks[0].choices[0].finish_reason
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


# ------------------------------------------------------------------------------ learning and status


def test_learn_advances_version(server):
    before = model_version(server)
    response = httpx.post(f"{server}/learn", json={"text": "the quick brown fox jumps over the lazy dog"},
                          headers={"Authorization": f"Bearer {LEARN_TOKEN}"})
    assert response.status_code == 200, response.text
    assert response.json()["version"] == before + 1
    assert model_version(server) == before + 1


def test_completion_learn_flag(server):
    before = model_version(server)
    completion = client(server, LEARN_TOKEN).completions.create(
        model="somi-test", prompt="the lazy dog sleeps", max_tokens=2, extra_body={"learn": True})
    assert completion.model_extra["somi"]["learned"] is True
    assert completion.model_extra["somi"]["version"] >= before + 1
    assert model_version(server) == before + 1


def test_status_and_health(server):
    status = httpx.get(f"{server}/status").json()
    assert status["hidden_size"] == 32
    assert status["parts"] == 2
    assert status["systems"] >= 1
    assert status["lineage_length"] >= 1
    assert len(status["stress_ema"]) == 2
    assert status["teachers_absorbed"] == []
    health = httpx.get(server.removesuffix("/v1") + "/healthz")
    assert health.status_code == 200


# ------------------------------------------------------------------------------ hostile requests

AUTH = {"Authorization": f"Bearer {LEARN_TOKEN}"}
JSON = {"Content-Type": "application/json"}

# (name, path, raw body or JSON object, extra headers, expected status, word the message must name)
HOSTILE = [
    ("malformed json", "completions", b'{"prompt": "a",', {}, 400, "body"),
    ("json array", "completions", b'["a"]', {}, 400, "body"),
    ("nan constant", "completions", b'{"prompt": "a", "temperature": NaN}', {}, 400, "body"),
    ("non utf8", "completions", b'{"prompt": "\xff\xfe"}', {}, 400, "body"),
    ("empty body", "completions", b"", {}, 400, "body"),
    ("missing prompt", "completions", {"max_tokens": 2}, {}, 400, "prompt"),
    ("prompt int", "completions", {"prompt": 5}, {}, 400, "prompt"),
    ("prompt list", "completions", {"prompt": ["a", "b"]}, {}, 400, "prompt"),
    ("empty prompt", "completions", {"prompt": ""}, {}, 400, "prompt"),
    ("special tokens only", "completions", {"prompt": SPECIAL * 3}, {}, 400, "prompt"),
    ("prompt too long", "completions", {"prompt": "the quick brown fox " * 40}, {}, 400, "prompt"),
    ("max_tokens negative", "completions", {"prompt": "a", "max_tokens": -1}, {}, 400, "max_tokens"),
    ("max_tokens zero", "completions", {"prompt": "a", "max_tokens": 0}, {}, 400, "max_tokens"),
    ("max_tokens huge", "completions", {"prompt": "a", "max_tokens": 10**9}, {}, 400, "max_tokens"),
    ("max_tokens string", "completions", {"prompt": "a", "max_tokens": "5"}, {}, 400, "max_tokens"),
    ("max_tokens float", "completions", {"prompt": "a", "max_tokens": 2.5}, {}, 400, "max_tokens"),
    ("max_tokens bool", "completions", {"prompt": "a", "max_tokens": True}, {}, 400, "max_tokens"),
    ("temperature negative", "completions", {"prompt": "a", "temperature": -0.5}, {}, 400, "temperature"),
    ("top_p zero", "completions", {"prompt": "a", "top_p": 0.0}, {}, 400, "top_p"),
    ("n too large", "completions", {"prompt": "a", "n": 1000}, {}, 400, "'n'"),
    ("seed negative", "completions", {"prompt": "a", "seed": -3}, {}, 400, "seed"),
    ("stop too many", "completions", {"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, {}, 400, "stop"),
    ("unknown field", "completions", {"prompt": "a", "frobnicate": 1}, {}, 400, "frobnicate"),
    ("wrong model", "completions", {"prompt": "a", "model": "gpt-9"}, {}, 404, "model"),
    ("select with stream", "completions", {"prompt": "a", "n": 2, "stream": True, "somi_select": "fusion"}, {}, 400,
     "somi_select"),
    ("learn flag without token", "completions", {"prompt": "the fox", "learn": True}, {}, 401, "authorization"),
    ("learn flag not bool", "completions", {"prompt": "the fox", "learn": "yes"}, AUTH, 400, "learn"),
    ("oversized body", "completions", {"prompt": "a" * 20000}, {}, 413, "body"),
    ("chat no messages", "chat/completions", {"messages": []}, {}, 400, "messages"),
    ("chat bad role", "chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, {}, 400,
     "messages.0.role"),
    ("chat content int", "chat/completions", {"messages": [{"role": "user", "content": 3}]}, {}, 400,
     "messages.0.content"),
    ("chat max_completion huge", "chat/completions",
     {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 999}, {}, 400,
     "max_completion_tokens"),
    ("learn missing token", "learn", {"text": "the quick brown fox"}, {}, 401, "authorization"),
    ("learn wrong token", "learn", {"text": "the quick brown fox"}, {"Authorization": "Bearer nope"}, 401,
     "authorization"),
    ("learn text and texts", "learn", {"text": "a b", "texts": ["a b"]}, AUTH, 400, "text"),
    ("learn texts not list", "learn", {"texts": "the fox"}, AUTH, 400, "texts"),
    ("learn special only", "learn", {"text": SPECIAL + SPECIAL}, AUTH, 400, "text"),
    ("learn one token", "learn", {"text": "a"}, AUTH, 400, "text"),
    ("learn too long", "learn", {"texts": ["the quick brown fox " * 40]}, AUTH, 400, "texts.0"),
]


@pytest.mark.parametrize("name,path,body,headers,status,param", HOSTILE, ids=[case[0] for case in HOSTILE])
def test_hostile_request_rejected(server, name, path, body, headers, status, param):
    before = model_version(server)
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{server}/{path}", content=raw, headers={**JSON, **headers}, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert param.strip("'") in (error["param"] or ""), error
    assert param.strip("'").split(".")[-1] in error["message"] or error["param"] in ("body", "authorization"), error
    assert model_version(server) == before


def test_hostile_cases_at_least_25():
    assert len(HOSTILE) >= 25


def test_read_token_unset_reads_open(server):
    assert httpx.get(f"{server}/models").status_code == 200


# ------------------------------------------------------------------------------ concurrency


@pytest.mark.slow
def test_concurrent_learning_and_inference(server):
    """16 clients x 50 requests, half of the clients learning; the version rises once per accepted learn."""
    import torch

    from somi_ray.lineage import load_checkpoint

    before = model_version(server)
    failures: list[str] = []
    learned = [0] * 16

    def worker(index: int) -> None:
        learner = index % 2 == 0
        with httpx.Client(timeout=120) as http:
            for request in range(50):
                if learner and request % 2 == 0:
                    response = http.post(f"{server}/learn", json={"text": f"fox {index} jumps {request}"},
                                         headers=AUTH)
                elif learner:
                    response = http.post(f"{server}/completions", headers=AUTH,
                                         json={"prompt": f"dog {request}", "max_tokens": 1, "learn": True})
                else:
                    response = http.post(f"{server}/completions",
                                         json={"prompt": f"the {request}", "max_tokens": 2})
                if response.status_code != 200:
                    failures.append(f"client {index} request {request}: {response.status_code} {response.text}")
                elif learner:
                    learned[index] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert failures == []
    assert model_version(server) == before + sum(learned)
    # The ModelActor commits before it answers, so the checkpoint holds the served weights.
    committed = load_checkpoint(CHECKPOINT["path"])
    assert committed.version == before + sum(learned)
    bad = [name for name, value in committed.model.state_dict().items()
           if value.is_floating_point() and not name.endswith("stress_ema") and not torch.isfinite(value).all()]
    assert bad == []


# ------------------------------------------------------------------------------ listeners


def test_serve_listeners_loopback_only(server):
    """Every listening socket of this test's Ray processes is on 127.0.0.1."""
    psutil = pytest.importorskip("psutil")

    processes = psutil.Process(os.getpid()).children(recursive=True)
    listeners = []
    for process in processes:
        try:
            connections = process.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        listeners += [(process.pid, process.name(), c.laddr.ip, c.laddr.port)
                      for c in connections if c.status == psutil.CONN_LISTEN]
    port = int(server.split(":")[-1].split("/")[0])
    assert any(entry[3] == port for entry in listeners)
    exposed = [entry for entry in listeners if entry[2] not in ("127.0.0.1", "::ffff:127.0.0.1")]
    assert exposed == []
