"""`famserve train` end to end on the tiny model (engine/training/trainer.py): it writes an adapter the engine
loads in FAM mode, a checkpoint and a log; an interrupted run resumed from its checkpoint ends exactly where an
uninterrupted one does (also with a text-then-PassKey curriculum); Random State Passing carries the FAM with the
configured probability."""

import json

import pytest
import torch

from famserve.engine.adapter import FamAdapter
from famserve.engine.build import ADAPTER_SHAPE, load_model, requested_fam
from famserve.engine.config import FamConfig
from famserve.engine.runner import ModelRunner
from famserve.engine.training import trainer as trainer_module
from famserve.engine.training.data import BatchSource, PassKeyExamples, TextWindows
from famserve.engine.training.lora import apply_lora, lora_modules
from famserve.engine.training.passkey import TextPassKey
from famserve.engine.training.sequence import default_fam_prompt, forward_sequence
from famserve.engine.training.trainer import FamTrainer, TrainConfig, train


TEXT = ("Feedback attention memory lets a transformer read long contexts. The quick brown fox jumps over the lazy "
        "dog. Hello world! The capital of France is Paris.\n") * 20


def config(tiny_llama_dir, tmp_path, **overrides) -> TrainConfig:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "corpus.txt"
    data.write_text(TEXT)
    base = dict(model=str(tiny_llama_dir), out=str(tmp_path / "adapter.safetensors"), data=(str(data),),
                passkey=True, steps=4, seq_len=200, batch_size=2, lr=1e-3, warmup_steps=1, lora_rank=2,
                lora_alpha=4.0, fam_length=4, block_size=16, memory_blocks=1, sink_tokens=2, checkpoint_every=2)
    return TrainConfig(**{**base, **overrides})


