"""The command-line flags shared by every command that loads a model (`famserve generate`, `train`, `eval`): the
checkpoint, the attention shape (L, M, F, S), the device and CPU threads, and for the commands that run a model as
served, its dtype and FAM adapter. `famserve serve` reads the same settings through server/settings.py."""

from __future__ import annotations

import argparse

from famserve.engine.config import QUANTIZATIONS, resolve_device


def add_model_args(p: argparse.ArgumentParser, shape_from_adapter: bool = False) -> None:
    """--model, L, M, F, S, --device and --threads; with shape_from_adapter, L, M and S default to None: a
    --fam-adapter's trained values, else FamConfig's defaults (build.requested_fam)."""
    from famserve.engine.config import FamConfig

    p.add_argument("--model", default="smollm2-135m", help="HF folder, GGUF file, or alias (smollm2-135m)")
    default = FamConfig()

    def shape_arg(flag: str, name: str, meaning: str) -> None:
        value = getattr(default, name)
        if shape_from_adapter:
            p.add_argument(flag, type=int, default=None, help=f"{meaning} (default: the adapter's, else {value})")
        else:
            p.add_argument(flag, type=int, default=value, help=f"{meaning} (default: {value})")

    shape_arg("--block-size", "block_size", "L: tokens per block")
    shape_arg("--memory-blocks", "memory_blocks", "M: previous blocks visible")
    p.add_argument("--fam-length", type=int, default=default.fam_length, help="F: feedback-memory rows per layer")
    shape_arg("--sink-tokens", "sink_tokens", "S: attention-sink tokens kept visible")
    p.add_argument("--fam-after-window", action=argparse.BooleanOptionalAction,
                   default=None if shape_from_adapter else False,
                   help="fam mode: tokens read the FAM (and an adapter's LoRA applies to them) only once a block has "
                        "left the window" + (" (default: as the adapter was trained, else off)" if shape_from_adapter
                                             else ""))
    # argparse passes a string default through type too, so args.device never holds "auto"
    p.add_argument("--device", default="auto", type=resolve_device,
                   help="torch device: cpu, cuda, cuda:1, ... (default auto: CUDA when torch sees a GPU, else the CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def add_serving_args(p: argparse.ArgumentParser) -> None:
    """--fam-adapter, --dtype and --quantize: how a model is loaded to run as the server would run it."""
    p.add_argument("--fam-adapter", default=None,
                   help="trained FAM adapter (safetensors); none: no adapter, not even the one famserve ships for the "
                        "model (default: with --mode fam, that one, if any)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="weights and state dtype (default auto: bfloat16 on a GPU, float16 on one without bf16, "
                        "float32 on the CPU)")
    p.add_argument("--quantize", choices=QUANTIZATIONS, default="none",
                   help="int4: decode reads the projections as 4-bit weights (GGUF Q4_1's scheme), about 2x faster on "
                        "the CPU; CPU and bfloat16 only, so --dtype auto means bfloat16 (default: none)")


def set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)
