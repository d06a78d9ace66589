"""Soak test of `mlx-diffusiongemma serve` on loopback: does it stay healthy, fast and flat in memory?

    python benchmarks/soak.py                       # the toy soak, then 1 vs 4 clients on random medium
    python benchmarks/soak.py --skip-medium         # the toy soak only (about a minute)

Toy soak: the real `serve` command (a subprocess on 127.0.0.1, a free port) gets one steady load from
`--clients` concurrent clients (4), each keeping one HTTP client as an app would: `--warm-up` requests (8, not
counted), then `--requests` chat requests (default 200), then `--clients` more not counted, so that the first
counted requests do not arrive together and the last ones do not run in a draining batch. Held-out toy
prompts of the three tasks in turn, every other one streamed, and one client in ten hangs up after the first
chunk of a streamed reply; the last 55 requests repeat the first 55 exactly (prompt, seed, streaming,
hang-ups), so the first and the last 50 completed ones ask the same work. It reports unintended errors
(anything but those hang-ups: a non-200 status, an error event, a broken stream), the median latency of the
first and the last 50 completed requests, what the server did in each window (from `/health`: the mean cost
of a decoder pass, commit, prefill and hand-over, its busy share and CPU seconds; a decoder pass is the same
work in both, so its change is the machine's speed, not the server's state), the latency change net of that
(a derived figure), and the server's resident memory after the first 50 requests and at the end. Targets: no
unintended error, last-50 median within 10% of first-50, RSS growth under 5%. The server's prompt cache is
bounded at `--prompt-cache-mb` (4): each toy request stores about 80 KB of prefixes, so it is full by about
the 50th request and then evicts (the repeated requests find their first run's prefixes gone); at the default
bound (1 GB) it would still be filling, legitimately, at the end, and RSS growth would measure the fill rather
than a leak.

Medium throughput: the server's app and engine in this process (uvicorn in a thread, still loopback HTTP) over
the random "medium" geometry (fp32; hidden 512, 6 layers, 16 experts, vocab 32000, canvas 256) with a fixed
8-step drafter and no end-of-sequence id, so every request does the same work: aggregate generated tokens/s
at 1 client and at 4 concurrent clients, each sending `--medium-requests` completions of 2 canvases after a
100-token prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from openblas import reexec_with_openblas  # noqa: E402

import httpx  # noqa: E402

HOST = "127.0.0.1"  # loopback only, by design


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MB (`ps` works on Linux and macOS)."""
    return int(subprocess.check_output(["ps", "-o", "rss=", "-p", str(pid)]).strip()) / 1024


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"serve exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit("the server did not come up")


_clients = threading.local()


def client() -> httpx.Client:
    """This thread's HTTP client, kept across its requests as an app's would be: `httpx.post` builds a client
    (and an SSL context) per call, CPU that competed with the server on a 2-core machine."""
    if not hasattr(_clients, "http"):
        _clients.http = httpx.Client(timeout=120)
    return _clients.http


def one_request(url: str, i: int, prompt: str, stream: bool, hang_up: bool) -> tuple[str, float]:
    """('ok' | 'hung up' | an error description, seconds)."""
    body = {"model": "toy", "messages": [{"role": "user", "content": prompt}], "seed": i, "stream": stream}
    tic = time.perf_counter()
    try:
        if not stream:
            r = client().post(url + "/v1/chat/completions", json=body)
            ok = r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
            return ("ok" if ok else f"status {r.status_code}: {r.text[:200]}"), time.perf_counter() - tic
        with client().stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return f"status {r.status_code}", time.perf_counter() - tic
            lines = [line for line in r.iter_lines() if line]
            if hang_up:
                return "hung up", time.perf_counter() - tic
        if lines[-1] != "data: [DONE]" or any('"error"' in line for line in lines):
            return f"bad stream: {lines[-2:]}", time.perf_counter() - tic
        return "ok", time.perf_counter() - tic
    except httpx.HTTPError as e:
        return f"{type(e).__name__}: {e}", time.perf_counter() - tic


def hang_up_early(url: str, i: int, prompt: str) -> tuple[str, float]:
    """A client that closes the connection after the first chunk of a streamed reply."""
    body = {"model": "toy", "messages": [{"role": "user", "content": prompt}], "seed": i, "stream": True}
    tic = time.perf_counter()
    with client().stream("POST", url + "/v1/chat/completions", json=body) as r:
        next(line for line in r.iter_lines() if line.startswith("data: {"))
    return "hung up", time.perf_counter() - tic


def hangs_up(j: int) -> bool:
    """Whether request j is one of the one-in-ten clients that hang up mid-stream."""
    return j % 10 == 5


