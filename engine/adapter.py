"""FamAdapter: the only weights FAM adds to a checkpoint — a FAM prompt P (F x C) and optional LoRA deltas — in one
safetensors file whose metadata names the base model. LoRA on every row is merged into the weights at load time,
except under FamConfig.fam_after_window, where the window's tokens keep the base weights: it then runs unmerged
(fam_lora.py) for the FAM rows and the tokens past the window; LoRA on the FAM rows only is installed unmerged."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .errors import CheckpointError
from .fam_lora import FamLoRA

FORMAT = "famserve-fam-adapter/1"


@dataclass
class FamAdapter:
    fam_prompt: torch.Tensor  # (F, C) at the token-embedding level
    base_fingerprint: str  # ModelConfig.fingerprint() of the model it was trained on
    base_model_id: str
    block_size: int  # L it was trained with
    memory_blocks: int  # M it was trained with
    sink_tokens: int  # S it was trained with
    # module name -> (A (r, in), B (out, r))
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    lora_scale: float = 1.0  # alpha / rank (of both kinds)
    # the same, for the deltas that only the FAM rows use (FamLoRA)
    fam_lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    source: str | None = None  # the file it was loaded from, for error messages
    fam_after_window: bool = False  # trained with tokens reading the FAM only past the window (FamConfig)

    @property
    def fam_length(self) -> int:
        return self.fam_prompt.shape[0]

    def save(self, path: str | Path) -> None:
        tensors = {"fam_prompt": self.fam_prompt.contiguous().float().cpu()}
        for prefix, pairs in (("lora", self.lora), ("fam_lora", self.fam_lora)):
            for name, (a, b) in pairs.items():
                tensors[f"{prefix}.{name}.A"] = a.contiguous().float().cpu()
                tensors[f"{prefix}.{name}.B"] = b.contiguous().float().cpu()
        meta = {"format": FORMAT, "base_fingerprint": self.base_fingerprint, "base_model_id": self.base_model_id,
                "fam": json.dumps({"block_size": self.block_size, "memory_blocks": self.memory_blocks,
                                   "sink_tokens": self.sink_tokens, "fam_after_window": self.fam_after_window}),
                "lora_scale": str(self.lora_scale)}
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> FamAdapter:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: FAM adapter file not found")
        try:
            tensors = load_file(str(path))
            with open(path, "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable FAM adapter ({e})") from e
        meta = header.get("__metadata__") or {}
        if meta.get("format") != FORMAT or "fam_prompt" not in tensors:
            raise CheckpointError(f"{path}: not a famserve FAM adapter (format {meta.get('format')!r})")
        fam = json.loads(meta["fam"])
        lora, fam_lora = {}, {}
        for key in tensors:
            for prefix, pairs in (("lora.", lora), ("fam_lora.", fam_lora)):
                if key.startswith(prefix) and key.endswith(".A"):
                    name = key[len(prefix):-len(".A")]
                    pairs[name] = (tensors[key], tensors[f"{prefix}{name}.B"])
        return cls(tensors["fam_prompt"], meta["base_fingerprint"], meta.get("base_model_id", "?"),
                   int(fam["block_size"]), int(fam["memory_blocks"]), int(fam["sink_tokens"]), lora,
                   float(meta.get("lora_scale", 1.0)), fam_lora, source=str(path),
                   fam_after_window=bool(fam.get("fam_after_window", False)))

    def check_compatible(self, model: ModelConfig) -> None:
        where = f" (adapter file {self.source})" if self.source else ""
        if not model.matches_fingerprint(self.base_fingerprint):
            raise CheckpointError(f"FAM adapter was trained for {self.base_model_id!r} (a different architecture: "
                                  f"fingerprint {self.base_fingerprint}, this model's is {model.fingerprint()}); "
                                  f"it cannot be used with this model{where}")
        if self.fam_prompt.shape[1] != model.hidden_size:
            raise CheckpointError(f"FAM adapter prompt width {self.fam_prompt.shape[1]} != hidden size "
                                  f"{model.hidden_size}{where}")

    def merge_into(self, model: torch.nn.Module) -> None:
        """Add each LoRA delta B @ A * scale to its linear weight, install the FAM-row LoRA and the FAM prompt.
        Under fam_after_window (model.fam_config) the every-row LoRA is installed unmerged instead."""
        if self.lora and model.fam_config.gates_fam:
            if self.fam_lora:
                raise CheckpointError(f"FAM adapter {self.source}: LoRA on every row and on the FAM rows both; "
                                      "fam_after_window supports one kind at a time")
            model.set_fam_lora(self._fam_lora(model, self.lora), after_window=True)
        else:
            self._merge_lora(model)
            if self.fam_lora:
                model.set_fam_lora(self._fam_lora(model, self.fam_lora))
        model.set_fam_prompt(self.fam_prompt)

    def _merge_lora(self, model: torch.nn.Module) -> None:
        modules = dict(model.named_modules())
        with torch.no_grad():
            for name, (a, b) in self.lora.items():
                linear = modules.get(name)
                if not isinstance(linear, torch.nn.Linear):
                    raise CheckpointError(f"FAM adapter targets {name!r}, which is not a linear layer of this model")
                linear.weight += (b.float() @ a.float() * self.lora_scale).to(linear.weight.dtype)

    def _fam_lora(self, model: torch.nn.Module, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> FamLoRA:
        try:
            return FamLoRA.from_pairs(model, pairs, self.lora_scale, self.source or "FAM adapter")
        except (ValueError, KeyError, AttributeError) as e:
            raise CheckpointError(f"FAM adapter's LoRA does not fit this model: {e}") from e
