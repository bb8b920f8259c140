"""ModelRunner: feeds token streams of any length through FamModel in block-bounded pieces (FamModel completes a
block in the step that fills it), so prefill of an unbounded input needs memory for one block only and a batch of
streams with different partial-block offsets advances in one call."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from .config import default_prefill_tokens
from .cuda_graphs import StepGraphs
from .model import FamModel, StepPiece
from .state import FamState


def _as_tensor(ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    if isinstance(ids, torch.Tensor):
        return ids.to(torch.int64).flatten()
    return torch.tensor(list(ids), dtype=torch.int64)


class ModelRunner:
    def __init__(self, model: FamModel, max_step_tokens: int | None = None, whole_blocks: bool | None = None,
                 cuda_graphs: bool | None = None):
        self.model = model
        on_gpu = model.device.type == "cuda"
        # Most tokens of one stream in one call of the model (None: the engine's default step budget for the device).
        self.max_step_tokens = max_step_tokens or default_prefill_tokens(model.device.type)
        # Several BSWA blocks of one stream in one pass (FamModel.prefill_blocks): fewer, larger steps, but more
        # attention arithmetic, so by default only where a step costs its kernel launches rather than its FLOPs.
        self.whole_blocks = on_gpu if whole_blocks is None else whole_blocks
        # Decode steps and whole blocks replayed from CUDA graphs (cuda_graphs.py); CUDA only.
        use_graphs = on_gpu if cuda_graphs is None else cuda_graphs and on_gpu
        self.graphs = StepGraphs(model) if use_graphs else None

    @property
    def block_size(self) -> int:
        return self.model.layout.block_size

    @torch.no_grad()
    def run(self, states: Sequence[FamState], token_ids: Sequence[Sequence[int] | torch.Tensor],
            all_logits: bool = False) -> list[torch.Tensor]:
        """Advance each state by its tokens (lengths may differ; each >= 1). Returns per stream the logits of its
        last token (1, V), or of all its tokens (T, V) if all_logits."""
        pending = [_as_tensor(t) for t in token_ids]
        if any(t.numel() == 0 for t in pending):
            raise ValueError("every stream needs at least one token")
        if self.graphs is not None and all(p.numel() == 1 for p in pending):
            logits = self.graphs.decode(states, [int(p) for p in pending])
            if logits is not None:
                return list(logits[:, None])
        done = [0] * len(states)
        results: list[list[torch.Tensor]] = [[] for _ in states]
        while True:
            if len(states) == 1 and self._reads_whole_blocks(states[0], pending[0].numel() - done[0]):
                n = min(pending[0].numel() - done[0], self.max_step_tokens) // self.block_size * self.block_size
                results[0].append(self.model.prefill_blocks(states[0], pending[0][done[0]:done[0] + n], all_logits))
                done[0] += n
                continue
            if (len(states) == 1 and self.graphs is not None and not all_logits
                    and min(pending[0].numel() - done[0], self.max_step_tokens) >= self.block_size):
                left = pending[0].numel() - done[0]
                logits = self.graphs.fill_block(states[0], pending[0][done[0]:done[0] + self.block_size],
                                                left // self.block_size)
                if logits is not None:  # a whole block from its CUDA graph
                    results[0].append(logits)
                    done[0] += self.block_size
                    continue
            pieces, owners = [], []
            for i, (st, toks) in enumerate(zip(states, pending)):
                if done[i] < toks.numel():
                    room = self.block_size - st.num_tokens % self.block_size
                    n = min(room, toks.numel() - done[i], self.max_step_tokens)
                    pieces.append(StepPiece(st, toks[done[i]:done[i] + n]))
                    owners.append(i)
                    done[i] += n
            if not pieces:
                break
            for i, logits in zip(owners, self.model.step(pieces, all_logits=all_logits)):
                results[i].append(logits)
        return [torch.cat(r) if all_logits else r[-1] for r in results]

    def _reads_whole_blocks(self, state: FamState, left: int) -> bool:
        """Whether one stream's next step may read several whole blocks in one pass (FamModel.prefill_blocks):
        BSWA, at a block boundary, with a step budget and input of two blocks or more."""
        return (self.whole_blocks and self.model.fam_config.mode == "bswa" and state.num_tokens % self.block_size == 0
                and min(left, self.max_step_tokens) >= 2 * self.block_size)

    def prefill(self, state: FamState, chunks: Iterable[Sequence[int] | torch.Tensor],
                all_logits: bool = False) -> torch.Tensor | None:
        """Feed an iterable of token chunks (a huge input never needs to sit in memory whole). Returns the last
        token's logits (1, V), or every token's (T, V) if all_logits; None if the chunks held no token."""
        last, every = None, []
        for chunk in chunks:
            ids = _as_tensor(chunk)
            if ids.numel() == 0:
                continue
            out = self.run([state], [ids], all_logits=all_logits)[0]
            every.append(out) if all_logits else None
            last = out[-1:]
        if all_logits:
            return torch.cat(every) if every else None
        return last

    def decode(self, states: Sequence[FamState], token_ids: Sequence[int]) -> torch.Tensor:
        """One decode step for a batch of streams: one new token each. Returns (B, V) logits."""
        return torch.cat(self.run(states, [[t] for t in token_ids]))
