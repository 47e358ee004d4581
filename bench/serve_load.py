"""Load on `chatforge serve`: how continuous batching shares the model among concurrent clients.

    python bench/serve_load.py                      # cpu preset model, 1, 4, 16 and 64 clients
    python bench/serve_load.py --checkpoint RUN     # your own model

Starts `chatforge serve` on a loopback port (by default on a model with the `cpu` preset's architecture and
random weights: speed does not depend on the weights, and a random model's answers run to max_tokens, so
every request asks for the same work). For each concurrency level, that many client threads each send
streaming chat requests one after another (a bounded count, and a time bound) and measure time to the
first token, latency and output tokens (the usage the server reports). The levels run in turns for
--rounds rounds; throughput is the median over rounds, times are percentiles over every request. Prints a
table and writes bench/results/serve_load.json.

Targets (cpu preset model): at 16 clients, output tokens/s >= 5x that of 1 client, and p99 time to first
token < 1 s.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from chatforge import config as cfg
from chatforge.checkpoint import save_checkpoint
from chatforge.sources import nonempty_documents, write_sample_corpus
from chatforge.model import GPT
from chatforge.pretrain import PretrainConfig
from chatforge.tokenizer import train_bpe
from timing import write_report  # bench/timing.py


def random_model(preset: str, out: Path, vocab_size: int) -> Path:
    """A checkpoint with the preset's architecture, random weights and a BPE tokenizer of Python's docs."""
    corpus, _ = write_sample_corpus(out / "corpus.jsonl", docstrings=False)
    tokenizer = train_bpe(nonempty_documents([corpus]), vocab_size)
    model_config = cfg.from_dict(PretrainConfig, cfg.load_preset(preset, "pretrain")).model
    torch.manual_seed(0)
    model = GPT(cfg.from_dict(type(model_config), {**cfg.to_dict(model_config), "vocab_size": tokenizer.vocab_size}))
    return save_checkpoint(out / "model", model, tokenizer)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def one_request(port: int, body: bytes) -> tuple[float, float, int]:
    """(seconds to the first token, seconds to the end, output tokens) of one streamed chat completion."""
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
    first, tokens = None, 0
    for line in response:  # parsed only where needed: the clients share the server's CPU
        if first is None and b'"content": "' in line and b'"content": ""' not in line:
            first = time.perf_counter() - start
        if line.startswith(b"data: ") and b'"choices": [], "usage": {' in line:  # not an answer's text
            tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    conn.close()
    return first if first is not None else time.perf_counter() - start, time.perf_counter() - start, tokens


def load(port: int, model: str, clients: int, requests_per_client: int, max_tokens: int, time_limit: float) -> dict:
    """One round at one concurrency level: its throughput, and each request's (TTFT, latency, tokens)."""
    results, errors = [], []
    deadline = time.perf_counter() + time_limit

    def client(index: int) -> None:
        for i in range(requests_per_client):
            if time.perf_counter() > deadline:
                return
            body = json.dumps({"model": model, "max_tokens": max_tokens, "temperature": 1.0, "stream": True,
                               "stream_options": {"include_usage": True},
                               "messages": [{"role": "user", "content": f"Client {index} asks question {i}."}]})
            try:
                results.append(one_request(port, body.encode()))
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors.append(str(e))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    for message in sorted(set(errors)):
        print(f"  error ({errors.count(message)}x): {message}")
    return {"requests": results, "errors": len(errors), "requests_per_s": len(results) / wall,
            "output_tokens_per_s": sum(r[2] for r in results) / wall}


def summary(clients: int, rounds: list[dict]) -> dict:
    """Medians over the rounds for throughput; percentiles over every request of every round for times."""
    requests = [r for one in rounds for r in one["requests"]]
    ttft, latency = [r[0] for r in requests], [r[1] for r in requests]
    return {"clients": clients, "rounds": len(rounds), "requests": len(requests),
            "errors": sum(one["errors"] for one in rounds),
            "requests_per_s": statistics.median(one["requests_per_s"] for one in rounds),
            "output_tokens_per_s": statistics.median(one["output_tokens_per_s"] for one in rounds),
            "output_tokens_per_s_rounds": [round(one["output_tokens_per_s"], 1) for one in rounds],
            "ttft_p50": statistics.median(ttft), "ttft_p99": percentile(ttft, 99),
            "latency_p50": statistics.median(latency), "latency_p99": percentile(latency, 99)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="serve this model (default: the preset's architecture, random weights)")
    parser.add_argument("--preset", default="cpu", help="architecture of the random model (default: cpu)")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64], help="concurrency levels")
    parser.add_argument("--requests", type=int, default=64, help="requests per level (split among its clients, at least 2 each)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per answer")
    parser.add_argument("--time-limit", type=float, default=120, help="seconds per level and round at most")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of all levels, taken in turns (medians)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve_load.json"))
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = args.checkpoint or random_model(args.preset, Path(scratch), args.vocab_size)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = subprocess.Popen([sys.executable, "-m", "chatforge", "serve", str(checkpoint), "--port", str(port),
                                   "--model-name", "bench", "--device", args.device, "--max-batch", "64"])
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                    conn.request("GET", "/health")
                    if conn.getresponse().status == 200:
                        break
                except OSError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the server did not come up")
                time.sleep(0.1)
            load(port, "bench", 2, 1, args.max_tokens, 30)  # warm-up: first calls, allocations
            rounds = {clients: [] for clients in args.clients}
            for _ in range(args.rounds):  # the levels in turns, so that the machine's drift hits all alike
                for clients in args.clients:
                    rounds[clients].append(load(port, "bench", clients, max(2, args.requests // clients),
                                                args.max_tokens, args.time_limit))
            rows = [summary(clients, rounds[clients]) for clients in args.clients]
            print(f"{'clients':>7} {'requests':>8} {'req/s':>7} {'out tok/s':>10} {'TTFT p50':>9} {'TTFT p99':>9} "
                  f"{'lat p50':>8} {'lat p99':>8} {'errors':>6}")
            for row in rows:
                print(f"{row['clients']:>7} {row['requests']:>8} {row['requests_per_s']:>7.2f} {row['output_tokens_per_s']:>10.1f} "
                      f"{row['ttft_p50']:>8.3f}s {row['ttft_p99']:>8.3f}s {row['latency_p50']:>7.2f}s "
                      f"{row['latency_p99']:>7.2f}s {row['errors']:>6}")
        finally:
            server.terminate()
            server.wait(timeout=30)
    by_clients = {r["clients"]: r for r in rows}
    if 1 in by_clients and 16 in by_clients:
        ratio = by_clients[16]["output_tokens_per_s"] / by_clients[1]["output_tokens_per_s"]
        ttft = by_clients[16]["ttft_p99"]
        print(f"16 clients: {ratio:.2f}x the output tokens/s of 1 client, medians of {args.rounds} rounds (target >= 5x); "
              f"p99 time to first token {ttft:.3f} s (target < 1 s)")
    write_report(args.out, rows, checkpoint=args.checkpoint or f"random {args.preset} preset",
                 max_tokens=args.max_tokens, device=args.device, rounds=args.rounds)


if __name__ == "__main__":
    main()
