"""Throughput of serve.py under concurrent clients (continuous batching), on the CPU, float32.

    python benchmarks/bench_serve.py                          # 1, 4 and 8 clients (about a minute, 2 cores)
    python benchmarks/bench_serve.py --clients 1 2 4 8 16 --max-batch 16

The tests' tiny random model (tests/checkpoints.py: 48 wide, 2 layers, the real vocabulary of 131072 and
an untied head) is written to a temporary folder and served by `python serve.py --max-batch N`, float32
on the CPU, in a subprocess. For each number of clients c, c threads share one list of requests (greedy
chat completions, a prompt each, --max-tokens each), each thread sending its next request as soon as its
last is answered. Per c:
    aggregate     all answers' generated tokens (their usage) / the wall time of the whole list
    latency       per request, from sending to the end of its answer: mean and the slowest
    same          every answer equal to the one its prompt got with one client (greedy: it must be)
The runs take turns (c = 1, 4, 8, then again, --rounds times) and the best aggregate of each c counts,
with that run's latencies; the first one-client run gives the reference answers, and every run of
every round is checked against them. One request warms the server up first. The machine's load average
(1 minute) is printed before and after: the machine is shared, and figures move with it.
"""
import argparse
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from checkpoints import TINY_PARAMS, write_native  # noqa: E402
from tekken_files import write_tekken  # noqa: E402

PARAMS = {**TINY_PARAMS, "vocab_size": 131072}   # the tokenizer's: tekken.json has 131072 ids


def serve(folder: Path, max_batch: int, log: Path, threads: int | None) -> tuple[subprocess.Popen, str]:
    """serve.py on a free port; the process and its host:port once it listens."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--model", str(folder), "--dtype", "float32",
                             "--device", "cpu", "--port", "0", "--max-batch", str(max_batch)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        found = re.search(r"on http://(127\.0\.0\.1:\d+)/v1", log.read_text())
        if found:
            return proc, found.group(1)
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"the server did not start:\n{log.read_text()[-2000:]}")


def ask(address: str, prompt: str, max_tokens: int) -> tuple[str, int, float]:
    """One greedy chat completion: (content, generated tokens, seconds)."""
    body = json.dumps({"messages": [{"role": "user", "content": prompt}], "temperature": 0,
                       "max_tokens": max_tokens})
    conn = http.client.HTTPConnection(address, timeout=600)
    start = time.perf_counter()
    try:
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        answer = json.loads(response.read())
    finally:
        conn.close()
    if response.status != 200:
        raise SystemExit(f"the server answered {response.status}: {answer}")
    return answer["choices"][0]["message"]["content"], answer["usage"]["completion_tokens"], \
        time.perf_counter() - start


def run(address: str, prompts: list[str], clients: int, max_tokens: int) -> tuple[list, float]:
    """Every prompt answered, `clients` at a time: ([(content, tokens, seconds)] in prompt order, wall seconds)."""
    results, todo, lock = [None] * len(prompts), iter(range(len(prompts))), threading.Lock()

    def client():
        while True:
            with lock:
                k = next(todo, None)
            if k is None:
                return
            results[k] = ask(address, prompts[k], max_tokens)
    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8], help="the runs, by number of clients "
                                                                            "(default: 1 4 8)")
    p.add_argument("--requests", type=int, default=32, help="requests in each run (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per answer (default: %(default)s)")
    p.add_argument("--layers", type=int, default=PARAMS["n_layers"], help="the tiny model's layers (default: "
                                                                           "%(default)s, the tests')")
    p.add_argument("--threads", type=int, help="the server's torch threads (OMP_NUM_THREADS; default: torch's)")
    p.add_argument("--rounds", type=int, default=3, help="runs of each number of clients, taking turns; the "
                                                         "best counts (default: %(default)s)")
    p.add_argument("--max-batch", type=int, default=8, help="the server's --max-batch (default: %(default)s)")
    args = p.parse_args(argv)
    prompts = [f"Question {k}: what is {k} times {k + 7}? Explain step by step." for k in range(args.requests)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        params = {**PARAMS, "n_layers": args.layers}
        write_native(folder, params, seed=0)
        write_tekken(folder, "v11")
        proc, address = serve(folder, args.max_batch, Path(tmp) / "server.log", args.threads)
        try:
            ask(address, "warm up", 4)
            print(f"serve.py --max-batch {args.max_batch}, {params['dim']}-wide {params['n_layers']}-layer model "
                  f"(vocabulary {params['vocab_size']}), float32, CPU; {args.requests} greedy requests of "
                  f"{args.max_tokens} tokens per run; torch threads: {args.threads or 'default'}\n")
            load = os.getloadavg()[0]
            best, reference, same = {}, None, {c: 0 for c in args.clients}
            for _ in range(args.rounds):
                for clients in sorted(args.clients):
                    results, seconds = run(address, prompts, clients, args.max_tokens)
                    rate = sum(tokens for _, tokens, _ in results) / seconds
                    reference = reference or [content for content, _, _ in results]
                    same[clients] += sum(content == want for (content, _, _), want in zip(results, reference))
                    if rate > best.get(clients, (0,))[0]:
                        best[clients] = rate, [s for _, _, s in results]
            print("| clients | aggregate tok/s | x one client | latency mean s | latency max s | same answers |")
            print("|---|---|---|---|---|---|")
            single = best[min(best)][0]
            for clients, (rate, latencies) in sorted(best.items()):
                print(f"| {clients} | {rate:.1f} | {rate / single:.2f} | {sum(latencies) / len(latencies):.2f} | "
                      f"{max(latencies):.2f} | {same[clients]}/{len(prompts) * args.rounds} |")
            print(f"\nload average (1 minute) before {load:.2f}, after {os.getloadavg()[0]:.2f}")
            failed = any(n < len(prompts) * args.rounds for n in same.values())
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
