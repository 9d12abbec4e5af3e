"""What ``burrow demo`` serves: a small web app in a thread."""

from __future__ import annotations

import http.server
import threading
from dataclasses import dataclass

PAGE = """<!doctype html>
<title>burrow demo</title>
<h1>Hello from burrow</h1>
<p>This page comes from a small web app on 127.0.0.1:{port}, through a burrow tunnel.</p>
<p>Requests served: {count}</p>
"""


@dataclass
class SampleApp:
    """The demo's web app, in a thread."""

    server: http.server.ThreadingHTTPServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_sample_app() -> SampleApp:
    """Serve :data:`PAGE` on a free loopback port."""
    count = 0
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            nonlocal count
            with lock:
                count += 1
                body = PAGE.format(port=self.server.server_address[1], count=count).encode()  # type: ignore[index]
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # the demo prints its own lines

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="burrow-demo-app", daemon=True)
    thread.start()
    return SampleApp(server, thread)
