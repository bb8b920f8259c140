"""DecodeGraphs: a decode step of a batch of streams replayed from a CUDA graph, so a step costs one launch instead
of some 1,400 (docs/benchmarks.md run G: one-stream decode on an H200 was launch-bound, the GPU busy 5 ms of a
20-60 ms step).

A graph records the kernels of FamModel.decode_tokens on the buffers of one batch of states, with each stream's
token, position and slot read from small device tensors; replaying it after writing those is the same step. A
state's buffers live as long as the state, so the graph stays valid for every later step of the same batch: one
capture per batch (the `capacity` most recently used are kept), then a replay per step. A step decode_tokens does
not take (a stream at its block's last token or in its sinks, full attention, a prompt piece) runs through
FamModel.step as before."""

from __future__ import annotations

import logging
import weakref
from collections import OrderedDict
from collections.abc import Sequence

import torch

from .model import FamModel
from .state import FamState

log = logging.getLogger(__name__)


class _BatchGraph:
    """The captured decode step of one batch of states (in this order)."""

    def __init__(self, model: FamModel, states: Sequence[FamState], tokens: Sequence[int]):
        self.model = model
        self.state_refs = [weakref.ref(s) for s in states]
        self.token, self.pos, self.slot = (torch.tensor(v, dtype=torch.int64, device=model.device)
                                           for v in self._inputs(states, tokens))
        # decode_tokens is idempotent for fixed inputs (it writes the same keys into the same slots), so the
        # warm-up on a side stream (lazy kernel set-up, as capture requires) is this step itself.
        device, side = model.device, torch.cuda.Stream(model.device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            model.decode_tokens(list(states), self.token, self.pos, self.slot)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model.decode_tokens(list(states), self.token, self.pos, self.slot)

    def _inputs(self, states: Sequence[FamState], tokens: Sequence[int]) -> tuple[list[int], list[int], list[int]]:
        lay = self.model.layout
        pos = [s.num_tokens for s in states]
        return list(tokens), pos, [lay.block_slot(p // lay.block_size) + p % lay.block_size for p in pos]

    def holds(self, states: Sequence[FamState]) -> bool:
        return len(states) == len(self.state_refs) and all(r() is s for r, s in zip(self.state_refs, states))

    def replay(self, states: Sequence[FamState], tokens: Sequence[int]) -> torch.Tensor:
        for buffer, values in zip((self.token, self.pos, self.slot), self._inputs(states, tokens)):
            buffer.copy_(torch.tensor(values, dtype=torch.int64))
        self.graph.replay()
        return self.logits.clone()  # the graph's output buffer is overwritten by its next replay


class DecodeGraphs:
    """CUDA graphs of decode steps, one per batch of streams (the `capacity` most recently used)."""

    def __init__(self, model: FamModel, capacity: int = 16):
        self.model, self.capacity = model, capacity
        self.graphs: OrderedDict[tuple[int, ...], _BatchGraph] = OrderedDict()
        self.broken = False  # a capture failed once: stay eager
        self.captures = self.replays = 0

    def decode(self, states: Sequence[FamState], tokens: Sequence[int]) -> torch.Tensor | None:
        """One token for each stream through the batch's graph: (B, V) logits, each state advanced by one token;
        or None when this step cannot take a graph (the caller steps it as usual)."""
        if self.broken or not all(self.model.fits_decode_tokens(s) for s in states):
            return None
        key = tuple(id(s) for s in states)
        graph = self.graphs.get(key)
        if graph is not None and graph.holds(states):
            self.graphs.move_to_end(key)
            logits = graph.replay(states, tokens)
            self.replays += 1
        else:
            try:
                graph = _BatchGraph(self.model, states, tokens)
            except RuntimeError as exc:  # an op the capture refuses: correct eager steps beat a crash
                log.warning("CUDA graph capture failed, decoding without graphs: %s", exc)
                self.broken = True
                self.graphs.clear()
                torch.cuda.synchronize(self.model.device)
                return None
            self.captures += 1
            self.graphs[key] = graph
            while len(self.graphs) > self.capacity:
                self.graphs.popitem(last=False)
            graph.graph.replay()  # capture records without running: this is the step
            logits = graph.logits.clone()
        for s in states:
            s.num_tokens += 1
        return logits