def toy_soak(args) -> dict:
    from mlx_diffusiongemma.toy import held_out

    # Tasks in turn (add, sort, sudoku, add, ...), and the last requests repeat the first ones exactly (prompt,
    # seed, streaming, hang-up): the first and the last 50 completed requests are then the same work (one
    # sudoku costs more than another, one sort more canvases), so their latencies compare the server's state.
    prompts = [p for trio in zip(*(held_out(task, 100) for task in ("add", "sort", "sudoku"))) for p, _ in trio]
    window = next(n for n in range(1, 10**4) if sum(not hangs_up(j) for j in range(n)) == 50)
    repeat_from = max(args.requests - window, window)
    port = free_port()
    url = f"http://{HOST}:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "mlx_diffusiongemma", "serve", "--model", "toy", "--host", HOST,
                             "--port", str(port), "--decode-concurrency", str(args.clients), "--log-level",
                             "warning", "--prompt-cache-bytes", str(args.prompt_cache_mb << 20)])
    try:
        wait_healthy(url, proc)
        results: list[tuple[int, str, float]] = []
        rss: dict[str, float] = {}
        spans: list[float] = []  # when the first counted request started, when the last one ended
        timeline: list[tuple] = []  # every request: (kind, index, which prompt it asked, start, seconds, outcome)

        def extra(i: int) -> None:  # not counted: a prompt from the end of the list, never one counted
            what, t = one_request(url, 10**6 + i, prompts[-1 - i], stream=i % 2 == 1, hang_up=False)
            if what != "ok":  # they keep the load steady around the windows: one that fails does not
                raise SystemExit(f"uncounted request {i} failed: {what}")
            timeline.append(("uncounted", i, -1 - i, time.perf_counter() - t, t, what))

        passes: dict[str, dict] = {}  # the server's decoder pass counts around the two windows

        def snap(name: str) -> None:
            passes[name] = {**client().get(url + "/health").json(), "wall": time.perf_counter(),
                            "clients' cpu": sum(os.times()[:2])}

        def run(i: int) -> None:
            if i == 0:
                rss["start"] = rss_mb(proc.pid)
                spans.append(time.perf_counter())
                snap("first from")
            if i == repeat_from:
                snap("last from")
            j = i - repeat_from if i >= repeat_from else i  # which request this one asks
            prompt = prompts[j % len(prompts)]
            if hangs_up(j):
                outcome = hang_up_early(url, j, prompt)
            else:
                outcome = one_request(url, j, prompt, stream=j % 2 == 1, hang_up=False)
            results.append((i, *outcome))
            timeline.append(("counted", i, j, time.perf_counter() - outcome[1], outcome[1], outcome[0]))
            if len(results) == 50:
                rss["after 50"] = rss_mb(proc.pid)
            if len(results) == window:
                snap("first to")
            if len(results) == args.requests:
                spans.append(time.perf_counter())
                snap("last to")

        # One steady load from `clients` clients: the warm-up (its first requests build the compiled kernels and
        # buffers every later one reuses) leads straight into the counted requests, and as many uncounted ones
        # follow them, so the first counted requests do not arrive together and the last ones do not run in
        # a draining batch: both windows are measured at the same concurrency.
        after = args.warm_up + args.clients
        tasks = [(extra, i) for i in range(args.warm_up)] + [(run, i) for i in range(args.requests)]
        tasks += [(extra, i) for i in range(args.warm_up, after)]
        cpu = sum(os.times()[:2])
        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(lambda task: task[0](task[1]), tasks))
        wall, cpu = spans[-1] - spans[0], sum(os.times()[:2]) - cpu
        time.sleep(1.0)
        rss["end"] = rss_mb(proc.pid)
        health = httpx.get(url + "/health").json()
    finally:
        proc.terminate()
        code = proc.wait(60)
    results.sort()
    if args.dump:
        t0 = min(start for _, _, _, start, _, _ in timeline)
        args.dump.write_text(json.dumps([
            {"kind": kind, "i": i, "asks": j, "start s": round(start - t0, 4), "seconds": round(t, 4), "outcome": what}
            for kind, i, j, start, t, what in sorted(timeline, key=lambda r: r[3])], indent=0))
    errors = [(i, what) for i, what, _ in results if what not in ("ok", "hung up")]
    done = [t for _, what, t in results if what == "ok"]
    first, last = statistics.median(done[:50]), statistics.median(done[-50:])
    return {"requests": len(results), "hung up": sum(w == "hung up" for _, w, _ in results),
            "unintended errors": errors, "wall s": round(wall, 1), "clients' CPU s": round(cpu, 1),
            "p50 first 50 s": round(first, 3),
            "p50 last 50 s": round(last, 3), "p50 change": f"{(last / first - 1) * 100:+.1f}%",
            **(costs := pass_times(passes)),
            # The latency ratio over the pass ratio: what is left when the machine's own speed, measured on the
            # same work in both windows, is taken out (a derived figure; the target is on the raw change).
            "p50 change net of the decoder pass change": f"{(last / first / costs['pass ratio'] - 1) * 100:+.1f}%",
            "rss MB": {k: round(v, 1) for k, v in rss.items()},
            "rss growth after warm-up": f"{(rss['end'] / rss['after 50'] - 1) * 100:+.1f}%",
            "health at end": health, "exit code after SIGTERM": code}


