"""Server configuration: one pydantic-settings class whose every field is both an environment variable FAMSERVE_<NAME>
and a command-line flag --<name> generated from the field (a flag wins over the environment), so the two never drift."""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from famserve.engine.config import NO_FAM_ADAPTER, int4_conflict

ENV_PREFIX = "FAMSERVE_"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def _split_commas(value: Any) -> Any:
    """"a, b" -> ["a", "b"]: list settings come from the environment and from flags as comma-separated text."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """Everything `famserve serve` can be told. Field order is the order of `famserve serve --help`."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

    # --- the model and its attention mode
    model: str = Field("smollm2-135m", description="HF folder, GGUF file, or alias (smollm2-135m)")
    served_model_name: str | None = Field(
        None, description="name clients pass as `model` and /v1/models lists (default: the model's own id)")
    mode: Literal["fam", "bswa", "full"] | None = Field(
        None, description="attention mode (default: fam with a trained adapter, else bswa)")
    block_size: int | None = Field(None, gt=0, description="L: tokens per block (default: the FAM adapter's "
                                                           "trained L, else 1024)")
    memory_blocks: int | None = Field(None, ge=0, description="M: previous blocks visible to a block (default: the "
                                                              "FAM adapter's trained M, else 3)")
    fam_length: int = Field(64, ge=0, description="F: feedback-memory rows per layer (fam mode; an adapter sets "
                                                  "its own)")
    sink_tokens: int | None = Field(None, ge=0, description="S: attention-sink tokens kept visible, fam and bswa modes "
                                                            "(default: the FAM adapter's trained S, else 4)")
    fam_after_window: bool | None = Field(
        None, description="fam mode: tokens read the FAM (and the adapter's LoRA applies to them) only once a block "
                          "has left the window, so a conversation inside the window is answered as bswa answers it "
                          "(default: as the FAM adapter was trained, else off)")
    full_context_tokens: int = Field(8192, gt=0, description="context preallocated per request in full mode, in tokens")
    fam_adapter: Path | None = Field(None, description="trained FAM adapter (safetensors) to load: its FAM prompt, "
                                                       "and LoRA merged into the weights or kept for the FAM rows "
                                                       "(default with mode fam: the one famserve ships for the "
                                                       "model, if any; none: no adapter at all)")
    device: str = Field("auto", description="torch device: cpu, cuda, cuda:1, ...; auto: CUDA when torch sees a GPU, "
                                            "else the CPU")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights and state dtype; auto: bfloat16 on a GPU (float16 on one without bf16), float32 "
                            "on the CPU (bfloat16 is faster on CPUs with AMX: ask for it)")
    quantize: Literal["none", "int4"] = Field(
        "none", description="int4: decode reads the decoder's projections as 4-bit weights (GGUF Q4_1's scheme, "
                            "about 2x faster decode on the CPU; a quarter more weight memory); CPU and bfloat16 only, "
                            "so dtype auto means bfloat16")
    threads: int | None = Field(None, gt=0, description="torch CPU threads (default: torch's choice)")
    cuda_graphs: bool = Field(True, description="on CUDA, replay decode steps and whole prompt blocks from CUDA "
                                                "graphs, captured once per batch or stream (false: every step eager)")

    # --- HTTP
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 for every interface)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on")
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="accepted API keys, comma-separated; none = no authentication")
    api_key_file: Path | None = Field(None, description="file with more API keys, one per line (# comments)")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="origins allowed by CORS, comma-separated (* for any); none = CORS off")
    log_level: Literal[LOG_LEVELS] = Field("info", description="log level")  # type: ignore[valid-type]

    # --- limits
    max_body_bytes: int = Field(16 * 2**20, gt=0, description="largest request body, in bytes (larger: 413)")
    max_prompt_tokens: int = Field(131072, gt=0, description="most prompt tokens in one prompt (more: 400)")
    max_tokens_cap: int = Field(4096, gt=0, description="largest max_tokens a request may ask for (more: 400); "
                                                        "also chat's default when a request gives none")
    max_running: int = Field(32, gt=0, description="requests decoded together in one engine step")
    max_waiting: int = Field(256, gt=0, description="requests queued for a slot, at most (more: 429)")
    prefill_budget_tokens: int | None = Field(None, gt=0, description="most prompt tokens processed in one engine "
                                                                      "step (default: 512 on CPU, 8192 on CUDA)")
    state_memory_bytes: int | None = Field(
        None, gt=0, description="request states the engine holds at most, in bytes; a request waits in the queue "
                                "until its state fits (default: 4 GiB on CPU, 80% of free memory on CUDA)")
    request_timeout_s: float | None = Field(None, gt=0, description="abort a generation running longer than "
                                                                      "this, in seconds (default: no limit)")
    shutdown_grace_s: float = Field(30.0, ge=0, description="on SIGTERM, how long running requests may finish "
                                                            "before they are cut off, in seconds (new ones get 503)")
    metrics_open: bool = Field(False, description="serve /metrics without an API key (for a scraper on a private "
                                                  "network; never route it from outside)")

    # --- sessions
    state_dir: Path = Field(Path("famserve-state"), description="folder of the file session store (snapshots, logs)")
    session_store: str | None = Field(None, description="redis://host:port/db to share sessions between replicas "
                                                        "(default: the file store in state_dir)")
    session_memory_bytes: int = Field(2 * 2**30, gt=0, description="session states kept in memory at most, in "
                                                                   "bytes; least recently used ones are evicted")
    snapshot_every_tokens: int = Field(16384, gt=0, description="snapshot a session once this many of its tokens "
                                                                "are only in its log (bounds replay at load)")
    max_upload_bytes: int = Field(4 * 2**30, gt=0, description="largest session append or import body, in bytes")

    _split = field_validator("api_keys", "cors_origins", mode="before")(_split_commas)

    @field_validator("fam_adapter")
    @classmethod
    def _adapter_exists(cls, value: Path | None) -> Path | None:
        if value is not None and str(value).lower() == NO_FAM_ADAPTER:  # no adapter at all
            return value
        if value is not None and not value.is_file():  # refused now, not minutes later when the model has loaded
            raise ValueError(f"{value}: FAM adapter file not found")
        return value

    @model_validator(mode="after")
    def _shipped_adapter(self) -> Settings:
        # --mode fam on a model famserve ships an adapter for: that adapter, unless told "none"
        from famserve.engine.build import chosen_fam_adapter  # here: importing this module stays torch-free

        self.fam_adapter = chosen_fam_adapter(self.fam_adapter, self.model, self.mode)
        return self

    @model_validator(mode="after")
    def _int4_on_the_cpu_in_bfloat16(self) -> Settings:
        # refused now, not once the model has loaded (device "auto" on a GPU machine is refused at load)
        conflict = int4_conflict(self.device, self.dtype) if self.quantize == "int4" else None
        if conflict:
            raise ValueError(f"quantize {conflict}")
        return self

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    def all_api_keys(self) -> list[str]:
        """api_keys plus the keys in api_key_file; raises ValueError naming api_key_file when it cannot be read."""
        keys = [key.get_secret_value() for key in self.api_keys]
        if self.api_key_file is not None:
            try:
                lines = self.api_key_file.read_text().splitlines()
            except OSError as exc:
                raise ValueError(f"api_key_file: cannot read {self.api_key_file}: {exc.strerror}") from None
            keys += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        return keys


