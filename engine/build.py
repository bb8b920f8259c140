"""Builds a ready FamModel from a checkpoint: weights on the device in the chosen dtype, the FAM adapter merged when
given, and the attention mode resolved (FAM with a trained adapter, otherwise BSWA with sinks)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .adapter import FamAdapter
from .config import EngineConfig, FamConfig
from .errors import CheckpointError
from .loader import Checkpoint, load_checkpoint
from .model import FamModel
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


def load_model(spec: str | Path, fam: FamConfig | None = None, mode: str | None = None,
               engine: EngineConfig | None = None, adapter_path: str | Path | None = None) -> LoadedModel:
    """Load `spec` (a path or an alias such as "smollm2-135m") as a streaming FAM model."""
    engine = engine or EngineConfig()
    dtype = DTYPES[engine.dtype]
    adapter = FamAdapter.load(adapter_path) if adapter_path else None  # a bad file fails before the big load
    ckpt: Checkpoint = load_checkpoint(spec, dtype=torch.float32, device="cpu")
    fam = resolve_mode(fam or FamConfig(), mode, adapter is not None)
    if adapter is not None:
        adapter.check_compatible(ckpt.config)
        fam = replace(fam, fam_length=adapter.fam_length)
        trained = (adapter.block_size, adapter.memory_blocks, adapter.sink_tokens)
        if fam.mode == "fam" and (fam.block_size, fam.memory_blocks, fam.sink_tokens) != trained:
            log.warning("FAM adapter %s was trained with L=%d M=%d S=%d, running with L=%d M=%d S=%d: FAM may "
                        "work less well away from its training shape", adapter_path, *trained, fam.block_size,
                        fam.memory_blocks, fam.sink_tokens)
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
    model.to_device(engine.device, dtype)
    log.info("loaded %s (%s) on %s as %s; attention mode: %s", ckpt.model_id, ckpt.source, engine.device,
             engine.dtype, fam.describe())
    return LoadedModel(model, ckpt.tokenizer, ckpt.model_id, adapter is not None)
