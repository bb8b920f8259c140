"""Helpers shared by the benchmark scripts: machine description, resident memory, summary statistics, a table
printed with rich (plain text when rich is missing) and the JSON result file."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (platform.processor() is often empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return cpu_model()


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() + ("-dirty" if dirty else "")) or None


def machine_info(device: str) -> dict[str, Any]:
    try:
        import transformers
        transformers_version = transformers.__version__
    except ImportError:
        transformers_version = None
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "device": device,
        "device_name": device_name(device),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "transformers_version": transformers_version,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": git_commit(),
        "load_average_1_5_15m": list(os.getloadavg()),  # other work on a shared machine skews timings
    }


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process image: VmHWM, which (unlike ru_maxrss) starts afresh at exec, so a
    child process does not report its parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # ru_maxrss is in KiB on Linux


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def stream_counts(parser: argparse.ArgumentParser, text: str) -> list[int]:
    """--streams "1,2,4": sorted distinct positive integers, or the parser's usage error."""
    try:
        counts = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        counts = []
    if not counts or counts[0] < 1:
        parser.error("--streams: give comma-separated positive integers")
    return counts


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    try:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table
    except ImportError:
        widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
        print(f"\n{title}")
        print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
        for row in rows:
            print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
        return
    table = Table(title=escape(title))  # "[min-max]" would otherwise be read as markup
    for i, c in enumerate(columns):
        table.add_column(escape(c), justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(escape(v) for v in row))
    Console(width=max(120, Console().width)).print(table)


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
    return path


def save_run(path: str | Path, benchmark: str, machine: dict[str, Any], args: Any, started_s: float, final: bool,
             **fields: Any) -> Path:
    """Write a run's JSON: the machine with the run's wall time and the load at its end, the arguments, and the
    benchmark's fields; `complete` stays False until the final write, so a run cut short keeps what it measured."""
    machine["wall_s"] = time.perf_counter() - started_s
    machine["load_average_at_end"] = list(os.getloadavg())
    return write_json(path, {"benchmark": benchmark, "complete": final, "machine": machine, "args": vars(args),
                             **fields})


def start(args: Any) -> dict[str, Any]:
    """What every benchmark does first: quiet logging, the requested torch threads; returns machine_info. A run
    that will plot (--plot-dir) and cannot stops here, not after an hour of measuring."""
    import importlib.util
    import logging

    import torch

    if getattr(args, "plot_dir", None) and not getattr(args, "child", False) and \
            importlib.util.find_spec("matplotlib") is None:
        raise SystemExit("the plots need matplotlib (pip install -e '.[bench]'), or pass --plot-dir '' for none")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    return machine_info(args.device)
