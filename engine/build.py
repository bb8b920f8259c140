"""Builds a ready FamModel from a checkpoint: weights on the device in the chosen dtype (with int4 copies for decode
when asked), the FAM adapter merged when given, and the attention mode resolved (FAM with a trained adapter,
otherwise BSWA with sinks)."""

from __future__ import annotations

import ctypes
import gc
import logging
from collections.abc import Collection
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .adapter import FamAdapter
from .config import NO_FAM_ADAPTER, EngineConfig, FamConfig
from .errors import CheckpointError
from .loader import Checkpoint, load_checkpoint
from .model import FamModel
from .quant import quantize_int4
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: FamModel
    tokenizer: Tokenizer
    model_id: str
    fam_trained: bool  # a trained FAM adapter is merged (FAM mode is meaningful)


def resolve_mode(fam: FamConfig, mode: str | None, has_adapter: bool) -> FamConfig:
    """mode None picks the default: fam when a trained adapter is loaded, else bswa (with sinks)."""
    chosen = mode or ("fam" if has_adapter else "bswa")
    if chosen == "fam" and not has_adapter:
        log.warning("FAM mode without a trained FAM adapter: an untrained FAM degrades a pretrained model badly "
                    "(see FAM-SPEC.md); use --fam-adapter, or --mode bswa")
    return replace(fam, mode=chosen)


# alias -> the FAM adapter shipped for it (inside this package), which `--mode fam` loads when none is given: FAM
# without a trained adapter is unusable on a pretrained model (FAM-SPEC.md). The default mode stays BSWA.
SHIPPED_FAM_ADAPTERS = {"smollm2-135m": "adapters/smollm2-135m-fam.safetensors"}


def shipped_fam_adapter(spec: str | Path, mode: str | None) -> Path | None:
    """The adapter famserve ships for model alias `spec`, when FAM mode is asked for; else None."""
    name = SHIPPED_FAM_ADAPTERS.get(spec.lower()) if isinstance(spec, str) and mode == "fam" else None
    return Path(__file__).parent / name if name else None


def chosen_fam_adapter(given: str | Path | None, spec: str | Path, mode: str | None) -> Path | None:
    """The adapter to load: the one given, none for NO_FAM_ADAPTER, else the shipped one (shipped_fam_adapter)."""
    if given is not None and str(given).lower() == NO_FAM_ADAPTER:
        return None
    return Path(given) if given is not None else shipped_fam_adapter(spec, mode)


# The attention shape an adapter was trained with, which it brings when the user does not choose one.
ADAPTER_SHAPE = ("block_size", "memory_blocks", "sink_tokens", "fam_after_window")


def requested_fam(block_size: int | None = None, memory_blocks: int | None = None, sink_tokens: int | None = None,
                  fam_after_window: bool | None = None, **fixed) -> tuple[FamConfig, frozenset[str]]:
    """(FamConfig, the ADAPTER_SHAPE fields not given) from L, M, S and fam_after_window as a user gave them (None:
    not given, so the loaded adapter's trained value, else FamConfig's default) and the other FamConfig fields."""
    values = (block_size, memory_blocks, sink_tokens, fam_after_window)
    given = {name: value for name, value in zip(ADAPTER_SHAPE, values) if value is not None}
    return FamConfig(**given, **fixed), frozenset(ADAPTER_SHAPE) - given.keys()


def _shape(fam: FamConfig | FamAdapter) -> str:
    """The ADAPTER_SHAPE of a config or an adapter, as a warning names it."""
    late = " (FAM read after the window)" if fam.fam_after_window else ""
    return f"L={fam.block_size} M={fam.memory_blocks} S={fam.sink_tokens}{late}"


def release_freed_heap() -> None:
    """Hand the heap a load freed (the float32 copy of every weight, dequantized GGUF blocks) back to the OS: glibc
    keeps it mapped otherwise, and the process stays 380-580 MB larger on the default model (measured RSS)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def load_model(spec: str | Path, fam: FamConfig | None = None, mode: str | None = None,
               engine: EngineConfig | None = None, adapter_path: str | Path | None = None,
               shape_from_adapter: Collection[str] = ()) -> LoadedModel:
    """Load `spec` (a path or an alias such as "smollm2-135m") as a streaming FAM model. shape_from_adapter names
    fields of ADAPTER_SHAPE the user left unset: a loaded adapter replaces them with the values it was trained with
    (an adapter trained at L=64 M=0 runs at L=64 M=0 unless told otherwise)."""
    engine = engine or EngineConfig()
    dtype = DTYPES[engine.dtype]
    adapter = FamAdapter.load(adapter_path) if adapter_path else None  # a bad file fails before the big load
    ckpt: Checkpoint = load_checkpoint(spec, dtype=torch.float32, device="cpu")
    fam = resolve_mode(fam or FamConfig(), mode, adapter is not None)
    if adapter is not None:
        adapter.check_compatible(ckpt.config)
        from_adapter = {name: getattr(adapter, name) for name in ADAPTER_SHAPE if name in shape_from_adapter}
        fam = replace(fam, fam_length=adapter.fam_length, **from_adapter)
        trained, running = _shape(adapter), _shape(fam)
        if fam.mode == "fam" and running != trained:
            log.warning("FAM adapter %s was trained with %s, running with %s: FAM may work less well away from its "
                        "training shape", adapter_path, trained, running)
    model = FamModel(ckpt.config, fam)
    weights = dict(ckpt.weights)
    if ckpt.config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{ckpt.source}: weights do not fit the architecture "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    if adapter is not None:
        adapter.merge_into(model)
    model.eval().requires_grad_(False)
    if engine.quantize == "int4":  # from the float32 weights as loaded: a Q4_1 file's weights keep their codes
        added = quantize_int4(model.model.layers, dtype)
        log.info("int4 decode weights: %.1f MiB beside the %s ones", added / 2**20, engine.dtype)
    model.to_device(engine.device, dtype)
    loaded = LoadedModel(model, ckpt.tokenizer, ckpt.model_id, adapter is not None)
    log.info("loaded %s (%s) on %s as %s; attention mode: %s", ckpt.model_id, ckpt.source, engine.device,
             engine.dtype, fam.describe())
    del ckpt, weights  # the float32 copies (load_state_dict copied them into the model's own tensors)
    release_freed_heap()
    return loaded
