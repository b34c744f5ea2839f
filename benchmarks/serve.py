"""`minillm serve` under load: throughput with 1 to 16 concurrent clients, and a soak run.

Throughput (the default): for each number of clients, that many clients at once each send a
256-token prompt to /v1/completions and stream 128 greedy tokens (ignore_eos, so every answer
is 128 tokens long). Every prompt is new text, so every client's prompt is read in full.
Reported per round (the median over --repeats):

    aggregate_tps   all clients' tokens / the round's wall time (prompts included)
    decode_tps      tokens per second while every client is decoding: from the last client's
                    first token to the first client's last (the prompts, read one after
                    another, are all in by then), so every step is a decode step of all
    ttft_p50/p95    seconds from sending the request to the first token
    token_p50/p95   seconds between consecutive streamed chunks (one token each, nearly always)
    peak_rss_mb     the server's peak resident memory (VmHWM)

Each round has a server of its own with as many slots as clients (--parallel N), so that its
peak memory is what serving N clients takes; the rounds of one run share the machine's state.

Soak (--soak SECONDS): clients loop until the time is up, each request one of: a greedy answer
(streamed or not) checked against the answer computed alone at the start; a conversation's
next turn, checked against the first answer seen for it; a stream dropped after a few chunks;
a bad request (malformed JSON, a wrong type, a body over the limit) that must get a 4xx error
object. Reports what was sent, what came back wrong or not at all, and the server's RSS over
time (it must stay flat).

Steps (--steps): the library alone, no HTTP: one decode step of minillm.batch over 1 to 16
sessions (each 300 tokens in) against one session's own step, interleaved, the fastest of
--repeats rounds of 5 steps each; with BLAS on all cores and on one.

Run (OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE slow a current OpenBLAS: unset them here alone):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/serve.py \\
        --out benchmarks/results/issue13/throughput.json
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/serve.py \\
        --soak 600 --out benchmarks/results/issue13/soak.json
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/serve.py \\
        --steps --repeats 6 --out benchmarks/results/issue13/steps.json
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from texts import add_text_option, read_chars, text_files

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "weights" / "smollm2-135m-instruct.safetensors"
PROMPT_TOKENS, NEW_TOKENS = 256, 128
CLIENTS = (1, 2, 4, 8, 16)
TIMEOUT = 600


# -- the server ------------------------------------------------------------------------------

class Server:
    def __init__(self, model: Path, *args):
        command = [str(ROOT / ".venv" / "bin" / "minillm"), "serve", str(model), "--port", "0",
                   *map(str, args)]
        self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.log: list[str] = []
        ready = threading.Event()
        self.url = None

        def read():
            for raw in self.proc.stderr:
                line = raw.decode("utf-8", "replace")
                self.log.append(line)
                found = re.search(r"(http://[\d.]+:\d+)/v1", line)
                if found and self.url is None:
                    self.url = found.group(1)
                    ready.set()
            ready.set()
        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(120) or self.url is None:
            self.proc.kill()
            sys.exit("the server did not start:\n" + "".join(self.log))

    def memory_mb(self) -> dict:
        """The server's resident memory now and at its peak (MB = 10^6 bytes)."""
        fields = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024 / 1e6
        return {"rss_mb": fields["VmRSS"], "peak_rss_mb": fields["VmHWM"]}

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(60)


def machine() -> dict:
    from threadpoolctl import threadpool_info
    blas = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    kernel = ", ".join(f"{i['internal_api']} {i['version']} {i.get('architecture')} "
                       f"threads={i['num_threads']}" for i in blas)
    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines()
        if line.startswith("Model name")), "unknown")
    return {"blas": kernel, "cpu": cpu}


# -- throughput --------------------------------------------------------------------------------

class Prompts:
    """Prompts of exactly PROMPT_TOKENS tokens (as the server counts them), each new text."""

    def __init__(self, model: Path, text_paths):
        import minillm
        self.tok = minillm.load(model).tokenizer
        self.ids = self.tok.encode(read_chars(text_paths, 3_000_000))
        self.at = 0

    def next(self) -> str:
        while True:
            ids = self.ids[self.at:self.at + PROMPT_TOKENS]
            self.at += PROMPT_TOKENS + 7
            text = self.tok.decode(ids)
            if len(self.tok.encode(text, special=True)) == PROMPT_TOKENS:
                return text


