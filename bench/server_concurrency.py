"""Server against server over HTTP: aggregate decode tokens/s, inter-token latency and time to first token of
`famserve serve` and llama.cpp's `llama-server` for 1-32 concurrent streaming requests, as a user sees them.

    python bench/server_concurrency.py --streams 1,2,4,8,16,32 --repeats 3 \\
        --llama-server /path/to/llama.cpp/build/bin/llama-server

For each stream count N both servers are started with room for exactly N streams (famserve: --max-running N and a
state budget of N states; llama-server: -np N slots of --ctx-per-slot tokens each), one thread each, and warmed up
with N short untimed requests. Then, in --repeats rounds (the systems' order alternates between rounds), N streaming
/v1/completions requests are sent at once to one server, then the other: the same N prompts of --prompt-tokens
token ids to both (windows of a text, distinct per stream and round; llama.cpp's prompt cache is off per request),
--max-tokens tokens each, greedy, EOS ignored. The client stamps the arrival of every SSE event.

- decode tok/s: the tokens after each stream's first, over the time from the first stream's first token to the last
  token of any stream (prefill of later streams, where it overlaps, is inside that window);
- steady tok/s: the token events that arrive after every stream has its first token, over that stretch (decode only);
- ITL: the time between two token events of one stream, pooled over streams and rounds (p50, p99);
- TTFT: from sending the N requests to a stream's first token (p50 over streams, median over rounds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from common import print_table, spread, start, stream_counts, write_json

ROOT = Path(__file__).resolve().parent.parent
SYSTEMS = ("famserve", "llamacpp")
LABELS = {"famserve": "famserve (bswa)", "llamacpp": "llama.cpp server"}
STATE_BUDGET_PER_STREAM = 256 * 2**20  # famserve's state budget per stream (a bswa state of SmolLM2-135M is 180 MiB)
WARMUP_PROMPT_TOKENS = 16
WARMUP_MAX_TOKENS = 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="famserve's --model; llama.cpp gets the file it resolves "
                                                           "to (so it must be a GGUF file or the alias)")
    p.add_argument("--mode", default="bswa", choices=["bswa", "fam", "full"], help="famserve's attention mode")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated: famserve, llamacpp")
    p.add_argument("--streams", default="1,2,4,8,16,32", help="comma-separated numbers of concurrent streams")
    p.add_argument("--prompt-tokens", type=int, default=256, help="prompt length of every stream, in tokens")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per stream (EOS ignored)")
    p.add_argument("--repeats", type=int, default=3, help="rounds per stream count (every system once per round)")
    p.add_argument("--threads", type=int, default=1, help="threads of each server (famserve --threads, llama.cpp "
                                                          "-t/-tb)")
    p.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER") or shutil.which("llama-server"),
                   help="llama.cpp's llama-server binary (default: $LLAMA_SERVER, else on PATH)")
    p.add_argument("--ctx-per-slot", type=int, default=512, help="llama.cpp: context per slot (-c N * this)")
    p.add_argument("--text", default=str(ROOT / "data/texts/emma.txt"),
                   help="prompts are windows of this text (bench/texts.py); random token ids when it is missing")
    p.add_argument("--ready-timeout", type=float, default=600, help="seconds a server may take to become ready")
    p.add_argument("--request-timeout", type=float, default=1800, help="seconds one round may take")
    p.add_argument("--device", default="cpu", help="famserve --device (machine info)")
    p.add_argument("--dtype", default="float32", help="famserve --dtype")
    p.add_argument("--out", default="bench/results/server_concurrency.json")
    p.add_argument("--plot", default=str(ROOT / "docs/bench_concurrency.png"), help="PNG to write ('' for none)")
    p.add_argument("--keep-logs", action="store_true", help="keep the servers' logs (their folder is printed)")
    args = p.parse_args(argv)
    args.streams = stream_counts(p, args.streams)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if not args.systems or any(s not in SYSTEMS for s in args.systems):
        p.error(f"--systems: choose from {', '.join(SYSTEMS)}")
    if "llamacpp" in args.systems and not (args.llama_server and Path(args.llama_server).is_file()):
        p.error("--llama-server: llama.cpp's llama-server binary not found (see docs/benchmarks.md, section 3, for "
                "the build); or leave llamacpp out of --systems")
    if args.prompt_tokens + args.max_tokens > args.ctx_per_slot:
        p.error("--ctx-per-slot must hold --prompt-tokens + --max-tokens")
    if args.max_tokens < 2 or args.prompt_tokens < 1 or args.repeats < 1:
        p.error("--max-tokens must be >= 2, --prompt-tokens and --repeats >= 1")
    return args


# --- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    return env


@dataclass
class Server:
    system: str
    command: list[str]
    log_path: Path
    ready_path: str  # GET this until it answers 200
    threads: int
    port: int = 0
    proc: subprocess.Popen | None = None
    model_name: str | None = None
    load_s: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float) -> None:
        t0 = time.perf_counter()
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=server_env(self.threads), cwd=self.log_path.parent, start_new_session=True)
        log.close()
        RUNNING.append(self)
        with httpx.Client(timeout=5) as client:
            while True:  # poll readiness; a server that exits instead is reported with its log
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.system} exited with {self.proc.returncode} while starting; "
                                       f"its log ({self.log_path}) ends:\n{self.log_tail()}")
                if time.perf_counter() - t0 > timeout_s:
                    raise RuntimeError(f"{self.system} not ready after {timeout_s:.0f} s; log {self.log_path}:\n"
                                       f"{self.log_tail()}")
                try:
                    r = client.get(self.url + self.ready_path)
                    if r.status_code == 200:
                        if self.system == "famserve":
                            self.model_name = r.json().get("model")
                        break
                except httpx.TransportError:
                    pass
                try:
                    self.proc.wait(timeout=0.25)  # the poll interval; returns at once if the server dies
                except subprocess.TimeoutExpired:
                    pass
        self.load_s = time.perf_counter() - t0

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and anything it started
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        if self in RUNNING:
            RUNNING.remove(self)


RUNNING: list[Server] = []  # servers to stop on exit, whatever the exit


def stop_all() -> None:
    for server in list(RUNNING):
        server.stop()


def famserve_server(args: argparse.Namespace, n: int, log_dir: Path) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "famserve.server.cli", "serve", "--model", args.model, "--mode", args.mode,
           "--threads", str(args.threads), "--device", args.device, "--dtype", args.dtype,
           "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
           "--max-running", str(n), "--state-memory-bytes", str(n * STATE_BUDGET_PER_STREAM),
           "--shutdown-grace-s", "0", "--state-dir", str(log_dir / "famserve-state")]
    return Server("famserve", cmd, log_dir / f"famserve-n{n}.log", "/ready", args.threads, port)


def llamacpp_server(args: argparse.Namespace, n: int, log_dir: Path, gguf: Path) -> Server:
    port = free_port()
    cmd = [args.llama_server, "-m", str(gguf), "-np", str(n), "-c", str(n * args.ctx_per_slot),
           "-t", str(args.threads), "-tb", str(args.threads), "--host", "127.0.0.1", "--port", str(port)]
    return Server("llamacpp", cmd, log_dir / f"llamacpp-n{n}.log", "/health", args.threads, port)


def llamacpp_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return " ".join((out.stdout + out.stderr).split("\n")[-3:]).strip() or "unknown"


# --- prompts


def load_prompt_ids(args: argparse.Namespace, server: Server, needed: int) -> tuple[list[int], str]:
    """A token-id sequence to cut prompts from: the text tokenized by the first server's /tokenize (both read the
    tokenizer of the same GGUF file; both servers then get identical ids), else seeded random ids."""
    text_path = Path(args.text)
    if text_path.is_file():
        text = text_path.read_text(errors="replace")
        ids: list[int] = []
        with httpx.Client(timeout=120) as client:
            for start_char in range(0, len(text), 100_000):
                piece = text[start_char:start_char + 100_000]
                body = ({"prompt": piece, "add_special_tokens": False} if server.system == "famserve"
                        else {"content": piece, "add_special": False})
                r = client.post(server.url + "/tokenize", json=body)
                r.raise_for_status()
                ids += r.json()["tokens"]
                if len(ids) >= needed:
                    break
        if len(ids) >= needed:
            return ids, f"windows of {text_path.name} (tokenized by {server.system})"
    import random

    rng = random.Random(0)
    return [rng.randrange(1000, 40000) for _ in range(needed)], "random token ids (seed 0; no --text)"


def prompts_for(ids: list[int], round_index: int, n: int, max_n: int, length: int) -> list[list[int]]:
    """N distinct windows of `length` ids for this round (stream i of round r: window r * max_n + i + 1)."""
    return [ids[(round_index * max_n + i + 1) * length:(round_index * max_n + i + 2) * length] for i in range(n)]


# --- one round


@dataclass
class StreamTrace:
    sent_s: float
    events: list[tuple[float, str]] = field(default_factory=list)  # (arrival, raw JSON) of every data event
    status: int = 0
    error: str | None = None


def request_body(system: str, model_name: str | None, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                            "ignore_eos": True, "stream_options": {"include_usage": True}}
    if system == "famserve":
        body["model"] = model_name
    else:
        body["cache_prompt"] = False  # no prefix reuse between rounds (famserve has no prompt cache)
    return body


async def stream_one(client: httpx.AsyncClient, url: str, body: dict[str, Any], start_s: float) -> StreamTrace:
    trace = StreamTrace(sent_s=start_s)
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as response:
            trace.status = response.status_code
            if response.status_code != 200:
                trace.error = (await response.aread()).decode(errors="replace")[:500]
                return trace
            async for line in response.aiter_lines():  # stamp now, parse after the round (less client CPU)
                if line.startswith("data:"):
                    trace.events.append((time.perf_counter(), line[5:].strip()))
    except httpx.HTTPError as exc:
        trace.error = f"{type(exc).__name__}: {exc}"
    return trace


async def run_streams(server: Server, prompts: list[list[int]], max_tokens: int,
                      timeout_s: float) -> tuple[float, list[StreamTrace]]:
    limits = httpx.Limits(max_connections=len(prompts) + 4, max_keepalive_connections=len(prompts) + 4)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout_s, connect=30)) as client:
        bodies = [request_body(server.system, server.model_name, p, max_tokens) for p in prompts]
        start_s = time.perf_counter()
        traces = await asyncio.gather(*(stream_one(client, server.url, b, start_s) for b in bodies))
    return start_s, list(traces)


@dataclass
class StreamResult:
    ttft_s: float
    token_times: list[float]  # arrival of every event that carried text (or an unfinished choice)
    usage_tokens: int | None  # completion_tokens the server reported
    finish_reason: str | None


def parse_trace(trace: StreamTrace) -> StreamResult:
    if trace.error is not None:
        raise RuntimeError(f"HTTP {trace.status}: {trace.error}")
    times: list[float] = []
    usage_tokens = finish = None
    for t, raw in trace.events:
        if raw == "[DONE]":
            continue
        chunk = json.loads(raw)
        if "error" in chunk:
            raise RuntimeError(f"stream error: {chunk['error']}")
        if chunk.get("usage"):
            usage_tokens = chunk["usage"].get("completion_tokens")
        for choice in chunk.get("choices") or []:
            if choice.get("text") or choice.get("finish_reason") is None:
                times.append(t)
            finish = choice.get("finish_reason") or finish
    if not times:
        raise RuntimeError("a stream produced no tokens")
    return StreamResult(times[0] - trace.sent_s, times, usage_tokens, finish)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summarize_round(start_s: float, traces: list[StreamTrace], max_tokens: int) -> dict[str, Any]:
    streams = [parse_trace(t) for t in traces]
    tokens = [s.usage_tokens if s.usage_tokens is not None else len(s.token_times) for s in streams]
    first_first = min(s.token_times[0] for s in streams)
    last_first = max(s.token_times[0] for s in streams)
    last = max(s.token_times[-1] for s in streams)
    decode_tokens = sum(k - 1 for k in tokens)
    steady_events = sum(1 for s in streams for t in s.token_times if t > last_first)
    itl = [b - a for s in streams for a, b in zip(s.token_times, s.token_times[1:])]
    ttft = [s.ttft_s for s in streams]
    return {
        "decode_tok_s": decode_tokens / (last - first_first) if last > first_first else None,
        "steady_tok_s": steady_events / (last - last_first) if last > last_first else None,
        "itl_s": itl,
        "itl_p50_s": percentile(itl, 50) if itl else None,
        "itl_p99_s": percentile(itl, 99) if itl else None,
        "ttft_p50_s": statistics.median(ttft),
        "ttft_max_s": max(ttft),
        "wall_s": last - start_s,
        "tokens_per_stream": sorted(set(tokens)),
        "token_events_per_stream": sorted({len(s.token_times) for s in streams}),
        "finish_reasons": sorted({str(s.finish_reason) for s in streams}),
        "complete": all(k == max_tokens for k in tokens),
    }


def warm_up(server: Server, ids: list[int], n: int, args: argparse.Namespace) -> None:
    """N short streams, untimed: first-call costs and, for famserve, allocating the N states it then reuses."""
    base = (args.repeats * max(args.streams) + 1) * args.prompt_tokens  # after every timed prompt
    prompts = [ids[base + i * WARMUP_PROMPT_TOKENS:base + (i + 1) * WARMUP_PROMPT_TOKENS] for i in range(n)]
    _, traces = asyncio.run(run_streams(server, prompts, WARMUP_MAX_TOKENS, args.request_timeout))
    for trace in traces:
        parse_trace(trace)


# --- report


def aggregate(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    itl = [x for r in rounds for x in r["itl_s"]]
    rate = [r["decode_tok_s"] for r in rounds if r["decode_tok_s"] is not None]
    steady = [r["steady_tok_s"] for r in rounds if r["steady_tok_s"] is not None]
    return {
        "runs": len(rounds),
        "decode_tok_s": spread(rate) if rate else None,
        "steady_tok_s": spread(steady) if steady else None,
        "itl_p50_s": percentile(itl, 50) if itl else None,
        "itl_p99_s": percentile(itl, 99) if itl else None,
        "ttft_p50_s": spread([r["ttft_p50_s"] for r in rounds]),
        "wall_s": spread([r["wall_s"] for r in rounds]),
        "complete": all(r["complete"] for r in rounds),
        "rounds": [{k: v for k, v in r.items() if k != "itl_s"} for r in rounds],
    }


def ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per N: famserve over llama.cpp (decode tok/s, ITL, TTFT; medians, and the median of per-round ratios)."""
    cell = {(r["system"], r["streams"]): r for r in results}
    out = []
    for n in sorted({r["streams"] for r in results}):
        f, l = cell.get(("famserve", n)), cell.get(("llamacpp", n))
        if not f or not l or not f["decode_tok_s"] or not l["decode_tok_s"]:
            continue
        paired = [a["decode_tok_s"] / b["decode_tok_s"] for a, b in zip(f["rounds"], l["rounds"])
                  if a["decode_tok_s"] and b["decode_tok_s"]]
        out.append({
            "streams": n,
            "decode_tok_s": f["decode_tok_s"]["median"] / l["decode_tok_s"]["median"],
            "decode_tok_s_paired": spread(paired) if paired else None,
            "steady_tok_s": (f["steady_tok_s"]["median"] / l["steady_tok_s"]["median"]
                             if f["steady_tok_s"] and l["steady_tok_s"] else None),
            "itl_p50": f["itl_p50_s"] / l["itl_p50_s"] if f["itl_p50_s"] and l["itl_p50_s"] else None,
            "itl_p99": f["itl_p99_s"] / l["itl_p99_s"] if f["itl_p99_s"] and l["itl_p99_s"] else None,
            "ttft_p50": f["ttft_p50_s"]["median"] / l["ttft_p50_s"]["median"],
        })
    return out


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.0f}"