def interrupt_at_step_3(cfg: TrainConfig, monkeypatch) -> None:
    """Run cfg until its third step raises KeyboardInterrupt (as Ctrl-C would), leaving its step-2 checkpoint."""
    real_step, calls = FamTrainer.train_step, []

    def dies_at_step_3(self, tokens, labels, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(self, tokens, labels, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(trainer_module.FamTrainer, "train_step", dies_at_step_3)
        with pytest.raises(KeyboardInterrupt):
            train(cfg, progress=False)


def test_train_writes_an_adapter_the_engine_serves(tiny_llama_dir, tmp_path):
    cfg = config(tiny_llama_dir, tmp_path)
    result = train(cfg, progress=False)
    assert result.steps == 4 and result.adapter_path.is_file() and result.checkpoint_path.is_file()
    assert result.checkpoint_path.name == "adapter.train.pt"
    records = [json.loads(line) for line in (tmp_path / "adapter.log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(r["loss"] > 0 for r in records)

    loaded = load_model(tiny_llama_dir, FamConfig(block_size=16, memory_blocks=1, sink_tokens=2),
                        adapter_path=result.adapter_path)
    assert loaded.model.fam_config.describe() == "fam (L=16 M=1 F=4 S=2)"
    logits = ModelRunner(loaded.model).run([loaded.model.new_state()], [list(range(40))])[0]
    assert torch.isfinite(logits).all()


def test_interrupted_run_resumes_to_the_same_adapter(tiny_llama_dir, tmp_path, monkeypatch):
    whole = train(config(tiny_llama_dir, tmp_path / "whole"), progress=False)

    cfg = config(tiny_llama_dir, tmp_path / "cut")
    interrupt_at_step_3(cfg, monkeypatch)  # checkpointed after step 2
    resumed = train(TrainConfig(**{**cfg.__dict__, "resume": str(cfg.paths()[1])}), progress=False)

    assert resumed.steps == 4
    want = torch.load(whole.checkpoint_path, weights_only=True)["trainer"]["params"]
    got = torch.load(resumed.checkpoint_path, weights_only=True)["trainer"]["params"]
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0)


def test_curriculum_is_text_only_before_its_start_step(tiny_llama_dir):
    """With passkey_start_step=N the first N batches are exactly a text-only run's (same seed); after it, PassKey
    batches come at passkey_fraction (1.0 here: all of them)."""
    tokenizer = load_model(tiny_llama_dir, FamConfig(block_size=16), mode="bswa").tokenizer
    ids = tokenizer.encode(TEXT)
    text, passkey = TextWindows(ids, 200), PassKeyExamples(TextPassKey(tokenizer, ids), 200)
    curriculum = BatchSource(2, text, passkey, passkey_fraction=1.0, seed=3, passkey_start_step=3)
    text_only = BatchSource(2, text, None, passkey_fraction=1.0, seed=3)
    kinds = []
    for step in range(6):
        tokens, labels = curriculum.next_batch(step)
        kinds.append(curriculum.last_kind)
        if step < 3:
            want_tokens, want_labels = text_only.next_batch(step)
            assert torch.equal(tokens, want_tokens) and torch.equal(labels, want_labels)
        else:
            assert (labels != -100).sum() < labels.numel() // 4  # PassKey: loss on the key only
    assert kinds == ["text"] * 3 + ["passkey"] * 3
    with pytest.raises(ValueError, match="passkey_start_step: a curriculum needs both"):
        BatchSource(2, text, None, passkey_fraction=0.5, seed=3, passkey_start_step=3)


def test_interrupted_curriculum_run_resumes_to_the_same_adapter(tiny_llama_dir, tmp_path, monkeypatch):
    """Cut after the step-2 checkpoint of a run whose PassKey batches start at step 3: the resumed run takes the
    step count from its checkpoint, so it switches to PassKey at the same step and ends with the same weights."""
    overrides = dict(passkey_start_step=3, passkey_fraction=1.0)
    whole = train(config(tiny_llama_dir, tmp_path / "whole", **overrides), progress=False)
    whole_log = [json.loads(line) for line in (tmp_path / "whole" / "adapter.log.jsonl").read_text().splitlines()]
    assert [r["data"] for r in whole_log] == ["text", "text", "text", "passkey"]

    cfg = config(tiny_llama_dir, tmp_path / "cut", **overrides)
    interrupt_at_step_3(cfg, monkeypatch)
    train(TrainConfig(**{**cfg.__dict__, "resume": str(cfg.paths()[1])}), progress=False)

    cut_log = [json.loads(line) for line in (tmp_path / "cut" / "adapter.log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["data"], r["loss"]) for r in cut_log] == [(r["step"], r["data"], r["loss"])
                                                                     for r in whole_log]
    want = torch.load(whole.checkpoint_path, weights_only=True)["trainer"]["params"]
    got = torch.load(cfg.paths()[1], weights_only=True)["trainer"]["params"]
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0)


def test_resume_with_another_attention_config_is_refused(tiny_llama_dir, tmp_path):
    cfg = config(tiny_llama_dir, tmp_path, steps=1)
    train(cfg, progress=False)
    other = TrainConfig(**{**cfg.__dict__, "block_size": 32, "resume": str(cfg.paths()[1]), "steps": 2})
    with pytest.raises(ValueError, match="was trained with different block_size: block_size=16"):
        train(other, progress=False)


@pytest.mark.parametrize("rsp_prob,expect_carried", [(0.0, 0), (1.0, 3)])
def test_random_state_passing_probability(tiny_llama_dir, rsp_prob, expect_carried):
    fam = FamConfig(mode="fam", block_size=8, memory_blocks=1, fam_length=2, sink_tokens=1)
    model = load_model(tiny_llama_dir, fam, mode="bswa").model
    apply_lora(model, ["q_proj"], rank=2, alpha=2)
    prompt = torch.nn.Parameter(default_fam_prompt(model, 2))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad} | {"fam_prompt": prompt}
    trainer = FamTrainer(model, fam, params, prompt, lr=1e-3, total_steps=2, rsp_prob=rsp_prob)
    tokens = torch.randint(0, 320, (3, 20), generator=torch.Generator().manual_seed(0))
    trainer.train_step(tokens, tokens)
    assert trainer.carried.shape == (2, 3, 2, 64)  # (N, B, F, C), detached
    assert not trainer.carried.requires_grad
    _, fresh = trainer.start_fam(3)
    assert int((~fresh).sum()) == expect_carried


def test_bad_config_names_the_field(tiny_llama_dir, tmp_path):
    with pytest.raises(ValueError, match="rsp_prob: must be in 0..1, got 1.5"):
        config(tiny_llama_dir, tmp_path, rsp_prob=1.5)
    with pytest.raises(ValueError, match="data: give text files"):
        config(tiny_llama_dir, tmp_path, data=(), passkey=False)
    with pytest.raises(ValueError, match="sink_tokens: must be in 0..block_size"):
        config(tiny_llama_dir, tmp_path, sink_tokens=40)
    with pytest.raises(ValueError, match="passkey_start_step: must be >= 0, got -1"):
        config(tiny_llama_dir, tmp_path, passkey_start_step=-1)
    with pytest.raises(ValueError, match="passkey_start_step: a curriculum needs both text"):
        config(tiny_llama_dir, tmp_path, passkey_start_step=5, data=())
    with pytest.raises(ValueError, match="recall_fraction: recall examples are made of text"):
        config(tiny_llama_dir, tmp_path, recall_fraction=0.5, data=())
    with pytest.raises(ValueError, match="recall_fraction: must be in 0..1, got 1.5"):
        config(tiny_llama_dir, tmp_path, recall_fraction=1.5)
    with pytest.raises(ValueError, match="passkey_beyond_window: must be >= 0, got -2"):
        config(tiny_llama_dir, tmp_path, passkey_beyond_window=-2)
    with pytest.raises(ValueError, match="chat_fraction: chat batches need both --chat-data and a --chat-fraction"):
        config(tiny_llama_dir, tmp_path, chat_fraction=0.3)
    with pytest.raises(ValueError, match="passkey_answer_anywhere: places PassKey answers; give --passkey"):
        config(tiny_llama_dir, tmp_path, passkey_answer_anywhere=True, passkey=False)
    with pytest.raises(ValueError, match="seq_len: 200 tokens leave no room for a key 9 blocks beyond the window"):
        train(config(tiny_llama_dir, tmp_path, passkey_beyond_window=9), progress=False)  # refused before step 1


def test_time_budget_stops_the_run_and_fits_the_schedule(tiny_llama_dir, tmp_path, monkeypatch):
    real_step = FamTrainer.train_step

    def one_second_steps(self, tokens, labels, **kwargs):  # a fixed step time, so the fitted length is exact
        result = real_step(self, tokens, labels, **kwargs)
        result.seconds = 1.0
        return result

    monkeypatch.setattr(trainer_module.FamTrainer, "train_step", one_second_steps)
    result = train(config(tiny_llama_dir, tmp_path, steps=1000, max_seconds=15.0, checkpoint_every=0),
                   progress=False)
    assert result.steps == 15  # 10 timed steps, then the 5 that fit; far fewer than the 1000 asked for
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "adapter.log.jsonl").read_text().splitlines()]
    assert lrs[-1] == pytest.approx(1e-3 * 0.1)  # the cosine decay ran to its end within the budget


