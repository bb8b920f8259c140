"""FAM fine-tuning (paper section 3.1, B.2): `FamTrainer` is one optimisation loop for a FamModel under a FamConfig
with Random State Passing; `train` is `famserve train`: load a checkpoint, wrap LoRA, learn the FAM prompt P and the
LoRA deltas on text, PassKey and/or recall data (optionally text only for the first passkey_start_step steps),
checkpoint and resume (or start a new run from an adapter's weights), and write one FamAdapter file.

Gradients flow through memory segments and FAM across the blocks of a training sequence (no stop-gradient), each
layer recomputed in the backward pass (activation checkpointing). Across steps only the FAM carries (RSP, see
sequence.py): with probability rsp_prob a row starts from the FAM that ended the previous step, detached."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from famserve.engine.adapter import FamAdapter
from famserve.engine.config import FamConfig
from famserve.engine.model import FamModel
from famserve.engine.training.lora import (ALL_TARGETS, apply_fam_lora, apply_lora, export_adapter,
                                           load_adapter_weights, lora_disabled)
from famserve.engine.training.sequence import default_fam_prompt, forward_sequence, masked_loss

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    loss: float  # what was minimised: the mean cross-entropy over the labelled positions, mixed with kl if distilling
    accuracy: float  # argmax accuracy there
    num_tokens: int  # tokens in the batch
    seconds: float
    cross_entropy: float  # mean cross-entropy there (= loss without distillation)
    kl: float | None  # mean KL(teacher || model) there, when distilling


class FamTrainer:
    """AdamW over `params` (by name; the FAM prompt among them when F > 0) with linear warmup then cosine decay to
    10% (or constant), gradient clipping, and Random State Passing of the FAM between steps.

    With distill_weight w > 0 every step also reads its batch with the base model (LoRA off) in full attention, the
    teacher, and minimises (1 - w) * cross-entropy + w * KL(teacher || model) on the labelled positions: the
    teacher sees the whole sequence, so wherever the window hides what it uses, only FAM can match it, and
    wherever it does not, matching it keeps the base model's behaviour (chat included), which plain
    cross-entropy on novels wore away (docs/training.md)."""

    def __init__(self, model: FamModel, fam: FamConfig, params: dict[str, nn.Parameter],
                 fam_prompt: nn.Parameter | None, *, lr: float, total_steps: int, warmup_steps: int = 0,
                 schedule: str = "cosine", weight_decay: float = 0.0, rsp_prob: float = 0.8, grad_clip: float = 1.0,
                 checkpoint_layers: bool = True, seed: int = 0, autocast_bf16: bool = False,
                 distill_weight: float = 0.0):
        if fam.num_fam_rows and fam_prompt is None:
            raise ValueError("fam_prompt: fam mode trains a FAM prompt; pass one")
        if schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule: {schedule!r} is not one of cosine, constant")
        self.model, self.fam, self.fam_prompt = model, fam, fam_prompt
        self.distill_weight = distill_weight  # checked by masked_loss, which uses it
        self.params = params
        self.rsp_prob, self.grad_clip, self.checkpoint_layers = rsp_prob, grad_clip, checkpoint_layers
        self.autocast_bf16 = autocast_bf16  # forward in bf16 (weights, optimizer and FAM carry stay float32)
        self.optimizer = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=weight_decay)
        self.total_steps = total_steps  # may shrink during a run with a time budget (train, max_seconds)

        def factor(step: int) -> float:
            if step < warmup_steps:
                return (step + 1) / warmup_steps
            if schedule == "constant":
                return 1.0
            progress = min(1.0, (step - warmup_steps) / max(1, self.total_steps - warmup_steps))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.generator = torch.Generator().manual_seed(seed)  # the RSP coin flips
        self.carried: torch.Tensor | None = None  # (N, B, F, C) the FAM that ended the last step, detached
        self.step_count = 0

    def start_fam(self, batch: int, carry: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Per row: the carried FAM with probability rsp_prob (when there is one and carry), else FAM_0 from the
        prompt."""
        if not self.fam.num_fam_rows:
            return None, None
        fam0 = self.model.initial_fam(self.fam_prompt)  # (N, F, C), gradients to P
        start = fam0[:, None].expand(-1, batch, -1, -1)  # (N, B, F, C)
        fresh = torch.ones(batch, dtype=torch.bool)
        if carry and self.carried is not None and self.carried.shape[1] == batch and self.rsp_prob > 0:
            carried_rows = torch.rand(batch, generator=self.generator) < self.rsp_prob
            start = torch.where(carried_rows.to(start.device)[None, :, None, None], self.carried, start)
            fresh = ~carried_rows
        return start, fresh.to(fam0.device)

    def train_step(self, tokens: torch.Tensor, labels: torch.Tensor, carry_fam: bool = True) -> StepResult:
        """One optimisation step; carry_fam=False starts every row from FAM_0 whatever RSP would draw."""
        started = time.perf_counter()
        device = self.model.device
        tokens, labels = tokens.to(device), labels.to(device)
        start, fresh = self.start_fam(tokens.shape[0], carry=carry_fam)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.autocast_bf16):
            teacher = self.teacher_hidden(tokens) if self.distill_weight else None
            out = forward_sequence(self.model, self.fam, tokens, start_fam=start, fresh=fresh,
                                   checkpoint=self.checkpoint_layers)
            terms = masked_loss(self.model, out.hidden, labels, teacher_hidden=teacher,
                                distill_weight=self.distill_weight)
        loss = terms.loss.float()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        if out.num_fam_updates:  # a sequence shorter than a block leaves FAM_0 (fresh): nothing new to carry
            self.carried = out.fam.detach().float()
        self.step_count += 1
        accuracy = (terms.predictions == labels[labels != -100]).float().mean().item()
        return StepResult(loss.item(), accuracy, tokens.numel(), time.perf_counter() - started,
                          terms.cross_entropy.item(), None if terms.kl is None else terms.kl.item())

    @torch.no_grad()
    def teacher_hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, C) the base model's last-layer rows for the batch: LoRA off, full causal attention."""
        with lora_disabled(self.model):
            return forward_sequence(self.model, FamConfig(mode="full"), tokens, checkpoint=False).hidden

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def state_dict(self) -> dict:
        return {"params": {n: p.detach().cpu().clone() for n, p in self.params.items()},
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "generator": self.generator.get_state(), "step_count": self.step_count,
                "carried": None if self.carried is None else self.carried.cpu()}

    def load_state_dict(self, state: dict) -> None:
        if set(state["params"]) != set(self.params):
            raise ValueError("training checkpoint: its trainable tensors do not match this run's")
        with torch.no_grad():
            for name, value in state["params"].items():
                self.params[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        self.step_count = int(state["step_count"])
        carried = state["carried"]
        self.carried = None if carried is None else carried.to(self.model.device, self.model.dtype)


# --- famserve train ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainConfig:
    """Everything `famserve train` takes; bad values raise ValueError naming the field."""

    model: str = "smollm2-135m"  # HF folder, GGUF file or alias
    out: str = "fam-adapter.safetensors"  # the adapter; <stem>.train.pt (checkpoint) and <stem>.log.jsonl beside it
    data: tuple[str, ...] = ()  # text files
    passkey: bool = False  # train on text PassKey examples (filler from --data when given)
    passkey_fraction: float = 0.5  # with both data kinds: share of PassKey batches
    passkey_start_step: int = 0  # curriculum: text only before this step, then PassKey mixed in (needs both kinds)
    passkey_beyond_window: int = 0  # N > 0: every key 1..N blocks before the question's window (0: paper layout)
    passkey_answer_anywhere: bool = False  # end PassKey prompts at every offset of a block (filler after the answer)
    recall_fraction: float = 0.0  # share of recall batches (a text span repeated beyond the window; needs --data)
    chat_data: str | None = None  # JSONL of conversations ({"messages": [...]}) for chat batches
    chat_fraction: float = 0.0  # share of chat batches (loss on the assistant's turns; needs chat_data)
    fresh_chat: bool = False  # chat batches start from FAM_0, as a new conversation starts a new stream (no RSP)
    distill_weight: float = 0.0  # w: minimise (1 - w) * CE + w * KL(base model in full attention || model)
    steps: int = 1000  # optimizer steps in total (a resumed run continues up to this count)
    seq_len: int = 1024  # tokens per training sequence
    batch_size: int = 1  # sequences per step
    lr: float = 3e-4  # peak learning rate (AdamW)
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max gradient norm; 0 = off
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ALL_TARGETS
    lora_scope: str = "all"  # "all": LoRA on every row (merged at load); "fam": on the FAM rows only (fam_lora.py)
    token_lora_targets: tuple[str, ...] = ()  # with lora_scope "fam": also LoRA on these projections for every row
    fam_length: int = 64  # F
    block_size: int = 1024  # L
    memory_blocks: int = 3  # M
    sink_tokens: int = 4  # S (keep the checkpoint's attention sinks during training)
    # tokens read the FAM, and take the LoRA, only once a block has left the window (FamConfig.fam_after_window);
    # the LoRA then runs unmerged (FamLoRA) for the FAM rows and those tokens
    fam_after_window: bool = False
    rsp_prob: float = 0.8  # Random State Passing probability
    checkpoint_every: int = 100  # steps between training checkpoints (and adapter writes); 0 = only at the end
    resume: str | None = None  # a <stem>.train.pt to continue from
    init_adapter: str | None = None  # an adapter file to start from: its weights, this run's schedule and data
    seed: int = 0
    device: str = "cpu"
    grad_checkpoint: bool = True  # recompute each layer in the backward pass (memory per layer, ~1.3x compute)
    max_seconds: float | None = None  # time budget: stop when spent; the LR schedule is fitted to it (see train)
    precision: str = "float32"  # "bfloat16": autocast the forward pass to bf16 (GPUs; float32 master weights)

    def __post_init__(self) -> None:
        for name in ("steps", "seq_len", "batch_size", "lora_rank", "fam_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.rsp_prob <= 1.0:
            raise ValueError(f"rsp_prob: must be in 0..1, got {self.rsp_prob}")
        if not 0.0 <= self.passkey_fraction <= 1.0:
            raise ValueError(f"passkey_fraction: must be in 0..1, got {self.passkey_fraction}")
        if self.lr <= 0:
            raise ValueError(f"lr: must be positive, got {self.lr}")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ValueError(f"max_seconds: must be positive, got {self.max_seconds}")
        if self.precision not in ("float32", "bfloat16"):
            raise ValueError(f"precision: {self.precision!r} is not one of float32, bfloat16")
        if self.lora_scope not in ("all", "fam"):
            raise ValueError(f"lora_scope: {self.lora_scope!r} is not one of all, fam")
        if self.token_lora_targets and self.lora_scope != "fam":
            raise ValueError("token_lora_targets: adds every-row LoRA to --lora-scope fam; with --lora-scope all "
                             "every row already has LoRA on --lora-targets")
        if self.token_lora_targets and self.fam_after_window:
            raise ValueError("token_lora_targets: fam_after_window takes one kind of LoRA, --lora-scope all "
                             "(the FAM rows and the tokens past the window) or fam (the FAM rows)")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every: must be >= 0, got {self.checkpoint_every}")
        if not self.data and not self.passkey:
            raise ValueError("data: give text files (--data) and/or --passkey")
        if not 0.0 <= self.recall_fraction <= 1.0:
            raise ValueError(f"recall_fraction: must be in 0..1, got {self.recall_fraction}")
        if self.recall_fraction and not self.data:
            raise ValueError("recall_fraction: recall examples are made of text: give --data")
        if not 0.0 <= self.chat_fraction <= 1.0:
            raise ValueError(f"chat_fraction: must be in 0..1, got {self.chat_fraction}")
        if self.fresh_chat and not self.chat_fraction:
            raise ValueError("fresh_chat: starts chat batches from FAM_0; give --chat-data and --chat-fraction")
        if bool(self.chat_fraction) != bool(self.chat_data):
            raise ValueError("chat_fraction: chat batches need both --chat-data and a --chat-fraction above 0")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise ValueError(f"distill_weight: must be in 0..1, got {self.distill_weight}")
        if self.passkey_beyond_window < 0:
            raise ValueError(f"passkey_beyond_window: must be >= 0, got {self.passkey_beyond_window}")
        if self.passkey_answer_anywhere and not self.passkey:
            raise ValueError("passkey_answer_anywhere: places PassKey answers; give --passkey")
        if self.passkey_start_step < 0:
            raise ValueError(f"passkey_start_step: must be >= 0, got {self.passkey_start_step}")
        if self.init_adapter and self.resume:
            raise ValueError("init_adapter: a resumed run takes its weights from its checkpoint; give --resume "
                             "(continue that run) or --init-adapter (start a new run from an adapter), not both")
        if self.passkey_start_step and not (self.data and (self.passkey or self.recall_fraction)):
            raise ValueError("passkey_start_step: a curriculum needs both text (--data) and --passkey or recall")
        _ = self.fam  # FamConfig validates L, M, F, S

    @property
    def fam(self) -> FamConfig:
        return FamConfig(mode="fam", block_size=self.block_size, memory_blocks=self.memory_blocks,
                         fam_length=self.fam_length, sink_tokens=self.sink_tokens,
                         fam_after_window=self.fam_after_window)

    def paths(self) -> tuple[Path, Path, Path]:
        """(adapter, training checkpoint, JSONL log)."""
        out = Path(self.out)
        stem = out.with_suffix("") if out.suffix == ".safetensors" else out
        return out, stem.with_name(stem.name + ".train.pt"), stem.with_name(stem.name + ".log.jsonl")


# Fields a resumed run must share with the checkpoint it resumes (the rest, e.g. steps or lr, may change).
RESUME_FIELDS = ("model", "batch_size", "lora_rank", "lora_alpha", "lora_targets", "lora_scope", "token_lora_targets",
                 "fam_length", "block_size", "memory_blocks", "sink_tokens", "fam_after_window")


@dataclass
class TrainResult:
    adapter_path: Path
    checkpoint_path: Path
    steps: int  # steps done in total
    last_loss: float
    seconds_per_step: float  # mean over this run's steps


def train(cfg: TrainConfig, progress: bool = True) -> TrainResult:
    """Run `famserve train`; returns where the adapter went and how the run went."""
    from famserve.engine.build import load_model
    from famserve.engine.config import EngineConfig

    if cfg.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 weights, TF32 matmuls: the usual mixed-precision trade
        torch.backends.cudnn.allow_tf32 = True
    loaded = load_model(cfg.model, cfg.fam, mode="bswa", engine=EngineConfig(device=cfg.device))
    model, tokenizer = loaded.model, loaded.tokenizer
    if cfg.distill_weight and cfg.seq_len > model.config.max_position_embeddings:
        raise ValueError(f"distill_weight: the teacher reads {cfg.seq_len}-token sequences with full attention, "
                         f"past the {model.config.max_position_embeddings} tokens {loaded.model_id} was trained for")
    fam = cfg.fam
    token_targets = cfg.lora_targets if cfg.lora_scope == "all" and not fam.gates_fam else cfg.token_lora_targets
    if token_targets:  # apply_lora and apply_fam_lora freeze the base weights
        apply_lora(model, token_targets, cfg.lora_rank, cfg.lora_alpha, seed=cfg.seed)
    if cfg.lora_scope == "fam" or fam.gates_fam:
        apply_fam_lora(model, cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha, seed=cfg.seed + 1,
                       after_window=fam.gates_fam and cfg.lora_scope == "all")
    prompt = nn.Parameter(default_fam_prompt(model, fam.fam_length))
    if cfg.init_adapter:
        load_adapter_weights(model, prompt, FamAdapter.load(cfg.init_adapter))
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    params["fam_prompt"] = prompt
    trainer = FamTrainer(model, fam, params, prompt, lr=cfg.lr, total_steps=cfg.steps,
                         warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay, rsp_prob=cfg.rsp_prob,
                         grad_clip=cfg.grad_clip, checkpoint_layers=cfg.grad_checkpoint, seed=cfg.seed,
                         autocast_bf16=cfg.precision == "bfloat16", distill_weight=cfg.distill_weight)
    batches = _batch_source(cfg, tokenizer)
    adapter_path, ckpt_path, log_path = cfg.paths()
    if cfg.resume:
        _resume(cfg, trainer, batches)
    log.info("training %s for FAM: %s, LoRA r=%d on %s of %s rows%s, %d trainable parameters", loaded.model_id,
             fam.describe(), cfg.lora_rank, ",".join(cfg.lora_targets), _lora_rows(cfg, fam),
             f" and {','.join(cfg.token_lora_targets)} of all rows" if cfg.token_lora_targets else "",
             sum(p.numel() for p in params.values()))

    def save() -> None:
        _atomic_save(lambda path: export_adapter(model, prompt, loaded.model_id, fam).save(path), adapter_path)
        state = {"config": _config_dict(cfg), "trainer": trainer.state_dict(), "data": batches.state_dict(),
                 "fingerprint": model.config.fingerprint()}
        _atomic_save(lambda path: torch.save(state, path), ckpt_path)

    first_step, seconds, last = trainer.step_count, 0.0, None
    with _Progress(progress, total=cfg.steps, done=first_step) as bar, open(log_path, "a") as log_file:
        while trainer.step_count < trainer.total_steps:
            tokens, labels = batches.next_batch(trainer.step_count)
            last = trainer.train_step(tokens, labels, carry_fam=not (cfg.fresh_chat and batches.last_kind == "chat"))
            seconds += last.seconds
            if cfg.max_seconds is not None:
                _fit_schedule(trainer, cfg, seconds, trainer.step_count - first_step, last.seconds)
            record = {"step": trainer.step_count, "data": batches.last_kind, "loss": round(last.loss, 5),
                      "accuracy": round(last.accuracy, 4), "lr": trainer.lr, "seconds": round(last.seconds, 3)}
            if last.kl is not None:
                record.update(cross_entropy=round(last.cross_entropy, 5), kl=round(last.kl, 5))
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
            bar.update(last, trainer.lr)
            if cfg.checkpoint_every and trainer.step_count % cfg.checkpoint_every == 0:
                save()
    save()
    done = trainer.step_count - first_step
    return TrainResult(adapter_path, ckpt_path, trainer.step_count, last.loss if last else float("nan"),
                       seconds / done if done else 0.0)


TIMING_STEPS = 10  # steps timed before a time budget fixes the run's length


def _fit_schedule(trainer: FamTrainer, cfg: TrainConfig, seconds: float, done: int, last_seconds: float) -> None:
    """With a time budget: from TIMING_STEPS steps on, fit the run's length (and so its LR decay) to the steps that
    fit in what is left, at the mean pace of the steps after the first (which carries one-off warm-up costs); stop
    when the budget is spent. Refitted after every step, because on a shared machine the pace drifts: a length
    fixed once from the first steps left a run whose steps slowed 2-3x at 0.6x its peak LR when time ran out."""
    if done == 1:
        trainer._first_step_seconds = last_seconds
    if seconds >= cfg.max_seconds:
        trainer.total_steps = trainer.step_count
    elif done >= TIMING_STEPS:
        per_step = (seconds - trainer._first_step_seconds) / (done - 1)
        fit = trainer.step_count + int((cfg.max_seconds - seconds) / per_step)
        trainer.total_steps = max(trainer.step_count, min(cfg.steps, fit))
        if done == TIMING_STEPS:
            log.info("time budget %.0f s: about %d steps in all (%.2f s/step; refitted as the pace changes)",
                     cfg.max_seconds, trainer.total_steps, per_step)


def _batch_source(cfg: TrainConfig, tokenizer):
    from famserve.engine.training.data import (BatchSource, ChatExamples, PassKeyExamples, RecallExamples,
                                               TextWindows, iter_text_tokens, load_conversations)
    from famserve.engine.training.passkey import TextPassKey

    ids = [t for piece in iter_text_tokens(cfg.data, tokenizer) for t in piece] if cfg.data else []
    text = TextWindows(ids, cfg.seq_len) if ids else None
    passkey = PassKeyExamples(TextPassKey(tokenizer, ids or None), cfg.seq_len, cfg.block_size, cfg.memory_blocks,
                              cfg.passkey_beyond_window, cfg.passkey_answer_anywhere) if cfg.passkey else None
    recall = (RecallExamples(text, cfg.seq_len, cfg.block_size, cfg.memory_blocks, cfg.sink_tokens)
              if cfg.recall_fraction else None)
    chat = ChatExamples(tokenizer, load_conversations(cfg.chat_data), cfg.seq_len) if cfg.chat_data else None
    return BatchSource(cfg.batch_size, text, passkey, cfg.passkey_fraction, cfg.seed, cfg.passkey_start_step,
                       recall, cfg.recall_fraction, chat, cfg.chat_fraction)


def _lora_rows(cfg: TrainConfig, fam: FamConfig) -> str:
    """Which rows the LoRA of --lora-targets reaches, as the start-up log says it."""
    if cfg.lora_scope == "fam":
        return "the FAM"
    return "the FAM and the past-the-window token" if fam.gates_fam else "all"


def _config_dict(cfg: TrainConfig) -> dict:
    d = asdict(cfg)
    d["data"], d["lora_targets"] = list(cfg.data), list(cfg.lora_targets)
    d["token_lora_targets"] = list(cfg.token_lora_targets)
    return d


def _resume(cfg: TrainConfig, trainer: FamTrainer, batches) -> None:
    path = Path(cfg.resume)
    if not path.is_file():
        raise ValueError(f"resume: {path}: no such training checkpoint")
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved, current = state["config"], _config_dict(cfg)
    defaults = _config_dict(TrainConfig(passkey=True))  # what a checkpoint from before a field existed ran with
    changed = [name for name in RESUME_FIELDS if saved.get(name, defaults[name]) != current[name]]
    if changed or state.get("fingerprint") != trainer.model.config.fingerprint():
        raise ValueError(f"resume: {path} was trained with different {', '.join(changed) or 'model weights'}: "
                         + ", ".join(f"{n}={saved.get(n)!r}" for n in changed))
    trainer.load_state_dict(state["trainer"])
    batches.load_state_dict(state["data"])
    log.info("resumed %s at step %d", path, trainer.step_count)


def _atomic_save(write, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)


class _Progress:
    """A rich progress bar with loss, accuracy and speed; silent when disabled."""

    def __init__(self, enabled: bool, total: int, done: int):
        self.enabled, self.total, self.done = enabled, total, done

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                TextColumn("{task.fields[stats]}"), console=Console(stderr=True))
            self.bar.__enter__()
            self.task = self.bar.add_task("train", total=self.total, completed=self.done, stats="")
        return self

    def update(self, step: StepResult, lr: float) -> None:
        if self.enabled:
            stats = (f"loss {step.loss:.3f} acc {step.accuracy:.2f} lr {lr:.1e} "
                     f"{step.num_tokens / step.seconds:.0f} tok/s")
            self.bar.update(self.task, advance=1, stats=stats)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.bar.__exit__(*exc)