def stream_completion(url: str, prompt: str, max_tokens: int) -> dict:
    """One streamed greedy completion: chunk times and usage."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    times, usage = [], None
    start = time.perf_counter()
    with httpx.Client(timeout=TIMEOUT) as client, \
            client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            if event["choices"] and event["choices"][0]["text"]:
                times.append(time.perf_counter())
    return {"start": start, "times": times, "usage": usage}


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def measure_round(server: Server, prompts: Prompts, n_clients: int) -> dict:
    texts = [prompts.next() for _ in range(n_clients)]
    start = time.perf_counter()
    with ThreadPoolExecutor(n_clients) as pool:
        results = list(pool.map(lambda t: stream_completion(server.url, t, NEW_TOKENS), texts))
    wall = time.perf_counter() - start
    for r in results:
        assert r["usage"] == {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": NEW_TOKENS,
                              "total_tokens": PROMPT_TOKENS + NEW_TOKENS}, r["usage"]
    ttft = [r["times"][0] - r["start"] for r in results]
    gaps = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    lo = max(r["times"][0] for r in results)   # every client decoding from here ...
    hi = min(r["times"][-1] for r in results)  # ... to here
    in_window = sum(lo < t <= hi for r in results for t in r["times"])
    decode = in_window / (hi - lo) if hi > lo else float("nan")
    return dict(clients=n_clients, aggregate_tps=n_clients * NEW_TOKENS / wall, decode_tps=decode,
                ttft_p50=percentile(ttft, 0.5), ttft_p95=percentile(ttft, 0.95),
                token_p50=percentile(gaps, 0.5), token_p95=percentile(gaps, 0.95),
                chunks_per_token=sum(len(r["times"]) for r in results) / (n_clients * NEW_TOKENS),
                wall_s=wall, **server.memory_mb())


def throughput(args) -> dict:
    prompts = Prompts(args.model, text_files(args.text))
    rounds = []
    for repeat in range(args.repeats):
        for n in args.clients:
            server = Server(args.model, "--parallel", n, "--queue", 0, *args.server_args)
            try:
                stream_completion(server.url, prompts.next(), 8)  # warm-up
                rounds.append(dict(measure_round(server, prompts, n), repeat=repeat))
            finally:
                server.stop()
            print(json.dumps(rounds[-1]), flush=True)
    summary = {}
    for n in args.clients:
        mine = [r for r in rounds if r["clients"] == n]
        summary[n] = {k: statistics.median(r[k] for r in mine) for k in mine[0]
                      if k not in ("clients", "repeat")}
    one, eight = summary.get(1), summary.get(8)
    ratio = eight["decode_tps"] / one["decode_tps"] if one and eight else None
    return dict(machine(), rounds=rounds, median=summary, decode_8_over_1=ratio)


def print_throughput(result: dict) -> None:
    print(f"\nCPU: {result['cpu']}; BLAS: {result['blas']}")
    print("| clients | aggregate tok/s | decode tok/s | TTFT p50 / p95 s | per-token p50 / p95 ms"
          " | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for n, r in result["median"].items():
        print(f"| {n} | {r['aggregate_tps']:.1f} | {r['decode_tps']:.1f} | "
              f"{r['ttft_p50']:.2f} / {r['ttft_p95']:.2f} | "
              f"{1e3 * r['token_p50']:.0f} / {1e3 * r['token_p95']:.0f} | "
              f"{r['peak_rss_mb']:,.0f} |")
    if result["decode_8_over_1"] is not None:
        print(f"\ndecode tok/s, 8 clients / 1 client: {result['decode_8_over_1']:.2f}x")


# -- decode steps of the library ---------------------------------------------------------------

def steps(args) -> dict:
    import numpy as np
    from threadpoolctl import threadpool_info, threadpool_limits

    import minillm
    from minillm import parallel
    from minillm.batch import Batch

    model = minillm.load(args.model)
    batch = Batch(model)
    sessions = [model.session() for _ in range(max(args.clients))]
    for i, s in enumerate(sessions):
        s.feed(np.random.default_rng(i).integers(0, 40000, 300), logits="none")
    cases = {"alone": lambda: sessions[0].feed([5], logits="last")}
    for n in args.clients:
        cases[n] = lambda n=n: batch.feed(sessions[:n], [[5]] * n)
    result = {}
    all_cores = max(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")
    for threads in sorted({all_cores, 1}, reverse=True):
        parallel.set_workers(min(threads, parallel.SPLIT_MAX_THREADS))
        best = {k: float("inf") for k in cases}
        with threadpool_limits(threads):
            for _ in range(args.repeats):
                for key, step in cases.items():
                    start = time.perf_counter()
                    for _ in range(5):
                        step()
                    best[key] = min(best[key], (time.perf_counter() - start) / 5)
        result[f"threads={threads}"] = {
            str(k): dict(ms=1e3 * v, tps=(1 if k == "alone" else k) / v,
                         over_alone=(1 if k == "alone" else k) * best["alone"] / v)
            for k, v in best.items()}
        for k, r in result[f"threads={threads}"].items():
            print(f"threads {threads}  {k:>5}: {r['ms']:6.1f} ms/step  {r['tps']:6.1f} tok/s  "
                  f"{r['over_alone']:.2f}x one session", flush=True)
    return dict(machine(), steps=result)


# -- soak ----------------------------------------------------------------------------------------

QUESTIONS = ["What is the capital of France?", "Name three colours.", "What is 7 times 6?",
             "Write a haiku about rain.", "What is Python?", "Say hello in Spanish.",
             "Why is the sky blue?", "List two planets.", "What is a prime number?",
             "Who wrote Hamlet?", "What do bees make?", "How many legs has a spider?"]
SOAK_TOKENS = 24


def chat(client: httpx.Client, url: str, messages, stream=False, **extra) -> httpx.Response:
    body = {"model": "soak", "messages": messages, "temperature": 0, "max_tokens": SOAK_TOKENS,
            "stream": stream, **extra}
    return client.post(url + "/v1/chat/completions", json=body)


def streamed_text(client: httpx.Client, url: str, messages, stop_after: int | None = None):
    """The streamed answer's text, or None when dropped after stop_after chunks."""
    body = {"model": "soak", "messages": messages, "temperature": 0, "max_tokens": SOAK_TOKENS,
            "stream": True}
    pieces, n = [], 0
    with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line == "data: [DONE]":
                return "".join(pieces)
            if line.startswith("data: "):
                event = json.loads(line[6:])
                if "error" in event:
                    raise RuntimeError(event["error"]["message"])
                pieces.append(event["choices"][0]["delta"].get("content") or "")
                n += 1
                if stop_after is not None and n >= stop_after:
                    return None  # leaving the with block closes the connection
    raise RuntimeError("the stream ended without [DONE]")