def test_time_budget_refits_the_schedule_when_steps_slow_down(tiny_llama_dir, tmp_path, monkeypatch):
    """Steps of 1 s, then of 3 s from the 11th (the machine got busy): fixed once after 10 steps, the run would
    plan 40 steps and stop at step 20 halfway through its decay; refitted, the decay ends with the budget."""
    real_step, calls = FamTrainer.train_step, []

    def slowing_steps(self, tokens, labels, **kwargs):
        result = real_step(self, tokens, labels, **kwargs)
        calls.append(1)
        result.seconds = 1.0 if len(calls) <= 10 else 3.0
        return result

    monkeypatch.setattr(trainer_module.FamTrainer, "train_step", slowing_steps)
    result = train(config(tiny_llama_dir, tmp_path, steps=1000, max_seconds=40.0, checkpoint_every=0),
                   progress=False)
    assert result.steps == 20  # 10 s for the first 10 steps, 30 s for the next 10: the budget is spent
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "adapter.log.jsonl").read_text().splitlines()]
    assert lrs[-1] <= 1e-3 * 0.25  # near the end of the decay (1e-3 * 0.1), not at its middle


def test_adapter_used_away_from_its_training_shape_warns(tiny_llama_dir, tmp_path, caplog):
    result = train(config(tiny_llama_dir, tmp_path, steps=1), progress=False)
    with caplog.at_level("WARNING", logger="famserve.engine.build"):
        load_model(tiny_llama_dir, FamConfig(block_size=16, memory_blocks=1, sink_tokens=2),
                   adapter_path=result.adapter_path)
    assert not [r for r in caplog.records if "trained with" in r.message]
    with caplog.at_level("WARNING", logger="famserve.engine.build"):
        load_model(tiny_llama_dir, FamConfig(block_size=32, memory_blocks=1, sink_tokens=2),
                   adapter_path=result.adapter_path)
    assert any("trained with L=16 M=1 S=2, running with L=32 M=1 S=2" in r.getMessage() for r in caplog.records)


