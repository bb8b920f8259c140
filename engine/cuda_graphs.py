"""DecodeGraphs: one stream's decode step replayed from a CUDA graph, so a token costs one launch instead of some
1,400 (docs/benchmarks.md run G: one-stream decode on an H200 was launch-bound, the GPU busy 5 ms of a 20-60 ms step).

A graph records the kernels of FamModel.decode_one on one state's buffers, with the token, its position and its slot
read from small device tensors; replaying it after writing those three is the same step. A state's buffers live as
long as the state, so its graph stays valid for every later token: one capture per stream (kept for the most recent
`capacity` streams), then a replay per token. Tokens decode_one does not take (a block's last token, the sinks, full
attention) go through FamModel.step as before."""

from __future__ import annotations

import logging
import weakref
from collections import OrderedDict

import torch

from .model import FamModel
from .state import FamState

log = logging.getLogger(__name__)


class _StreamGraph:
    def __init__(self, model: FamModel, state: FamState, token: int):
        device = model.device
        self.state_ref = weakref.ref(state)
        self.token = torch.full((1,), token, dtype=torch.int64, device=device)
        self.pos = torch.full((1,), state.num_tokens, dtype=torch.int64, device=device)
        self.slot = torch.full((1,), self._slot(model, state), dtype=torch.int64, device=device)
        # decode_one is idempotent for fixed inputs (it writes the same keys into the same slot), so the warm-up
        # on a side stream (lazy kernel set-up, as capture requires) does this token's step itself.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            model.decode_one(state, self.token, self.pos, self.slot)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model.decode_one(state, self.token, self.pos, self.slot)

    @staticmethod
    def _slot(model: FamModel, state: FamState) -> int:
        lay, n = model.layout, state.num_tokens
        return lay.block_slot(n // lay.block_size) + n % lay.block_size

    def replay(self, model: FamModel, state: FamState, token: int) -> torch.Tensor:
        self.token.fill_(token)
        self.pos.fill_(state.num_tokens)
        self.slot.fill_(self._slot(model, state))
        self.graph.replay()
        return self.logits.clone()  # the graph's output buffer is overwritten by its next replay


class DecodeGraphs:
    """CUDA graphs of single-token decode steps, one per stream (the `capacity` most recently used)."""

    def __init__(self, model: FamModel, capacity: int = 16):
        self.model, self.capacity = model, capacity
        self.graphs: OrderedDict[int, _StreamGraph] = OrderedDict()
        self.broken = False  # a capture failed once: stay eager
        self.captures = self.replays = 0

    def decode(self, state: FamState, token: int) -> torch.Tensor | None:
        """The stream's next token through its graph: (1, V) logits, state advanced by one token; or None when
        this token cannot take a graph (the caller steps it as usual)."""
        if self.broken or not self.model.fits_decode_one(state):
            return None
        graph = self.graphs.get(id(state))
        if graph is not None and graph.state_ref() is state:
            self.graphs.move_to_end(id(state))
            logits = graph.replay(self.model, state, token)
            self.replays += 1
        else:
            try:
                graph = _StreamGraph(self.model, state, token)
            except RuntimeError as exc:  # an op the capture refuses: correct eager steps beat a crash
                log.warning("CUDA graph capture failed, decoding without graphs: %s", exc)
                self.broken = True
                self.graphs.clear()
                torch.cuda.synchronize(self.model.device)
                return None
            self.graphs[id(state)] = graph
            while len(self.graphs) > self.capacity:
                self.graphs.popitem(last=False)
            self.captures += 1
            graph.graph.replay()  # capture records without running: this is the token's step
            logits = graph.logits.clone()
        state.num_tokens += 1
        return logits