def _flag_kwargs(annotation: Any) -> dict[str, Any]:
    """argparse keywords for a field's type: Optional is dropped, Literal becomes choices, lists are comma-separated."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is Literal:
        choices = typing.get_args(annotation)
        return {"choices": list(choices), "type": type(choices[0])}
    if typing.get_origin(annotation) is list:
        return {"type": str, "metavar": "A,B"}
    return {"type": annotation if annotation in (int, float) else str}


def build_parser(prog: str = "famserve serve") -> argparse.ArgumentParser:
    """A flag per Settings field; flags not given are absent from the namespace, so the environment fills them."""
    parser = argparse.ArgumentParser(prog=prog, argument_default=argparse.SUPPRESS,
                                     description="Run the OpenAI-compatible HTTP server. Every flag is also an "
                                                 f"environment variable {ENV_PREFIX}<NAME>; a flag wins.")
    for name, field in Settings.model_fields.items():
        kwargs = _flag_kwargs(field.annotation)
        default = "[]" if field.default_factory is not None else field.default
        env = ENV_PREFIX + name.upper()
        parser.add_argument("--" + name.replace("_", "-"), dest=name, **kwargs,
                            help=f"{field.description} (env {env}; default {default})".replace("%", "%%"))
    return parser


def parse_settings(argv: list[str]) -> Settings:
    """Settings from flags over environment over defaults; argparse exits on a malformed flag, pydantic raises
    ValidationError naming a bad value."""
    given = vars(build_parser().parse_args(argv))
    return Settings(**given)