def test_adapter_brings_its_training_shape_where_the_user_gave_none(tiny_llama_dir, tmp_path, caplog):
    result = train(config(tiny_llama_dir, tmp_path, steps=1), progress=False)  # L=16 M=1 S=2 F=4
    fam, unset = requested_fam(fam_length=64)
    assert (fam.block_size, fam.memory_blocks, fam.sink_tokens) == (1024, 3, 4) and unset == set(ADAPTER_SHAPE)
    with caplog.at_level("WARNING", logger="famserve.engine.build"):
        loaded = load_model(tiny_llama_dir, fam, adapter_path=result.adapter_path, shape_from_adapter=unset)
    assert loaded.model.fam_config.describe() == "fam (L=16 M=1 F=4 S=2)"
    assert not [r for r in caplog.records if "trained with" in r.message]
    assert load_model(tiny_llama_dir, fam, shape_from_adapter=unset).model.fam_config.describe() == \
        "bswa (L=1024 M=3 S=4)"  # no adapter: the defaults
    fam, unset = requested_fam(block_size=32, fam_length=64)  # L given: kept, with the warning; M and S: the adapter's
    with caplog.at_level("WARNING", logger="famserve.engine.build"):
        loaded = load_model(tiny_llama_dir, fam, adapter_path=result.adapter_path, shape_from_adapter=unset)
    assert loaded.model.fam_config.describe() == "fam (L=32 M=1 F=4 S=2)"
    assert any("trained with L=16 M=1 S=2, running with L=32 M=1 S=2" in r.getMessage() for r in caplog.records)


def test_bf16_autocast_trains_close_to_float32(tiny_llama_dir, tmp_path):
    """--precision bfloat16 (meant for GPUs; autocast works on the CPU too): the same first-step loss within bf16's
    precision, finite losses after, and float32 trainable tensors in the adapter."""
    runs = {p: train(config(tiny_llama_dir, tmp_path / p, steps=3, precision=p), progress=False)
            for p in ("float32", "bfloat16")}
    logs = {p: [json.loads(line)["loss"] for line in (tmp_path / p / "adapter.log.jsonl").read_text().splitlines()]
            for p in runs}
    assert logs["bfloat16"][0] == pytest.approx(logs["float32"][0], rel=0.03)
    # autocast did run in bf16 (the log rounds to 5 decimals, and on this near-uniform tiny model bf16 moves the
    # loss by ~1e-5: one step may round alike, the run does not)
    assert logs["bfloat16"] != logs["float32"]
    assert all(loss == loss and loss < 20 for loss in logs["bfloat16"])
    adapter = torch.load(runs["bfloat16"].checkpoint_path, weights_only=True)["trainer"]["params"]
    assert all(t.dtype == torch.float32 for t in adapter.values())


def test_recall_batches_train_and_are_logged(tiny_llama_dir, tmp_path):
    cfg = config(tiny_llama_dir, tmp_path, passkey=False, recall_fraction=0.5, steps=6, checkpoint_every=0)
    result = train(cfg, progress=False)
    log = [json.loads(line) for line in cfg.paths()[2].read_text().splitlines()]
    assert result.steps == 6 and {r["data"] for r in log} == {"text", "recall"}
    assert all(r["loss"] > 0 for r in log)


def test_chat_batches_train_and_are_logged(tiny_llama_dir, tmp_path):
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hello there"},
                                             {"role": "assistant", "content": "hi, how are you"}]}) + "\n")
    cfg = config(tiny_llama_dir, tmp_path, passkey=False, chat_data=str(chat), chat_fraction=0.5, steps=6,
                 checkpoint_every=0)
    result = train(cfg, progress=False)
    log = [json.loads(line) for line in cfg.paths()[2].read_text().splitlines()]
    assert result.steps == 6 and {r["data"] for r in log} == {"text", "chat"}
    assert all(r["loss"] > 0 for r in log)


