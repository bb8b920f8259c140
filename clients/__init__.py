"""famserve's clients: FamserveClient (Python, over HTTP), the `famserve-client` command line and the browser
playground (served by the server at /playground). Nothing here imports famserve.engine or famserve.server."""

from .client import (Completion, FamserveAPIError, FamserveClient, FamserveConnectionError, FamserveError,
                     IngestProgress, SessionInfo, TextStream)

__all__ = ["Completion", "FamserveAPIError", "FamserveClient", "FamserveConnectionError", "FamserveError",
           "IngestProgress", "SessionInfo", "TextStream"]
