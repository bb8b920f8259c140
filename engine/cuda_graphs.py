"""StepGraphs: engine steps replayed from CUDA graphs, so a step costs one launch instead of some 1,400
(docs/benchmarks.md run G: on an H200 a step was launch-bound, the GPU busy 5 ms of a 20-60 ms decode step).

Two kinds of step have fixed shapes and take a graph: a decode step of a batch of streams (FamModel.decode_tokens)
and a whole block of one stream (FamModel.fill_block: prefill block by block, the FAM update riding along). A graph
records the step's kernels on the buffers of its states, with everything that changes from step to step (tokens,
positions, slots) read from small device tensors; replaying it after writing those is the same step. A state's
buffers live as long as the state, so the graph stays valid for every later step: one capture per batch or stream
(the most recently used are kept), then a replay per step. Steps that do not fit run through FamModel.step as before
(a stream at its block's last token or in its sinks, full attention, prompt pieces that are not whole blocks).

Every capture is checked once: the eager run that warms the kernels up before the capture computes the step, and
the graph's first replay must agree with it; if it does not, the eager result stands and graphs are switched off."""

from __future__ import annotations

import logging
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from .model import BlockIndices, FamModel
from .state import FamState

log = logging.getLogger(__name__)

CAPTURE_BLOCKS_IN_HAND = 4  # whole blocks of input that earn a stream's block graph its capture (see fill_block)


