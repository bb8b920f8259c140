"""Typed configuration of the engine: the network's shape (ModelConfig), the attention mode (FamConfig) and
the runtime limits (EngineConfig). Bad values raise ValueError naming the field."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Mode = Literal["fam", "bswa", "full"]
MODES: tuple[str, ...] = ("fam", "bswa", "full")

# Architectures whose decoder is the Llama block (RMSNorm, RoPE, GQA, SwiGLU); Qwen2 adds a QKV bias.
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {message}")


NO_FAM_ADAPTER = "none"  # as --fam-adapter: no adapter at all, not even the shipped one (an untrained FAM)
QUANTIZATIONS = ("none", "int4")  # EngineConfig.quantize


def int4_conflict(device: str, dtype: str) -> str | None:
    """Why int4 weights (quant.py) cannot run with this device and dtype ("auto" for either is fine), or None: the
    one rule EngineConfig, the server's settings and the benchmarks check (torch's CPU int4 kernel is fast for
    bfloat16 activations only)."""
    if dtype not in ("auto", "bfloat16"):
        return f"int4 weights run in bfloat16 (torch's int4 kernel), not dtype {dtype}"
    if device.split(":")[0] not in ("auto", "cpu"):
        return f"int4 weights run on the CPU only, not device {device}"
    return None


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling ("llama3") or plain position interpolation ("linear")."""

    kind: Literal["llama3", "linear"]
    factor: float  # how much longer than the original context
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only


# ModelConfig fields that name the tokenizer's special tokens rather than describe the network.
_TOKENIZER_FIELDS = ("bos_token_id", "eos_token_ids")