BAD = [b"{", b'{"messages": 1}', b'{"messages": [{"role": "user", "content": "x"}], "n": 3}',
       b"{" + b" " * (2 << 20) + b"}"]


class Soak:
    def __init__(self, url: str, references: dict[str, str]):
        self.url, self.references = url, references
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.wrong: list[str] = []
        self.follow_ups: dict[str, str] = {}

    def count(self, key: str) -> None:
        with self.lock:
            self.counts[key] = self.counts.get(key, 0) + 1

    def check(self, what: str, got, expected) -> None:
        if got != expected:
            with self.lock:
                self.wrong.append(f"{what}: {got!r} != {expected!r}")

    def one(self, client: httpx.Client, rng: random.Random) -> None:
        q = rng.choice(QUESTIONS)
        messages = [{"role": "user", "content": q}]
        kind = rng.choices(["answer", "stream", "turn", "drop", "bad"], [3, 3, 2, 1, 1])[0]
        self.count(f"sent:{kind}")
        if kind == "answer":
            r = chat(client, self.url, messages)
            self.check(q, r.status_code, 200)
            self.check(q, r.json()["choices"][0]["message"]["content"], self.references[q])
        elif kind == "stream":
            self.check(q, streamed_text(client, self.url, messages), self.references[q])
        elif kind == "turn":  # the conversation's next turn: the same answer every time
            messages += [{"role": "assistant", "content": self.references[q]},
                         {"role": "user", "content": "Tell me more."}]
            r = chat(client, self.url, messages)
            self.check(q, r.status_code, 200)
            answer = r.json()["choices"][0]["message"]["content"]
            with self.lock:
                first = self.follow_ups.setdefault(q, answer)
            self.check(q + " (next turn)", answer, first)
        elif kind == "drop":
            streamed_text(client, self.url, messages, stop_after=rng.randint(1, 4))
        else:
            r = client.post(self.url + "/v1/chat/completions", content=rng.choice(BAD),
                            headers={"Content-Type": "application/json"})
            self.check("bad request", r.status_code in (400, 413), True)
            self.check("bad request", set(r.json()["error"]), {"message", "type", "param",
                                                              "code"})
        self.count(f"ok:{kind}")

    def client_loop(self, seed: int, deadline: float) -> None:
        rng = random.Random(seed)
        with httpx.Client(timeout=TIMEOUT) as client:
            while time.monotonic() < deadline:
                try:
                    self.one(client, rng)
                except Exception as err:  # lost: no proper answer came back
                    self.count("lost")
                    with self.lock:
                        self.wrong.append(f"lost: {type(err).__name__}: {err}")