def _rate(s: dict[str, float] | None, runs: int) -> str:
    if s is None:
        return "-"
    return f"{s['median']:.1f}" if runs == 1 else f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f})"


def report(results: list[dict[str, Any]], ratio_rows: list[dict[str, Any]]) -> None:
    base = {r["system"]: r["decode_tok_s"]["median"] for r in results if r["streams"] == 1 and r["decode_tok_s"]}
    rows = []
    for r in sorted(results, key=lambda r: (r["streams"], SYSTEMS.index(r["system"]))):
        d = r["decode_tok_s"]
        rows.append([str(r["streams"]), LABELS[r["system"]], _rate(d, r["runs"]),
                     f"{d['median'] / base[r['system']]:.2f}" if d and r["system"] in base else "-",
                     _rate(r["steady_tok_s"], r["runs"]), _ms(r["itl_p50_s"]), _ms(r["itl_p99_s"]),
                     f"{r['ttft_p50_s']['median']:.2f}", "" if r["complete"] else "short streams"])
    print_table("aggregate decode tok/s, inter-token latency and TTFT against concurrent streams (median "
                "(min-max) of the rounds; ITL pooled over streams and rounds)",
                ["streams", "system", "decode tok/s", "vs 1 stream", "steady tok/s", "ITL p50 ms", "ITL p99 ms",
                 "TTFT p50 s", "note"], rows)
    if ratio_rows:
        print_table("famserve / llama.cpp (ratios of medians; paired: median (min-max) of per-round ratios)",
                    ["streams", "decode tok/s", "paired", "steady tok/s", "ITL p50", "ITL p99", "TTFT p50"],
                    [[str(r["streams"]), f"{r['decode_tok_s']:.2f}",
                      "-" if r["decode_tok_s_paired"] is None else
                      "{median:.2f} ({min:.2f}-{max:.2f})".format(**r["decode_tok_s_paired"]),
                      "-" if r["steady_tok_s"] is None else f"{r['steady_tok_s']:.2f}",
                      "-" if r["itl_p50"] is None else f"{r['itl_p50']:.2f}",
                      "-" if r["itl_p99"] is None else f"{r['itl_p99']:.2f}", f"{r['ttft_p50']:.2f}"]
                     for r in ratio_rows])