def test_fresh_chat_starts_chat_batches_from_fam0_and_others_from_the_carry(tiny_llama_dir, tmp_path, monkeypatch):
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hello there"},
                                             {"role": "assistant", "content": "hi, how are you"}]}) + "\n")
    cfg = config(tiny_llama_dir, tmp_path, passkey=False, chat_data=str(chat), chat_fraction=0.5, fresh_chat=True,
                 rsp_prob=1.0, steps=8, checkpoint_every=0)
    real_start, starts = FamTrainer.start_fam, []

    def recording_start(self, batch, carry=True):
        start, fresh = real_start(self, batch, carry)
        starts.append((self.carried is not None, bool(fresh.all()), bool((~fresh).all())))
        return start, fresh

    monkeypatch.setattr(trainer_module.FamTrainer, "start_fam", recording_start)
    train(cfg, progress=False)
    kinds = [json.loads(line)["data"] for line in cfg.paths()[2].read_text().splitlines()]
    assert {"text", "chat"} <= set(kinds[1:])
    for kind, (had_carry, all_fresh, all_carried) in list(zip(kinds, starts))[1:]:  # step 1 has nothing to carry
        assert had_carry
        assert all_fresh if kind == "chat" else all_carried, kind  # rsp_prob 1: every other row carries


def test_fresh_chat_needs_chat_batches(tiny_llama_dir, tmp_path):
    with pytest.raises(ValueError, match="fresh_chat"):
        config(tiny_llama_dir, tmp_path, fresh_chat=True)


def _distilling_trainer(tiny_llama_dir, distill_weight: float, lr: float = 1e-3):
    fam = FamConfig(mode="fam", block_size=8, memory_blocks=1, fam_length=2, sink_tokens=1)
    model = load_model(tiny_llama_dir, fam, mode="bswa").model
    apply_lora(model, ["q_proj", "v_proj", "down_proj"], rank=2, alpha=2)
    prompt = torch.nn.Parameter(default_fam_prompt(model, 2))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad} | {"fam_prompt": prompt}
    trainer = FamTrainer(model, fam, params, prompt, lr=lr, total_steps=50, warmup_steps=0, rsp_prob=0.0,
                         schedule="constant", distill_weight=distill_weight)
    return trainer, model


