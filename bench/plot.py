"""PNG figures for docs/benchmarks.md from the benchmarks' JSON files; each benchmark calls this at its end, and it
re-plots saved results on its own:

    python bench/plot.py bench/results/engine_speed.json bench/results/quality.json --out-dir docs
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

from markdown import LABELS, MIB  # noqa: E402


def _subtitle(payload: dict[str, Any]) -> str:
    m = payload["machine"]
    args = payload.get("args", {})
    return (f"{m['device_name']}, {m.get('torch_threads')} threads, {args.get('dtype', '')}, "
            f"{m['date_utc'][:10]}, commit {m.get('git_commit')}")


def _series(results: list[dict[str, Any]], system: str) -> list[dict[str, Any]]:
    return sorted((r for r in results if r["system"] == system and "skipped" not in r),
                  key=lambda r: r["context_tokens"])


def _tokens(n: float, _pos: Any = None) -> str:
    """1024 -> 1k, 1048576 -> 1M."""
    for unit, name in ((2**20, "M"), (2**10, "k")):
        if n >= unit:
            return f"{n / unit:g}{name}"
    return f"{n:g}"


def _xaxis(ax: Any) -> None:
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(_tokens))
    ax.set_xlabel("context, tokens")
    ax.grid(True, which="both", alpha=0.3)


def _median_with_spread(ax: Any, x: list[float], stats: list[dict[str, float]], **style: Any) -> Any:
    """Medians joined by a line, bars from min to max (the stats dicts of bench/common.py)."""
    med = [s["median"] for s in stats]
    spread = [[m - s["min"] for m, s in zip(med, stats)], [s["max"] - m for m, s in zip(med, stats)]]
    return ax.errorbar(x, med, yerr=spread, marker="o", capsize=3, **style)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def engine_speed(payload: dict[str, Any], out_dir: Path, prefix: str = "bench") -> list[Path]:
    """PREFIX_speed.png (prefill and decode tok/s against context) and PREFIX_memory.png (state bytes and RSS)."""
    results = payload["results"]
    systems = list(dict.fromkeys(r["system"] for r in results))
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, what in zip(axes, ("prefill", "decode")):
        for system in systems:
            rows = _series(results, system)
            if not rows:
                continue
            _median_with_spread(ax, [r["context_tokens"] for r in rows], [r[f"{what}_tok_s"] for r in rows],
                                label=LABELS.get(system, system))
        _xaxis(ax)
        ax.set_yscale("log")
        ax.set_ylabel(f"{what} tokens/s (median, bars: min-max)")
        ax.set_title(f"{what} speed")
    axes[0].legend()
    fig.suptitle(_subtitle(payload), fontsize=9)
    written.append(_save(fig, out_dir / f"{prefix}_speed.png"))

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for system in systems:
        rows = _series(results, system)
        if not rows:
            continue
        x = [r["context_tokens"] for r in rows]
        axes[0].plot(x, [r["state_nbytes"] / MIB for r in rows], marker="o", label=LABELS.get(system, system))
        axes[1].plot(x, [r["rss_bytes"] / MIB for r in rows], marker="o", label=LABELS.get(system, system))
    for ax, title in zip(axes, ("attention state per stream, MiB", "process RSS after the context, MiB")):
        _xaxis(ax)
        ax.set_yscale("log")
        ax.set_title(title)
    axes[0].legend()
    fig.suptitle(_subtitle(payload), fontsize=9)
    written.append(_save(fig, out_dir / f"{prefix}_memory.png"))
    return written


def quality(payload: dict[str, Any], out_dir: Path, prefix: str = "bench") -> list[Path]:
    """PREFIX_passkey.png (accuracy against prompt length per mode) and PREFIX_perplexity.png (per mode)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    passkey = payload.get("passkey") or []
    if passkey:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label in dict.fromkeys(r["label"] for r in passkey):
            rows = sorted((r for r in passkey if r["label"] == label and "skipped" not in r),
                          key=lambda r: r["num_tokens"])
            if rows:
                ax.plot([r["num_tokens"] for r in rows], [r["accuracy"] for r in rows], marker="o", label=label)
        _xaxis(ax)
        ax.set_xlabel("prompt length, tokens")
        ax.set_ylabel("PassKey accuracy")
        ax.set_ylim(-0.05, 1.05)
        ax.legend(fontsize=8)
        ax.set_title(f"PassKey retrieval ({_subtitle(payload)})", fontsize=8)
        written.append(_save(fig, out_dir / f"{prefix}_passkey.png"))
    ppl = [r for r in payload.get("perplexity") or [] if "skipped" not in r]
    if ppl:
        labels = list(dict.fromkeys(r["label"] for r in ppl))
        texts = list(dict.fromkeys(r["text"] for r in ppl))
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        width = 0.8 / max(1, len(labels))
        for i, label in enumerate(labels):
            rows = {r["text"]: r for r in ppl if r["label"] == label}
            xs = [j + i * width for j in range(len(texts))]
            axes[0].bar(xs, [rows[t]["perplexity"] if t in rows else 0 for t in texts], width, label=label)
            axes[1].bar(xs, [rows[t]["accuracy"] if t in rows else 0 for t in texts], width, label=label)
        for ax, title in zip(axes, ("perplexity (lower is better)", "next-token accuracy (higher is better)")):
            ax.set_xticks([j + width * (len(labels) - 1) / 2 for j in range(len(texts))], texts, fontsize=8)
            ax.set_title(title)
            ax.grid(True, axis="y", alpha=0.3)
        axes[0].set_yscale("log")
        axes[1].legend(fontsize=8)
        fig.suptitle(_subtitle(payload), fontsize=9)
        written.append(_save(fig, out_dir / f"{prefix}_perplexity.png"))
    return written


