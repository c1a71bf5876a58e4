"""Test servers for the LAVE HTTP path: a scripted OpenAI-compatible stub and llama.cpp's real server."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_NAME = re.compile(r"is '(.+?)' exclusively")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StubChatServer:
    """OpenAI-compatible ``/v1/chat/completions`` on 127.0.0.1 answering ``reply(name)`` for the queried name.

    ``reply`` may return an int HTTP status instead of text to simulate a failure. Every request is logged in
    ``requests`` (the queried names; ``"/v1/models"`` for model listings).
    """

    def __init__(self, reply: Callable[[str], str | int]):
        self.reply, self.requests = reply, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _send(self, status: int, obj: dict) -> None:
                body = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                server.requests.append(self.path)
                self._send(200, {"object": "list", "data": [{"id": "stub-model", "object": "model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][-1]["content"]
                m = _NAME.search(prompt)
                name = m.group(1) if m else ""
                server.requests.append(name)
                server.last_body = body
                answer = server.reply(name)
                if isinstance(answer, int):
                    self._send(answer, {"error": "scripted failure"})
                    return
                self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": answer}}]})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> StubChatServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class LlamaCppServer:
    """``python -m llama_cpp.server`` on a free 127.0.0.1 port, started and stopped by the test.

    Args:
        model: GGUF file.
        startup_timeout: seconds to wait for ``/v1/models`` to answer.
    """

    def __init__(self, model: Path, log_path: Path, startup_timeout: float = 120.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.cmd = [
            sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
            "--port", str(self.port), "--n_ctx", "2048", "--n_threads", "2", "--seed", "0", "--verbose", "False",
        ]  # fmt: skip
        self.log_path, self.startup_timeout = log_path, startup_timeout
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> LlamaCppServer:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in __exit__
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.__exit__()
                raise RuntimeError(f"llama_cpp.server exited with {self.proc.returncode}: {self.log_path.read_text()}")
            try:
                with urllib.request.urlopen(self.url + "/models", timeout=2):
                    return self
            except OSError:
                time.sleep(0.3)
        self.__exit__()
        raise TimeoutError(f"llama_cpp.server did not answer within {self.startup_timeout} s; log: {self.log_path}")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