def soak(args) -> dict:
    server = Server(args.model, "--parallel", 4, "--queue", 16, "--max-body-mb", 1)
    try:
        with httpx.Client(timeout=TIMEOUT) as client:  # each answer alone, before the load
            references = {q: chat(client, server.url, [{"role": "user", "content": q}]).json()[
                "choices"][0]["message"]["content"] for q in QUESTIONS}
        test = Soak(server.url, references)
        memory = [dict(t=0.0, **server.memory_mb())]
        start = time.monotonic()
        deadline = start + args.soak
        with ThreadPoolExecutor(args.soak_clients) as pool:
            futures = [pool.submit(test.client_loop, i, deadline)
                       for i in range(args.soak_clients)]
            while not all(f.done() for f in futures):
                time.sleep(15)  # a sampling period, not synchronisation
                memory.append(dict(t=time.monotonic() - start, **server.memory_mb()))
                print(json.dumps(memory[-1]), flush=True)
        with httpx.Client(timeout=TIMEOUT) as client:
            slots = client.get(server.url + "/slots").json()
    finally:
        status = server.stop()
    sent = sum(v for k, v in test.counts.items() if k.startswith("sent:"))
    answered = sum(v for k, v in test.counts.items() if k.startswith("ok:"))
    return dict(machine(), seconds=args.soak, clients=args.soak_clients, counts=test.counts,
                sent=sent, answered=answered, lost=test.counts.get("lost", 0),
                wrong=test.wrong, memory=memory, exit_status=status,
                slots_after=[s["state"] for s in slots["slots"]], queued_after=slots["queued"])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--clients", type=int, nargs="+", default=list(CLIENTS))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--soak", type=float, default=None, metavar="SECONDS")
    p.add_argument("--soak-clients", type=int, default=6)
    p.add_argument("--steps", action="store_true", help="time the library's decode steps")
    p.add_argument("--server-args", type=shlex.split, default=[], metavar="'ARGS'",
                   help="more options for minillm serve, quoted (e.g. '--threads 1')")
    p.add_argument("--out", type=Path, default=None)
    add_text_option(p)
    args = p.parse_args()
    if args.steps:
        result = steps(args)
    elif args.soak:
        result = soak(args)
        m = result["memory"]
        print(f"\nsent {result['sent']}, answered {result['answered']}, lost {result['lost']}, "
              f"wrong {len(result['wrong'])}; RSS start {m[0]['rss_mb']:.0f} MB, end "
              f"{m[-1]['rss_mb']:.0f} MB, peak {m[-1]['peak_rss_mb']:.0f} MB; "
              f"counts {result['counts']}")
    else:
        result = throughput(args)
        print_throughput(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