def plot(payload: dict[str, Any], path: Path) -> Path | None:
    try:
        import plot as bench_plot
    except ImportError:  # matplotlib missing
        return None
    return bench_plot.server_concurrency(payload, path)


# --- main


@contextmanager
def servers_stopped_on_exit() -> Iterator[None]:
    """Stop every server this script started on any exit: normal, exception, Ctrl-C or SIGTERM."""
    def interrupted(*_: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        yield
    finally:
        stop_all()
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    machine = start(args)
    machine["torch_threads"] = args.threads  # the servers' threads (this client process computes nothing)
    from famserve.engine.loader import resolve_model_path

    gguf = resolve_model_path(args.model)
    if "llamacpp" in args.systems and gguf.suffix != ".gguf":
        raise SystemExit(f"llama.cpp needs a GGUF file; {args.model} resolves to {gguf}")
    log_dir = Path(tempfile.mkdtemp(prefix="server_concurrency-"))
    max_n = max(args.streams)
    windows = (args.repeats * max_n + 1) * args.prompt_tokens + max_n * WARMUP_PROMPT_TOKENS
    versions = {"llamacpp": llamacpp_version(args.llama_server)} if "llamacpp" in args.systems else {}
    print(f"model {gguf} ({args.mode} in famserve); streams {args.streams}; {args.prompt_tokens} prompt + "
          f"{args.max_tokens} generated tokens per stream; {args.repeats} rounds; {args.threads} thread(s) per "
          f"server; logs in {log_dir}", flush=True)
    t0 = time.perf_counter()
    results: list[dict[str, Any]] = []
    server_info: dict[str, Any] = {}
    ids: list[int] | None = None
    prompt_source = ""
    with servers_stopped_on_exit():
        for n in args.streams:
            servers: dict[str, Server] = {}
            for system in args.systems:  # one after the other: loading competes for the CPU otherwise
                server = (famserve_server(args, n, log_dir) if system == "famserve"
                          else llamacpp_server(args, n, log_dir, gguf))
                server.start(args.ready_timeout)
                servers[system] = server
                info = server_info.setdefault(system, {"load_s": {}})
                info["command_at_max_streams"] = shlex.join(server.command)
                info["load_s"][n] = round(server.load_s, 1)
                if ids is None:
                    ids, prompt_source = load_prompt_ids(args, server, windows)
                warm_up(server, ids, n, args)
            rounds: dict[str, list[dict[str, Any]]] = {s: [] for s in args.systems}
            for r in range(args.repeats):
                prompts = prompts_for(ids, r, n, max_n, args.prompt_tokens)
                order = args.systems if r % 2 == 0 else args.systems[::-1]
                for system in order:
                    start_s, traces = asyncio.run(run_streams(servers[system], prompts, args.max_tokens,
                                                              args.request_timeout))
                    one = summarize_round(start_s, traces, args.max_tokens)
                    rounds[system].append(one)
                    print(f"  {n:>3} streams, round {r + 1}/{args.repeats}, {system:>8}: "
                          f"{one['decode_tok_s'] or 0:7.1f} tok/s, ITL p50 {_ms(one['itl_p50_s'])} ms "
                          f"p99 {_ms(one['itl_p99_s'])} ms, TTFT p50 {one['ttft_p50_s']:.2f} s, "
                          f"{one['wall_s']:.1f} s", flush=True)
            for system in args.systems:
                servers[system].stop()
                results.append({"system": system, "streams": n, **aggregate(rounds[system])})
    machine["wall_s"] = time.perf_counter() - t0
    machine["load_average_end_1_5_15m"] = list(os.getloadavg())
    ratio_rows = ratios(results)
    report(results, ratio_rows)
    payload = {
        "benchmark": "server_concurrency",
        "model": str(gguf.name),
        "machine": machine,
        "args": {k: v for k, v in vars(args).items()},
        "versions": {"llamacpp": versions.get("llamacpp"), "famserve_mode": args.mode},
        "servers": server_info,
        "prompt_source": prompt_source,
        "notes": [
            "one server process per system and stream count, with room for exactly N streams; both up during a "
            "stream count, the systems alternate within each round (order reversed every other round)",
            "N streaming /v1/completions requests sent at once; the same N prompts (token ids) to both systems",
            "decode_tok_s: sum over streams of (tokens - 1) / (last token of any stream - first token of any)",
            "steady_tok_s: token events after every stream's first token / (last token - last first token)",
            "itl: seconds between consecutive token events of one stream, pooled over streams and rounds",
            "ttft: from sending the N requests to a stream's first token event",
            "greedy, ignore_eos; llama.cpp requests set cache_prompt false",
        ],
        "results": results,
        "ratios": ratio_rows,
    }
    path = write_json(args.out, payload)
    print(f"\nwrote {path}")
    if args.plot:
        png = plot(payload, Path(args.plot))
        if png:
            print(f"wrote {png}")
    if not args.keep_logs:
        shutil.rmtree(log_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