def pass_times(passes: dict[str, dict]) -> dict:
    """What the server did while each window ran, from `/health`: its mean decoder pass (batch and sampler),
    commit, prefill and hand-over, how much of the window's wall time those filled, and the CPU seconds of the
    server and of the clients. Both windows ask the same work (a pass has about `clients` rows), so a change in
    a unit cost is the machine's speed, and a change in the busy share or the count the server's state."""
    out: dict[str, dict] = {}
    for window in ("first", "last"):
        a, b = passes[f"{window} from"], passes[f"{window} to"]
        d = {k: b[k] - a[k] for k in b if isinstance(b[k], (int, float))}
        wall = b["wall"] - a["wall"]
        out[window] = {"wall s": round(wall, 2), "decoder passes": d["decoder_passes"],
                       **{f"{what} ms": round(1000 * d[f"{what}_seconds"] / max(d[count], 1), 2)
                          for what, count in (("decoder", "decoder_passes"), ("commit", "commits"),
                                              ("prefill", "prefills"), ("handover", "handovers"))},
                       "busy share": round(sum(d[f"{w}_seconds"] for w in ("decoder", "commit", "prefill", "handover"))
                                           / wall, 3),
                       "server CPU s": round(d["cpu_seconds"], 2), "clients' CPU s": round(d["clients' cpu"], 2)}
    first, last = out["first"]["decoder ms"], out["last"]["decoder ms"]
    return {"windows": out, "decoder pass change": f"{(last / first - 1) * 100:+.1f}%",
            "pass ratio": round(last / first, 4)}


def medium_throughput(args) -> dict:
    import uvicorn

    from mlx_diffusiongemma.bench import random_model
    from mlx_diffusiongemma.engine import Engine
    from mlx_diffusiongemma.loader import load
    from mlx_diffusiongemma.server import ServeOptions, State, create_app

    drafter = Path(tempfile.mkdtemp()) / "fixed8.json"
    drafter.write_text(json.dumps({"name": "fixed8", "max_denoising_steps": 8, "adaptive_stop": False}))

    def loader():
        _, tokenizer = load("toy")  # ids past its 128 decode to nothing: the text is empty, the counts are not
        tokenizer.eos_token_ids = []  # no end-of-sequence: every request does the same work
        return random_model("medium", "float32"), tokenizer

    engine = Engine(loader, max_batch=4, max_queue=8, prefix_cache_bytes=0)
    model, tokenizer = engine.start()
    state = State(model, tokenizer, engine, ServeOptions(model_id="medium", drafter=str(drafter)))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(state), host=HOST, port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://{HOST}:{port}"
    wait_healthy(url)
    canvas = model.args.canvas_length
    rng = random.Random(0)

    def ask(i: int) -> int:
        ids = [rng.randrange(10, 32000) for _ in range(100)]
        body = {"model": "medium", "prompt": ids, "max_tokens": 2 * canvas, "seed": i}
        tic = time.perf_counter()
        r = httpx.post(url + "/v1/completions", json=body, timeout=1800)
        r.raise_for_status()
        tokens = r.json()["usage"]["completion_tokens"]
        print(f"  medium request {i}: {tokens} tokens in {time.perf_counter() - tic:.1f} s", file=sys.stderr,
              flush=True)
        return tokens

    ask(10**6)  # warm-up
    out = {}
    for clients in (1, 4):
        tic = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            tokens = sum(pool.map(ask, range(clients * args.medium_requests)))
        wall = time.perf_counter() - tic
        out[f"{clients} client(s)"] = {"requests": clients * args.medium_requests, "tokens": tokens,
                                       "wall s": round(wall, 1), "aggregate tok/s": round(tokens / wall, 1)}
    server.should_exit = True
    engine.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--medium-requests", type=int, default=2, help="completions per client on medium")
    parser.add_argument("--prompt-cache-mb", type=int, default=4,
                        help="the toy server's prompt cache bound (its default, 1 GB, would fill for ~13,000 requests)")
    parser.add_argument("--warm-up", type=int, default=8, help="toy requests sent first and not counted")
    parser.add_argument("--dump", type=Path,
                        help="write every toy request's start and latency (warm-up included) to this JSON file")
    parser.add_argument("--skip-medium", action="store_true")
    parser.add_argument("--skip-toy", action="store_true")
    parser.add_argument("--no-openblas", action="store_true")
    args = parser.parse_args()
    blas = reexec_with_openblas(not args.no_openblas)
    print(f"BLAS: {blas}", flush=True)
    if not args.skip_toy:
        print(json.dumps({"toy soak": toy_soak(args)}, indent=2), flush=True)
    if not args.skip_medium:
        print(json.dumps({"random medium, fp32, 8 fixed steps": medium_throughput(args)}, indent=2), flush=True)


if __name__ == "__main__":
    main()