def server_concurrency(payload: dict[str, Any], path: Path) -> Path:
    """One PNG: aggregate decode tok/s (median, bars min-max) and inter-token latency p50/p99 against concurrent
    streams, one line per server (bench/server_concurrency.py)."""
    results = payload["results"]
    systems = list(dict.fromkeys(r["system"] for r in results))
    labels = {"famserve": f"famserve ({payload.get('versions', {}).get('famserve_mode', 'bswa')})",
              "llamacpp": "llama.cpp server"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for system in systems:
        rows = sorted((r for r in results if r["system"] == system and r["decode_tok_s"]), key=lambda r: r["streams"])
        if not rows:
            continue
        x = [r["streams"] for r in rows]
        line = _median_with_spread(axes[0], x, [r["decode_tok_s"] for r in rows],
                                   label=f"{labels.get(system, system)}, from the first stream's first token")
        color = line[0].get_color()
        steady = [r for r in rows if r.get("steady_tok_s")]
        if steady:
            axes[0].plot([r["streams"] for r in steady], [r["steady_tok_s"]["median"] for r in steady], marker="^",
                         linestyle="--", color=color,
                         label=f"{labels.get(system, system)}, steady (every stream decoding)")
        axes[1].plot(x, [r["itl_p50_s"] * 1e3 for r in rows], marker="o", color=color,
                     label=f"{labels.get(system, system)} p50")
        axes[1].plot(x, [r["itl_p99_s"] * 1e3 for r in rows], marker="^", linestyle="--", color=color,
                     label=f"{labels.get(system, system)} p99")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda n, _pos: f"{n:g}"))
        ax.set_xlabel("concurrent streams")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylim(bottom=0)
    axes[1].set_yscale("log")
    axes[1].yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _pos: f"{v:g}"))
    axes[0].set_ylabel("aggregate decode tokens/s (median; bars: min-max)")
    axes[0].set_title("aggregate decode throughput")
    axes[1].set_ylabel("inter-token latency, ms")
    axes[1].set_title("inter-token latency (pooled over streams)")
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    a = payload.get("args", {})
    fig.suptitle(f"{_subtitle(payload)}; {a.get('prompt_tokens')} prompt + {a.get('max_tokens')} generated tokens "
                 "per stream, over HTTP", fontsize=9)
    return _save(fig, path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="JSON files written by bench/engine_speed.py or bench/quality.py")
    p.add_argument("--out-dir", default=str(Path(__file__).resolve().parent.parent / "docs"))
    p.add_argument("--prefix", default="bench")
    args = p.parse_args(argv)
    for path in args.results:
        payload = json.loads(Path(path).read_text())
        if payload["benchmark"] == "server_concurrency":
            print(f"wrote {server_concurrency(payload, Path(args.out_dir) / f'{args.prefix}_concurrency.png')}")
            continue
        plotter = {"engine_speed": engine_speed, "quality": quality}[payload["benchmark"]]
        for png in plotter(payload, Path(args.out_dir), args.prefix):
            print(f"wrote {png}")


if __name__ == "__main__":
    main()
