"""`famserve serve` (also `python -m famserve.server.main`): parse Settings from flags and environment, configure
logging and torch threads, and run the app under uvicorn. Exits 2 on bad settings, 1 if the model fails to load."""

from __future__ import annotations

import logging
import sys

from pydantic import ValidationError

from .settings import parse_settings

GRACEFUL_SHUTDOWN_S = 10  # how long uvicorn lets running requests finish on SIGTERM/SIGINT


def serve(argv: list[str]) -> int:
    try:
        settings = parse_settings(argv)
        settings.all_api_keys()  # an unreadable api_key_file fails now, not after the imports below
    except ValidationError as exc:
        for error in exc.errors():
            name = ".".join(str(part) for part in error["loc"])
            print(f"famserve serve: {name}: {error['msg']}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"famserve serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.threads is not None:
        import torch

        torch.set_num_threads(settings.threads)

    import uvicorn

    from .app import create_app

    server: uvicorn.Server | None = None

    def stop() -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_load_error=stop)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    server = uvicorn.Server(config)
    server.run()
    return 1 if app.state.load_error is not None else 0


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1:]))
