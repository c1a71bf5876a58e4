"""Test servers for the LAVE HTTP path: a scripted OpenAI-compatible stub, a raw socket server for hostile
behaviour (slow, silent, huge answers), and llama.cpp's real server."""

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
from typing import Any

_NAME = re.compile(r"is '(.+?)' exclusively")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompt_name(body: dict) -> str:
    """The name a LAVE chat request asks about ("" if none)."""
    m = _NAME.search(body["messages"][-1]["content"])
    return m.group(1) if m else ""


def completion(content: Any) -> dict:
    """An OpenAI chat completion whose message content is ``content`` (any JSON value)."""
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}


class StubChatServer:
    """OpenAI-compatible ``/v1/chat/completions`` on 127.0.0.1 answering ``reply(name)`` for the queried name.

    ``reply`` returns the answer text, or an int HTTP status to simulate a failure, or a dict to send as the whole
    JSON response, or bytes to send as the raw response body. Every request is logged in ``requests`` (the queried
    names; ``"/v1/models"`` for model listings).
    """

    def __init__(self, reply: Callable[[str], str | int | dict | bytes]):
        self.reply, self.requests = reply, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _send(self, status: int, obj: dict | bytes) -> None:
                body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
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
                name = prompt_name(body)
                server.requests.append(name)
                server.last_body = body
                answer = server.reply(name)
                if isinstance(answer, int):
                    self._send(answer, {"error": "scripted failure"})
                else:
                    self._send(200, answer if isinstance(answer, dict | bytes) else completion(answer))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> StubChatServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def read_request(conn: socket.socket) -> tuple[str, dict | None]:
    """Read one HTTP request from ``conn``: ``(path, JSON body or None)``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("client closed before the end of the headers")
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    length = next((int(v) for k, _, v in (x.partition(":") for x in lines[1:]) if k.lower() == "content-length"), 0)
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("client closed before the end of the body")
        body += chunk
    return lines[0].split()[1], (json.loads(body) if length else None)


class RawServer:
    """A TCP server on 127.0.0.1 running ``handle(conn, server)`` in a thread per connection, for hostile servers.

    ``handle`` must return once ``server.stop`` is set (wait on it instead of sleeping); it adds what it sends to
    ``server.sent`` through :meth:`send`. Exiting the context stops and joins everything.
    """

    def __init__(self, handle: Callable[[socket.socket, RawServer], None]):
        self.handle, self.stop = handle, threading.Event()
        self.sent, self.n_connections, self.requests = 0, 0, []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._serve, daemon=True)

    def send(self, conn: socket.socket, data: bytes) -> None:
        conn.sendall(data)
        self.sent += len(data)

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.n_connections += 1
            t = threading.Thread(target=self._run, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _run(self, conn: socket.socket) -> None:
        with conn:
            try:
                self.handle(conn, self)
            except OSError:  # the client went away: what a hostile server test expects
                pass

    def __enter__(self) -> RawServer:
        self._accept.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self._accept.join()
        self.sock.close()
        for t in self._threads:
            t.join(timeout=10)


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