def _short_hash(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family decoder, read from an HF config.json or GGUF metadata."""

    architecture: str  # one of SUPPORTED_ARCHITECTURES
    vocab_size: int
    hidden_size: int  # C
    intermediate_size: int  # SwiGLU inner width
    num_layers: int  # N
    num_heads: int  # H
    num_kv_heads: int  # Hkv (GQA: H is a multiple of Hkv)
    head_dim: int  # D
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096  # the context the checkpoint was trained for
    tie_word_embeddings: bool = False  # lm_head shares the token embedding matrix
    attention_bias: bool = False  # QKV projections carry a bias (Qwen2; Llama with attention_bias)
    attention_out_bias: bool = False  # the output projection carries a bias too (Llama with attention_bias)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _require(self.architecture in SUPPORTED_ARCHITECTURES, "architecture",
                 f"{self.architecture!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim"):
            _require(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        _require(self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
                 f"{self.num_kv_heads} does not divide num_heads={self.num_heads}")
        _require(self.head_dim % 2 == 0, "head_dim", "must be even for RoPE")

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ModelConfig":
        """Build from the dict of an HF config.json (Llama, Mistral, Qwen2, SmolLM2)."""
        model_type = cfg.get("model_type", "")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"model_type: {model_type!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        num_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        scaling = None
        raw = cfg.get("rope_scaling") or None
        if raw is None and isinstance(cfg.get("rope_parameters"), dict):  # transformers >= 5 naming
            raw = cfg["rope_parameters"]
        rope_theta = float(cfg.get("rope_theta") or (raw or {}).get("rope_theta") or 10000.0)
        if raw:
            kind = raw.get("rope_type", raw.get("type", "default"))
            if kind == "llama3":
                scaling = RopeScaling("llama3", float(raw["factor"]), float(raw.get("low_freq_factor", 1.0)),
                                      float(raw.get("high_freq_factor", 4.0)),
                                      int(raw.get("original_max_position_embeddings", 8192)))
            elif kind == "linear":
                scaling = RopeScaling("linear", float(raw["factor"]))
            elif kind != "default":
                raise ValueError(f"rope_scaling: type {kind!r} is not supported (supported: llama3, linear)")
        return cls(
            architecture=model_type,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(cfg.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
            attention_out_bias=model_type != "qwen2" and bool(cfg.get("attention_bias", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    def fingerprint(self) -> str:
        """A short hash of the network's shape; saved states and adapters record it to refuse a different model.
        The special-token ids are left out: they belong to the tokenizer, and tokenizer libraries disagree about
        them (transformers 5.17 and 5.24 read different eos ids from the same GGUF file), which must not make a
        state or an adapter unloadable on another machine."""
        network = {k: v for k, v in asdict(self).items() if k not in _TOKENIZER_FIELDS}
        return _short_hash(network)

    def matches_fingerprint(self, fingerprint: str) -> bool:
        """True for this model's fingerprint, and for the one famserve recorded before the special-token ids were
        left out (every field hashed), so states and adapters saved then still load on the same setup."""
        return fingerprint in (self.fingerprint(), _short_hash(asdict(self)))


@dataclass(frozen=True)
class FamConfig:
    """How attention sees the past (FAM-SPEC.md). fam: blocks + memory + feedback memory; bswa: F = 0;
    full: plain causal attention over at most full_context_tokens (memory grows with it)."""

    mode: Mode = "bswa"
    block_size: int = 1024  # L, tokens per block
    memory_blocks: int = 3  # M, previous blocks of keys/values visible to a block
    fam_length: int = 64  # F, feedback-memory rows per layer (used in fam mode only)
    sink_tokens: int = 4  # S, first tokens kept visible forever (attention sinks); 0 turns it off
    full_context_tokens: int = 8192  # full mode only: the preallocated context, in tokens
    # fam mode only: a stream's tokens read the FAM, and a FAM adapter's LoRA applies to them, only once a block has
    # left its window (blocks M+1, M+2, ...); until then the stream is BSWA with the base weights exactly, and the
    # FAM only takes in the blocks. A deviation from the paper, where tokens always read the FAM: a conversation
    # that fits in the window is answered as BSWA answers it, and FAM only has to carry what fell out of it.
    fam_after_window: bool = False

    def __post_init__(self) -> None:
        _require(self.mode in MODES, "mode", f"{self.mode!r} is not one of {', '.join(MODES)}")
        _require(self.block_size > 0, "block_size", f"must be positive, got {self.block_size}")
        _require(self.memory_blocks >= 0, "memory_blocks", f"must be >= 0, got {self.memory_blocks}")
        _require(self.fam_length >= 0, "fam_length", f"must be >= 0, got {self.fam_length}")
        _require(0 <= self.sink_tokens <= self.block_size, "sink_tokens",
                 f"must be in 0..block_size ({self.block_size}), got {self.sink_tokens}")
        _require(self.full_context_tokens > 0, "full_context_tokens", "must be positive")

    @property
    def num_fam_rows(self) -> int:
        """F as the engine uses it: 0 unless the mode is fam."""
        return self.fam_length if self.mode == "fam" else 0

    @property
    def num_sinks(self) -> int:
        """S as the engine uses it: full mode sees every token, so it needs no sinks."""
        return 0 if self.mode == "full" else self.sink_tokens

    @property
    def gates_fam(self) -> bool:
        """Whether tokens wait for the window to move before reading the FAM (fam_after_window, in fam mode)."""
        return self.fam_after_window and self.mode == "fam"

    @property
    def ring_blocks(self) -> int:
        """Blocks in the key/value ring: the M memory blocks plus the block being filled."""
        if self.mode == "full":
            return -(-self.full_context_tokens // self.block_size)
        return self.memory_blocks + 1

    @property
    def max_tokens(self) -> int | None:
        """Longest stream this mode can hold, or None when unbounded."""
        return self.ring_blocks * self.block_size if self.mode == "full" else None

    def describe(self) -> str:
        if self.mode == "full":
            return f"full (causal attention, up to {self.max_tokens} tokens)"
        fam = f" F={self.fam_length}" if self.mode == "fam" else ""
        late = "; FAM read after the window" if self.gates_fam else ""
        return f"{self.mode} (L={self.block_size} M={self.memory_blocks}{fam} S={self.sink_tokens}{late})"


# The state byte budget when EngineConfig.state_memory_bytes is None. On CPU a fixed 4 GiB: about 21 streams of
# SmolLM2-135M at the defaults (bswa, L=1024, M=3: 0.19 GB each in float32), which with the weights and the default
# session budget stays inside an 8 GiB container. On CUDA a share of the device memory free once the weights are
# loaded; the rest is left for activations and session states.
DEFAULT_CPU_STATE_MEMORY_BYTES = 4 * 2**30
CUDA_STATE_MEMORY_FRACTION = 0.8
# Prompt tokens per engine step when not set. On a GPU a step costs its kernel launches more than its FLOPs, so fewer,
# larger steps prefill faster (docs/benchmarks.md run I, H200: 8192 against 512 made BSWA 7-13x and FAM 2.2-2.6x
# faster at 32k), at the price of longer pauses in other streams' decode while a prompt is read.
DEFAULT_PREFILL_TOKENS = {"cpu": 512, "cuda": 8192}


def default_prefill_tokens(device: str) -> int:
    """DEFAULT_PREFILL_TOKENS for a torch device name (cpu, cuda, cuda:1, ...)."""
    return DEFAULT_PREFILL_TOKENS["cuda" if device.startswith("cuda") else "cpu"]


def resolve_device(device: str) -> str:
    """A torch device name, with "auto" resolved: the first CUDA device when torch sees one, else the CPU."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str) -> str:
    """A dtype name, with "auto" resolved for a (resolved) device: bfloat16 on CUDA devices that have it, float16 on
    older ones (what GPU servers load a bf16 checkpoint as), and float32 on the CPU. bfloat16 is faster on CPUs with
    AMX too (docs/benchmarks.md run L), but other CPUs were not measured, and float32 is what the exactness tests hold
    against HF's logits: on the CPU it is asked for by name."""
    if dtype != "auto":
        return dtype
    if not device.startswith("cuda"):
        return "float32"
    import torch

    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


@dataclass(frozen=True)
class EngineConfig:
    """Runtime choices of one engine instance."""

    device: str = "cpu"  # "cpu", "cuda", "cuda:1", ...; "auto" is resolved on construction (resolve_device)
    # weights, activations and state; "auto" is resolved on construction (resolve_dtype)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    max_running: int = 32  # streams decoded together in one step
    max_waiting: int = 256  # requests queued for a running slot, at most (more: QueueFullError)
    prefill_chunk_tokens: int | None = None  # most prompt tokens processed in one step; None: DEFAULT_PREFILL_TOKENS
    # Bytes of request states the engine may hold (running plus kept for reuse); a request waits in the queue until
    # its state fits. None: DEFAULT_CPU_STATE_MEMORY_BYTES on CPU, CUDA_STATE_MEMORY_FRACTION of free memory on CUDA.
    state_memory_bytes: int | None = None
    cuda_graphs: bool = True  # on CUDA: decode steps and whole blocks replayed from CUDA graphs (cuda_graphs.py)
    # "int4": the decoder's projections rounded to 4 bits (GGUF Q4_1's scheme) and read by torch's int4 kernel in
    # decode steps (quant.py); CPU and bfloat16 only ("auto" dtype then means bfloat16)
    quantize: Literal["none", "int4"] = "none"

    @property
    def prefill_tokens(self) -> int:
        """prefill_chunk_tokens, or the default of this device's kind."""
        if self.prefill_chunk_tokens is not None:
            return self.prefill_chunk_tokens
        return default_prefill_tokens(self.device)

    def __post_init__(self) -> None:
        # frozen: the resolved names replace "auto" once, so every reader sees the device and dtype actually used
        object.__setattr__(self, "device", resolve_device(self.device))
        _require(self.dtype in ("auto", "float32", "bfloat16", "float16"), "dtype", f"unsupported dtype {self.dtype!r}")
        _require(self.quantize in QUANTIZATIONS, "quantize", f"unknown quantization {self.quantize!r}")
        if self.quantize == "int4":
            conflict = int4_conflict(self.device, self.dtype)
            _require(conflict is None, "quantize", conflict or "")
            object.__setattr__(self, "dtype", "bfloat16")
        object.__setattr__(self, "dtype", resolve_dtype(self.dtype, self.device))
        _require(self.max_running > 0, "max_running", "must be positive")
        _require(self.max_waiting > 0, "max_waiting", "must be positive")
        _require(self.prefill_chunk_tokens is None or self.prefill_chunk_tokens > 0, "prefill_chunk_tokens",
                 "must be positive")
        _require(self.state_memory_bytes is None or self.state_memory_bytes > 0, "state_memory_bytes",
                 "must be positive")


@dataclass(frozen=True)
class StateSignature:
    """What a saved state must match to be loaded: the model's shape and the attention config."""

    model_id: str
    model_fingerprint: str
    fam: FamConfig = field(default_factory=FamConfig)