def _agrees(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Replay against eager: the same kernels on the same inputs, so anything beyond rounding is a broken graph."""
    if want.numel() == 0:  # a BSWA state's FAM rows
        return True
    got, want = got.float(), want.float()
    return bool(torch.isfinite(got).all()) and float((got - want).abs().max()) <= 1e-2 * float(want.abs().max()) + 1e-3


class GraphMismatch(RuntimeError):
    """A graph's first replay disagreed with the eager step it was captured from."""


@contextmanager
def _side_stream(device: torch.device) -> Iterator[None]:
    """Run the block on a side stream, as CUDA graph capture wants its warm-up, ordered with the current stream."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        yield
    torch.cuda.current_stream(device).wait_stream(side)


class _DecodeGraph:
    """The captured decode step of one batch of states (in this order)."""

    def __init__(self, model: FamModel, states: Sequence[FamState], tokens: Sequence[int]):
        self.model = model
        self.state_refs = [weakref.ref(s) for s in states]
        self.token, self.pos, self.slot = (torch.tensor(v, dtype=torch.int64, device=model.device)
                                           for v in self._inputs(states, tokens))
        # decode_tokens is idempotent for fixed inputs (it writes the same keys into the same slots), so the warm-up
        # on a side stream (lazy kernel set-up, as capture requires) is this step itself.
        with _side_stream(model.device):
            self.eager = model.decode_tokens(list(states), self.token, self.pos, self.slot)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model.decode_tokens(list(states), self.token, self.pos, self.slot)

    def _inputs(self, states: Sequence[FamState], tokens: Sequence[int]) -> tuple[list[int], list[int], list[int]]:
        lay = self.model.layout
        pos = [s.num_tokens for s in states]
        return list(tokens), pos, [lay.block_slot(p // lay.block_size) + p % lay.block_size for p in pos]

    def holds(self, states: Sequence[FamState]) -> bool:
        return len(states) == len(self.state_refs) and all(r() is s for r, s in zip(self.state_refs, states))

    def first_replay(self, states: Sequence[FamState]) -> torch.Tensor:
        self.graph.replay()
        if not _agrees(self.logits, self.eager):
            self.model.decode_tokens(list(states), self.token, self.pos, self.slot)  # rewrite the slots eagerly
            raise GraphMismatch(self.eager)
        self.eager = None
        return self.logits.clone()

    def replay(self, states: Sequence[FamState], tokens: Sequence[int]) -> torch.Tensor:
        for buffer, values in zip((self.token, self.pos, self.slot), self._inputs(states, tokens)):
            buffer.copy_(torch.tensor(values, dtype=torch.int64))
        self.graph.replay()
        return self.logits.clone()  # the graph's output buffer is overwritten by its next replay


class _BlockGraph:
    """The captured fill_block of one stream."""

    def __init__(self, model: FamModel, state: FamState, idx: BlockIndices):
        self.model, self.state_ref, self.idx = model, weakref.ref(state), idx
        # fill_block is not idempotent (it moves the FAM on), so the warm-up runs on the state, its result is kept
        # to check the first replay, and the state is put back before the capture.
        before = state.clone()
        with _side_stream(model.device):
            self.eager = model.fill_block(state, idx), state.clone()
        state.copy_(before)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model.fill_block(state, idx)

    def holds(self, state: FamState) -> bool:
        return self.state_ref() is state

    def first_replay(self, state: FamState) -> torch.Tensor:
        self.graph.replay()
        logits, after = self.eager
        self.eager = None
        if not (_agrees(self.logits, logits) and all(_agrees(state.tensors()[n], after.tensors()[n])
                                                     for n in ("k", "v", "fam"))):
            state.copy_(after)
            raise GraphMismatch(logits)
        return self.logits.clone()

    def replay(self, idx: BlockIndices) -> torch.Tensor:
        self.idx.copy_(idx)
        self.graph.replay()
        return self.logits.clone()


class StepGraphs:
    """CUDA graphs of decode steps (one per batch of streams, the `decode_capacity` most recently used) and of whole
    blocks (one per stream, the `block_capacity` most recently used: each holds a block's activations)."""

    def __init__(self, model: FamModel, decode_capacity: int = 16, block_capacity: int = 4):
        self.model = model
        self.decode_graphs: OrderedDict[tuple[int, ...], _DecodeGraph] = OrderedDict()
        self.block_graphs: OrderedDict[int, _BlockGraph] = OrderedDict()
        self.decode_capacity, self.block_capacity = decode_capacity, block_capacity
        self.broken = False  # a capture failed or disagreed once: stay eager
        self.captures = self.replays = 0
        self._sighted: OrderedDict[tuple[int, ...], None] = OrderedDict()  # decode batches seen once, most recent last

    def decode(self, states: Sequence[FamState], tokens: Sequence[int]) -> torch.Tensor | None:
        """One token for each stream through the batch's graph: (B, V) logits, each state advanced by one token;
        or None when this step cannot take a graph (the caller steps it as usual)."""
        if self.broken or not all(self.model.fits_decode_tokens(s) for s in states):
            return None
        key = tuple(id(s) for s in states)
        graph = self.decode_graphs.get(key)
        if graph is not None and graph.holds(states):
            self.decode_graphs.move_to_end(key)
            logits = graph.replay(states, tokens)
            self.replays += 1
        elif key not in self._sighted:
            # A capture costs about three steps: a batch gets its graph when it comes back, so that streams
            # joining and leaving every step (a burst of short requests) do not pay for graphs used once.
            self._sighted[key] = None
            while len(self._sighted) > 4 * self.decode_capacity:
                self._sighted.popitem(last=False)
            return None
        else:
            logits = self._capture(lambda: _DecodeGraph(self.model, states, tokens), self.decode_graphs, key,
                                   self.decode_capacity, lambda g: g.first_replay(states))
            if logits is None:
                return None
        for s in states:
            s.num_tokens += 1
        return logits

    def fill_block(self, state: FamState, token_ids: torch.Tensor, blocks_in_hand: int) -> torch.Tensor | None:
        """The stream's next whole block (L tokens) through its graph: the block's last logits (1, V), the state
        advanced past the block (its FAM updated, its window moved on); or None when the block takes no graph.
        `blocks_in_hand`: whole blocks of input the caller holds, this one included. A capture costs about three
        block steps (two state copies, the eager warm-up, the capture), so a stream without a graph gets one only
        with CAPTURE_BLOCKS_IN_HAND or more in hand: a short prompt is cheaper read eagerly."""
        if self.broken or not self.model.fits_fill_block(state):
            return None
        graph = self.block_graphs.get(id(state))
        if graph is None or not graph.holds(state):
            graph = None
            if blocks_in_hand < CAPTURE_BLOCKS_IN_HAND:
                return None
        idx = self.model.block_indices(state, token_ids)
        if graph is not None:
            self.block_graphs.move_to_end(id(state))
            logits = graph.replay(idx)
            self.replays += 1
        else:
            logits = self._capture(lambda: _BlockGraph(self.model, state, idx), self.block_graphs, id(state),
                                   self.block_capacity, lambda g: g.first_replay(state))
            if logits is None:
                return None
        state.num_tokens += self.model.layout.block_size
        state.num_fam_updates += 1 if self.model.layout.num_fam else 0
        return logits

    def _capture(self, make, graphs: OrderedDict, key, capacity: int, first_replay) -> torch.Tensor | None:
        """Capture a graph and run its first replay (capture records without running: that replay is the step).
        Returns the step's logits; None if the capture failed (the state is as before the step); on a disagreeing
        replay, the eager logits (the state as the eager step left it). Either way graphs are off from then on."""
        try:
            graph = make()
        except RuntimeError as exc:  # an op the capture refuses: correct eager steps beat a crash
            self._switch_off(f"CUDA graph capture failed, running without graphs: {exc}")
            return None
        self.captures += 1
        try:
            logits = first_replay(graph)
        except GraphMismatch as mismatch:
            self._switch_off("a CUDA graph's replay disagreed with its eager step; running without graphs")
            return mismatch.args[0]
        graphs[key] = graph
        while len(graphs) > capacity:
            graphs.popitem(last=False)
        return logits

    def _switch_off(self, why: str) -> None:
        log.warning(why)
        self.broken = True
        self.decode_graphs.clear()
        self.block_graphs.clear()
        torch.cuda.synchronize(self.model.device)
