"""`famserve serve` (also `python -m famserve.server.main`): parse Settings from flags and environment, configure
logging and torch threads, and run the app under uvicorn. Exits 0 after a graceful shutdown (SIGTERM or Ctrl+C),
2 on bad settings, 1 if the model fails to load.

Graceful shutdown: the first SIGTERM/SIGINT starts a drain. New requests get 503 `shutting_down` and /ready turns
503 (routers and orchestrators stop sending), running requests and streams go on; once none is left, or after
shutdown_grace_s, uvicorn's own shutdown closes the listener (cancelling whatever still runs) and the app's lifespan
snapshots the sessions in memory. A second signal ends the drain at once (uvicorn still lets running requests have
what is left of the deadline; one more Ctrl+C stops without waiting) and the process then ends by that signal."""

from __future__ import annotations

import logging
import sys
import time
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn
from pydantic import ValidationError

from .settings import parse_settings

if TYPE_CHECKING:
    from .app import Drain

log = logging.getLogger(__name__)


def serve(argv: list[str]) -> int:
    try:
        settings = parse_settings(argv)
        settings.all_api_keys()  # an unreadable api_key_file fails now, not after the imports below
    except ValidationError as exc:
        for error in exc.errors():
            name = ".".join(str(part) for part in error["loc"])  # empty for a check across settings
            message = error["msg"].removeprefix("Value error, ")
            print(f"famserve serve: {name + ': ' if name else ''}{message}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"famserve serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.threads is not None:
        import torch

        torch.set_num_threads(settings.threads)

    from .app import create_app

    server: DrainingServer | None = None

    def stop() -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_load_error=stop)
    grace_s = settings.shutdown_grace_s
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=grace_s)
    server = DrainingServer(config, app.state.drain, grace_s)
    server.run()
    return 1 if app.state.load_error is not None else 0


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain before its shutdown (see the module's docstring). uvicorn re-raises a signal it
    handled once it has shut down, so the process would end "killed by SIGTERM" (status -15) however clean the
    shutdown; the first signal is handled here instead, so a drained server returns and the process exits 0."""

    def __init__(self, config: uvicorn.Config, drain: Drain, grace_s: float) -> None:
        super().__init__(config)
        self.drain = drain
        self.grace_s = grace_s
        self.drain_deadline: float | None = None  # time.monotonic() by which the drain ends; None: not draining

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_deadline is not None:
            super().handle_exit(sig, frame)  # a second signal: uvicorn's own handling (stop now)
            return
        log.info("signal %d: draining (new requests get 503; %d running, waiting up to %g s)", sig,
                 self.drain.in_flight, self.grace_s)
        self.drain.begin()
        self.drain_deadline = time.monotonic() + self.grace_s

    async def on_tick(self, counter: int) -> bool:
        if self.drain_deadline is not None:
            left_s = self.drain_deadline - time.monotonic()
            self.config.timeout_graceful_shutdown = max(left_s, 1.0)  # uvicorn waits this long, then cancels
            if not self.should_exit and (self.drain.in_flight == 0 or left_s <= 0):
                if self.drain.in_flight:
                    log.warning("drain deadline passed: stopping %d running request(s)", self.drain.in_flight)
                self.should_exit = True
        return await super().on_tick(counter)


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1:]))
