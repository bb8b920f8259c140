"""FamState: one stream's constant-size attention state (FAM rows, sink keys, the key/value ring), and its
save/load as safetensors with JSON metadata.

Key/value slots of a layer are laid out as one preallocated buffer [S sinks | F FAM rows | R*L ring], so a step
attends to a single tensor under a mask and nothing is concatenated or reallocated as the stream grows. Each slot's
RoPE position lives in `key_pos`; a query at position t sees exactly the slots with key_pos <= t, and EMPTY slots
are never seen. The ring holds R = M + 1 blocks: the M memory blocks and the block being filled."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from .config import FamConfig, ModelConfig
from .errors import StateFormatError, StateMismatchError

EMPTY = 2**62  # key_pos of a slot no query may see
FORMAT_VERSION = 1


@dataclass(frozen=True)
class StateLayout:
    """Where things sit in the key/value buffer of a stream, derived from the configs."""

    num_layers: int  # N
    num_kv_heads: int  # Hkv
    head_dim: int  # D
    hidden_size: int  # C
    block_size: int  # L
    memory_blocks: int  # M (for full mode: unused, the ring covers the whole context)
    num_sinks: int  # S
    num_fam: int  # F
    ring_blocks: int  # R

    @classmethod
    def from_configs(cls, model: ModelConfig, fam: FamConfig) -> "StateLayout":
        return cls(model.num_layers, model.num_kv_heads, model.head_dim, model.hidden_size, fam.block_size,
                   fam.memory_blocks, fam.num_sinks, fam.num_fam_rows, fam.ring_blocks)

    @property
    def ring_start(self) -> int:
        return self.num_sinks + self.num_fam

    @property
    def num_slots(self) -> int:
        """K: key/value slots per layer."""
        return self.ring_start + self.ring_blocks * self.block_size

    def block_slot(self, block_index: int) -> int:
        """First slot of 0-based block `block_index` in the ring."""
        return self.ring_start + (block_index % self.ring_blocks) * self.block_size


@dataclass
class FamState:
    """The whole state of one stream. Its size depends on the configs only, never on tokens processed."""

    layout: StateLayout
    k: torch.Tensor  # (N, Hkv, K, D) keys, RoPE-rotated at key_pos
    v: torch.Tensor  # (N, Hkv, K, D) values
    key_pos: torch.Tensor  # (K,) int64 RoPE position of each slot, EMPTY when not visible
    sink_k: torch.Tensor  # (N, Hkv, S, D) unrotated keys of the first S tokens, re-rotated as the window moves
    fam: torch.Tensor  # (N, F, C) FAM_prev of each layer, in the layer's input (hidden) space
    num_tokens: int = 0  # tokens consumed; also the position of the next token
    num_fam_updates: int = 0  # completed blocks whose FAM update ran

    @property
    def block_start(self) -> int:
        """Position of the first token of the block being filled."""
        return self.num_tokens - self.num_tokens % self.layout.block_size

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"k": self.k, "v": self.v, "key_pos": self.key_pos, "sink_k": self.sink_k, "fam": self.fam}

    def clone(self) -> "FamState":
        """An independent copy (fork): one memcpy of a fixed size."""
        copies = {name: t.clone() for name, t in self.tensors().items()}
        return FamState(self.layout, num_tokens=self.num_tokens, num_fam_updates=self.num_fam_updates, **copies)

    def copy_(self, other: "FamState") -> None:
        """Overwrite this state with `other` in place, reusing the buffers."""
        for name, t in self.tensors().items():
            t.copy_(other.tensors()[name])
        self.num_tokens, self.num_fam_updates = other.num_tokens, other.num_fam_updates

    # --- persistence -------------------------------------------------------------------------------------------

    def to_bytes(self, model_id: str, model: ModelConfig, fam: FamConfig, extra: dict[str, str] | None = None) -> bytes:
        """Serialise; `extra` adds string metadata (e.g. a session record) readable with read_metadata."""
        meta = {**(extra or {}),
            "format_version": str(FORMAT_VERSION),
            "model_id": model_id,
            "model_fingerprint": model.fingerprint(),
            "fam_config": json.dumps(asdict(fam), sort_keys=True),
            "num_tokens": str(self.num_tokens),
            "num_fam_updates": str(self.num_fam_updates),
            "dtype": str(self.k.dtype).removeprefix("torch."),
        }
        return save({n: t.contiguous().cpu() for n, t in self.tensors().items()}, metadata=meta)

    def save(self, path: str | Path, model_id: str, model: ModelConfig, fam: FamConfig) -> None:
        Path(path).write_bytes(self.to_bytes(model_id, model, fam))

    @classmethod
    def from_bytes(cls, data: bytes, model: ModelConfig, fam: FamConfig, device: torch.device | str = "cpu",
                   dtype: torch.dtype | None = None, source: str = "state") -> "FamState":
        """Load a saved state, refusing one made by another model or attention config."""
        meta = read_metadata(data, source)
        if meta.get("format_version") != str(FORMAT_VERSION):
            raise StateFormatError(f"{source}: format version {meta.get('format_version')!r} is not supported "
                                   f"(expected {FORMAT_VERSION})")
        if not model.matches_fingerprint(meta.get("model_fingerprint", "")):
            raise StateMismatchError(f"{source}: saved by model {meta.get('model_id')!r} with a different "
                                     "architecture; it cannot be loaded into this model")
        saved_fam = json.loads(meta.get("fam_config", "{}"))
        if saved_fam:  # states saved before the field existed ran without it
            saved_fam.setdefault("fam_after_window", False)
        if saved_fam != asdict(fam):
            raise StateMismatchError(f"{source}: saved with attention config {saved_fam}, "
                                     f"but this engine runs {asdict(fam)}")
        try:
            tensors = load(data)
        except (SafetensorError, ValueError) as e:
            raise StateFormatError(f"{source}: corrupt state data ({e})") from e
        layout = StateLayout.from_configs(model, fam)
        blank = allocate(layout, torch.device("cpu"), tensors.get("k", torch.empty(0)).dtype)
        for name, t in blank.tensors().items():
            if name not in tensors or tensors[name].shape != t.shape:
                raise StateFormatError(f"{source}: tensor {name!r} is missing or has the wrong shape")
        dtype = dtype or tensors["k"].dtype
        moved = {n: (t.to(device) if n == "key_pos" else t.to(device, dtype)) for n, t in tensors.items()
                 if n in blank.tensors()}
        return cls(layout, num_tokens=int(meta["num_tokens"]), num_fam_updates=int(meta["num_fam_updates"]), **moved)

    @classmethod
    def load(cls, path: str | Path, model: ModelConfig, fam: FamConfig, device: torch.device | str = "cpu",
             dtype: torch.dtype | None = None) -> "FamState":
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise StateFormatError(f"{path}: cannot read state file ({e.strerror})") from e
        return cls.from_bytes(data, model, fam, device, dtype, source=str(path))


def read_metadata(data: bytes, source: str = "state") -> dict[str, str]:
    """The JSON metadata of a saved state, without loading its tensors."""
    if len(data) < 8:
        raise StateFormatError(f"{source}: truncated state data ({len(data)} bytes)")
    header_len = int.from_bytes(data[:8], "little")
    if header_len <= 0 or 8 + header_len > len(data):
        raise StateFormatError(f"{source}: truncated or corrupt state header")
    try:
        header = json.loads(data[8:8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StateFormatError(f"{source}: corrupt state header ({e})") from e
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise StateFormatError(f"{source}: not a famserve state (no metadata)")
    return meta


def allocate(layout: StateLayout, device: torch.device, dtype: torch.dtype) -> FamState:
    """A zeroed state with every slot EMPTY (the model fills in FAM_0; see FamModel.new_state)."""
    n, hkv, d, k = layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.num_slots
    return FamState(
        layout=layout,
        k=torch.zeros(n, hkv, k, d, device=device, dtype=dtype),
        v=torch.zeros(n, hkv, k, d, device=device, dtype=dtype),
        key_pos=torch.full((k,), EMPTY, device=device, dtype=torch.int64),
        sink_k=torch.zeros(n, hkv, layout.num_sinks, d, device=device, dtype=dtype),
        fam=torch.zeros(n, layout.num_fam, layout.hidden_size, device=device, dtype=dtype),
    )
