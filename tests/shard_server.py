"""An HTTP server on 127.0.0.1 serving a folder of shards, for the tests that read shards over
HTTP: it cuts off chosen downloads once and records what is asked for."""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.distributed_utils import free_port


class _ShardHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; `server.cut_once` names files whose first GET is cut off halfway, and
    `server.requested` lists the names of the files asked for, in order."""

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self.server.requested.append(self.path.rsplit("/", 1)[-1])
        super().do_GET()

    def copyfile(self, source, outputfile) -> None:
        name = self.path.rsplit("/", 1)[-1]
        if name in self.server.cut_once:
            self.server.cut_once.discard(name)
            content = source.read()
            outputfile.write(content[: len(content) // 2])
            self.close_connection = True
            return
        super().copyfile(source, outputfile)


@contextmanager
def serving(root: Path) -> Iterator[tuple[str, http.server.HTTPServer]]:
    """(the base URL of `root`, the server), until the block ends."""
    handler = functools.partial(_ShardHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    server.cut_once = set()
    server.requested = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
