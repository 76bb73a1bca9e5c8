"""Latency and throughput of 32-token completions through Serve against the same work in process.

Four rows, printed side by side: in process and through Serve, each with learning off and
on. "In process" runs the replicas' own decoding and scoring code (`Decoding`) on a model
loaded from the checkpoint. With learning on, a background client keeps sending one learn
request at a time (through Serve) or one learning step runs between completions (in process).

    .venv/bin/python bench/bench_serve.py [--checkpoint DIR] [--requests 40] [--clients 4]

Without --checkpoint a small random model (hidden 32, 2 Parts, byte-level BPE) is built in a
temporary folder.
"""

import argparse
import os
import shutil
import socket
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

PROMPT = "the quick brown fox jumps over the lazy dog and"
LEARN_TEXT = "the quick brown fox jumps over the lazy dog while the cat sleeps"


def make_checkpoint(path: str, hidden: int, parts: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from somi_ray.config import SomiConfig
    from somi_ray.lineage import Lineage, save_checkpoint
    from somi_ray.model import SomiModel

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([LEARN_TEXT] * 20, trainer)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    lineage = Lineage()
    lineage.append("init", {"hidden_size": hidden, "n_parts": parts}, {})
    save_checkpoint(path, SomiModel(SomiConfig.auto(hidden, parts, vocab_size=vocab), seed=0),
                    tokenizer.to_str(), lineage)


def summarize(latencies: list[float], seconds: float) -> dict:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return {"p50_ms": 1000 * statistics.median(ordered), "p99_ms": 1000 * p99, "rps": len(ordered) / seconds}


def bench_in_process(checkpoint: str, requests: int, learning: bool) -> dict:
    import torch

    from actors.serve_app import Decoding, special_token_ids
    from somi_ray.lineage import load_checkpoint

    torch.set_num_threads(1)  # the same as a Serve replica
    loaded = load_checkpoint(checkpoint)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer()
    special = special_token_ids(tokenizer)
    prompt_ids = tokenizer.encode(PROMPT).ids
    learn_ids = torch.tensor([tokenizer.encode(LEARN_TEXT).ids])  # (1, T+1)
    optimizer = model.make_optimizer() if learning else None

    latencies = []
    started = time.perf_counter()
    for seed in range(requests):
        begin = time.perf_counter()
        decoding = Decoding(model, tokenizer, prompt_ids, 1, 32, 1.0, 1.0, [], seed, special, 512)
        while not decoding.done:
            decoding.step()
        decoding.scores(0)
        latencies.append(time.perf_counter() - begin)
        if learning:
            model.learn_step(learn_ids, optimizer)
            model.eval()
    return summarize(latencies, time.perf_counter() - started)


def bench_serve(url: str, requests: int, clients: int, learning: bool) -> dict:
    import httpx

    stop = threading.Event()
    learned = [0]

    def learner() -> None:
        with httpx.Client(timeout=120) as http:
            while not stop.is_set():
                if http.post(f"{url}/learn", json={"text": LEARN_TEXT}).status_code == 200:
                    learned[0] += 1

    def one(seed: int) -> float:
        begin = time.perf_counter()
        response = http_clients[seed % clients].post(
            f"{url}/completions", json={"prompt": PROMPT, "max_tokens": 32, "seed": seed})
        response.raise_for_status()
        return time.perf_counter() - begin

    http_clients = [httpx.Client(timeout=120) for _ in range(clients)]
    one(0)  # warm-up: the replica loads its first snapshot
    background = threading.Thread(target=learner) if learning else None
    if background:
        background.start()
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = list(pool.map(one, range(requests)))
    seconds = time.perf_counter() - started
    stop.set()
    if background:
        background.join()
    for http in http_clients:
        http.close()
    return dict(summarize(latencies, seconds), learned=learned[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="SOMI checkpoint folder (default: a small random model)")
    parser.add_argument("--hidden", type=int, default=32, help="hidden size of the default model")
    parser.add_argument("--parts", type=int, default=2, help="Parts of the default model")
    parser.add_argument("--requests", type=int, default=40, help="completions per row")
    parser.add_argument("--clients", type=int, default=4, help="concurrent HTTP clients")
    parser.add_argument("--replicas", type=int, default=2, help="SomiServer replicas")
    args = parser.parse_args()

    temp = tempfile.mkdtemp(prefix="sb", dir="/tmp")
    checkpoint = args.checkpoint
    try:
        if checkpoint is None:
            checkpoint = os.path.join(temp, "ckpt")
            make_checkpoint(checkpoint, args.hidden, args.parts)
        local = {flag: bench_in_process(checkpoint, args.requests, flag) for flag in (False, True)}

        from ray import serve

        from actors.runtime import RayOptions, start_ray
        from actors.serve_app import ServeOptions, run_server

        # A copy, so learning through Serve leaves the given checkpoint as it was.
        served = os.path.join(temp, "served")
        shutil.copytree(checkpoint, served)
        ray = start_ray(RayOptions(num_cpus=2, temp_dir=os.path.join(temp, "r")))
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        options = ServeOptions(checkpoint_dir=served, replicas=args.replicas, learn_rate=1000.0, learn_burst=1000)
        try:
            url = run_server(options, "127.0.0.1", port, block=False)
            remote = {flag: bench_serve(url, args.requests, args.clients, flag) for flag in (False, True)}
        finally:
            serve.shutdown()
            ray.shutdown()
    finally:
        shutil.rmtree(temp, ignore_errors=True)

    print(f"32-token completions, {args.requests} per row; Serve: {args.replicas} replicas, {args.clients} clients")
    print(f"{'learning':>8} | {'in-process p50/p99 ms':>22} {'req/s':>7} | {'Serve p50/p99 ms':>18} {'req/s':>7}"
          f" {'learns':>6} | {'p50 ratio':>9}")
    for flag in (False, True):
        a, b = local[flag], remote[flag]
        print(f"{'on' if flag else 'off':>8} | {a['p50_ms']:>10.1f} /{a['p99_ms']:>9.1f} {a['rps']:>7.2f} | "
              f"{b['p50_ms']:>8.1f} /{b['p99_ms']:>7.1f} {b['rps']:>7.2f} {b['learned']:>6} | "
              f"{b['p50_ms'] / a['p50_ms']:>9.2f}")


if __name__ == "__main__":
    main()