def test_distillation_teacher_is_the_base_model_with_full_attention(tiny_llama_dir):
    trainer, model = _distilling_trainer(tiny_llama_dir, 0.5, lr=1e-2)
    tokens = torch.randint(0, 320, (2, 30), generator=torch.Generator().manual_seed(0))
    for _ in range(3):  # LoRA's B leaves zero: the wrapped model no longer computes the base model
        step = trainer.train_step(tokens, tokens)
    assert step.kl is not None and step.kl > 0 and step.loss == pytest.approx(0.5 * step.cross_entropy + 0.5 * step.kl)
    base = load_model(tiny_llama_dir, FamConfig(mode="full"), mode="full").model
    want = forward_sequence(base, FamConfig(mode="full"), tokens).hidden
    torch.testing.assert_close(trainer.teacher_hidden(tokens), want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        adapted = forward_sequence(model, FamConfig(mode="full"), tokens).hidden
    assert (adapted - want).abs().max() > 1e-3  # so the equality above needed LoRA switched off
    assert all(m.enabled for m in lora_modules(model).values())  # and it is on again


def test_distillation_pulls_the_model_toward_the_teacher(tiny_llama_dir):
    trainer, _ = _distilling_trainer(tiny_llama_dir, 1.0, lr=1e-2)
    tokens = torch.randint(0, 320, (2, 30), generator=torch.Generator().manual_seed(1))
    kls = [trainer.train_step(tokens, tokens).kl for _ in range(12)]
    assert kls[-1] < 0.5 * kls[0], kls  # an untrained FAM starts far from the base model's full attention


def test_distillation_is_logged_and_checked(tiny_llama_dir, tmp_path):
    cfg = config(tiny_llama_dir, tmp_path, distill_weight=0.5, steps=2, checkpoint_every=0)
    train(cfg, progress=False)
    log = [json.loads(line) for line in cfg.paths()[2].read_text().splitlines()]
    assert all(r["kl"] > 0 and r["cross_entropy"] > 0 for r in log)
    assert all(r["loss"] == pytest.approx(0.5 * r["cross_entropy"] + 0.5 * r["kl"], abs=1e-4) for r in log)
    with pytest.raises(ValueError, match="distill_weight: must be in 0..1, got -0.1"):
        config(tiny_llama_dir, tmp_path, distill_weight=-0.1)
    with pytest.raises(ValueError, match="distill_weight: the teacher reads 4096-token sequences with full attention"):
        train(config(tiny_llama_dir, tmp_path, distill_weight=0.5, seq_len=4096), progress=False)


def test_init_adapter_starts_a_new_run_from_an_adapters_weights(tiny_llama_dir, tmp_path):
    """--init-adapter: a new run (its own step count, schedule and log, here at another L) whose first step starts
    from the adapter's FAM prompt and LoRA; at a vanishing LR its adapter is the one it started from."""
    first = train(config(tiny_llama_dir, tmp_path / "first", steps=3), progress=False)
    cfg = config(tiny_llama_dir, tmp_path / "second", steps=1, lr=1e-12, block_size=32,
                 init_adapter=str(first.adapter_path))
    second = train(cfg, progress=False)
    assert second.steps == 1 and [json.loads(line)["step"] for line in cfg.paths()[2].read_text().splitlines()] == [1]

    start, end = FamAdapter.load(first.adapter_path), FamAdapter.load(second.adapter_path)
    assert (start.block_size, end.block_size) == (16, 32)
    torch.testing.assert_close(end.fam_prompt, start.fam_prompt, atol=1e-9, rtol=0)
    assert set(end.lora) == set(start.lora)
    assert any(b.abs().max() > 1e-4 for _, b in start.lora.values())  # trained, not LoRA's zero start
    for name, (a, b) in start.lora.items():
        torch.testing.assert_close(end.lora[name][0], a, atol=1e-9, rtol=0)
        torch.testing.assert_close(end.lora[name][1], b, atol=1e-9, rtol=0)


def test_init_adapter_of_another_shape_is_refused(tiny_llama_dir, tmp_path):
    first = train(config(tiny_llama_dir, tmp_path / "first", steps=1), progress=False)
    init = str(first.adapter_path)
    with pytest.raises(ValueError, match="has LoRA rank 2 on model.layers.0.mlp.down_proj, this run rank 4"):
        train(config(tiny_llama_dir, tmp_path / "rank", lora_rank=4, init_adapter=init), progress=False)
    with pytest.raises(ValueError, match="has LoRA scale alpha/rank 2, this run 1 "):
        train(config(tiny_llama_dir, tmp_path / "alpha", lora_alpha=2.0, init_adapter=init), progress=False)
    with pytest.raises(ValueError, match="has LoRA on 14 modules, this run wraps 4"):
        train(config(tiny_llama_dir, tmp_path / "targets", lora_targets=("q_proj", "v_proj"), init_adapter=init),
              progress=False)
    with pytest.raises(ValueError, match="has F=4 FAM rows, this run F=8"):
        train(config(tiny_llama_dir, tmp_path / "fam", fam_length=8, init_adapter=init), progress=False)
    with pytest.raises(ValueError, match="init_adapter: a resumed run takes its weights from its checkpoint"):
        config(tiny_llama_dir, tmp_path, init_adapter=init, resume=str(first.checkpoint_path))


def test_fam_row_lora_scope_trains_resumes_and_is_kept_apart(tiny_llama_dir, tmp_path, monkeypatch):
    """--lora-scope fam: the adapter holds FAM-row LoRA only (trained: B moved off zero), an interrupted run resumes
    to the same weights, and a run or adapter of the other scope is refused by name."""
    whole = train(config(tiny_llama_dir, tmp_path / "whole", lora_scope="fam"), progress=False)
    adapter = FamAdapter.load(whole.adapter_path)
    assert adapter.lora == {} and len(adapter.fam_lora) == 14
    assert any(b.abs().max() > 1e-4 for _, b in adapter.fam_lora.values())

    cfg = config(tiny_llama_dir, tmp_path / "cut", lora_scope="fam")
    interrupt_at_step_3(cfg, monkeypatch)
    resumed = train(TrainConfig(**{**cfg.__dict__, "resume": str(cfg.paths()[1])}), progress=False)
    want = torch.load(whole.checkpoint_path, weights_only=True)["trainer"]["params"]
    got = torch.load(resumed.checkpoint_path, weights_only=True)["trainer"]["params"]
    assert set(got) == set(want) and any(name.startswith("fam_lora.") for name in want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0)

    with pytest.raises(ValueError, match="different lora_scope: lora_scope='fam'"):
        train(TrainConfig(**{**cfg.__dict__, "lora_scope": "all", "resume": str(cfg.paths()[1]), "steps": 5}),
              progress=False)
    with pytest.raises(ValueError, match="has FAM-row LoRA, this run every-row \\(--lora-scope\\)"):
        train(config(tiny_llama_dir, tmp_path / "other", init_adapter=str(whole.adapter_path)), progress=False)
    with pytest.raises(ValueError, match="lora_scope: 'tokens' is not one of all, fam"):
        config(tiny_llama_dir, tmp_path, lora_scope="tokens")


def test_token_lora_targets_grow_a_fam_row_adapter(tiny_llama_dir, tmp_path):
    """--token-lora-targets q_proj with --lora-scope fam: a run from a FAM-row adapter (--init-adapter) keeps its
    FAM-row LoRA and prompt and adds every-row LoRA on q_proj, which the engine merges at load."""
    first = train(config(tiny_llama_dir, tmp_path / "first", lora_scope="fam", steps=2), progress=False)
    cfg = config(tiny_llama_dir, tmp_path / "second", lora_scope="fam", token_lora_targets=("q_proj",), steps=2,
                 init_adapter=str(first.adapter_path))
    second = FamAdapter.load(train(cfg, progress=False).adapter_path)
    assert sorted(second.lora) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert any(b.abs().max() > 1e-5 for _, b in second.lora.values())
    assert set(second.fam_lora) == set(FamAdapter.load(first.adapter_path).fam_lora)
    loaded = load_model(tiny_llama_dir, FamConfig(block_size=16, memory_blocks=1, sink_tokens=2),
                        adapter_path=tmp_path / "second" / "adapter.safetensors")
    assert loaded.model.fam_lora is not None
    with pytest.raises(ValueError, match="token_lora_targets: adds every-row LoRA to --lora-scope fam"):
        config(tiny_llama_dir, tmp_path, token_lora_targets=("q_proj",))


def test_fam_after_window_run_starts_from_an_every_row_adapter_and_serves_as_trained(tiny_llama_dir, tmp_path):
    """--fam-after-window with --lora-scope all: a run from an ordinary adapter (--init-adapter, its every-row LoRA
    now kept unmerged) trains the deltas (B moves), saves them as every-row LoRA marked fam_after_window, and the
    engine, told nothing, loads the adapter that way and computes what the trained model computes; a fresh
    stream's first M+1 blocks are the base model's BSWA exactly."""
    first = train(config(tiny_llama_dir, tmp_path / "first", steps=2), progress=False)
    cfg = config(tiny_llama_dir, tmp_path / "late", steps=3, fam_after_window=True,
                 init_adapter=str(first.adapter_path))
    late = FamAdapter.load(train(cfg, progress=False).adapter_path)
    start = FamAdapter.load(first.adapter_path)
    assert late.fam_after_window and late.fam_lora == {} and set(late.lora) == set(start.lora)
    assert any((late.lora[n][1] - b).abs().max() > 1e-5 for n, (_, b) in start.lora.items())

    fam, unset = requested_fam(fam_length=4)
    served = load_model(tiny_llama_dir, fam, adapter_path=cfg.paths()[0], shape_from_adapter=unset).model
    assert served.fam_config.describe() == "fam (L=16 M=1 F=4 S=2; FAM read after the window)"
    tokens = torch.randint(0, 300, (1, 70), generator=torch.Generator().manual_seed(3))
    got = ModelRunner(served).run([served.new_state()], [tokens[0]], all_logits=True)[0]
    want = served.logits(forward_sequence(served, served.fam_config, tokens, fam_prompt=late.fam_prompt).hidden[0])
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    base = load_model(tiny_llama_dir, FamConfig(mode="bswa", block_size=16, memory_blocks=1, sink_tokens=2)).model
    bswa = ModelRunner(base).run([base.new_state()], [tokens[0]], all_logits=True)[0]
    torch.testing.assert_close(got[:32], bswa[:32], atol=2e-5, rtol=0)
    assert (got[32:] - bswa[32:]).abs().max() > 1e-3

    with pytest.raises(ValueError, match="token_lora_targets: fam_after_window takes one kind of LoRA"):
        config(tiny_llama_dir, tmp_path, lora_scope="fam", token_lora_targets=("q_proj",), fam_after_window=True)
    fam_rows = train(config(tiny_llama_dir, tmp_path / "rows", steps=1, lora_scope="fam"), progress=False)
    with pytest.raises(ValueError, match="has FAM-row LoRA; a --fam-after-window run with --lora-scope all"):
        train(config(tiny_llama_dir, tmp_path / "bad", fam_after_window=True, init_adapter=str(fam_rows.adapter_path)),
              progress=False)
