"""Start ``python -m m3_rag serve`` as a real process on a free loopback port, wait for
``/health``, stop it; servers with the same options are shared by the test modules of one
pytest run (started once, stopped at exit)."""

from __future__ import annotations

import atexit
import os
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "test-key-3f9a"
STARTUP_S = 240.0
MAX_TEXTS, MAX_CHARS, MAX_BODY = 64, 20_000, 1_000_000  # the main server's limits


class Server:
    """One server process.

    Args:
        args: ``m3-rag serve`` options (``--port 0`` is added: the server picks a free port
            and prints it).
        env: Extra environment variables (``M3_RAG_SERVE_*`` limits, the API key).
    """

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        # a file, not a pipe: a full pipe would block the server
        self._log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed by stop)
        full_env = {
            **os.environ,
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            **(env or {}),
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "m3_rag", "serve", *args, "--port", "0"],
            cwd=ROOT,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        self.url = self._wait_for_url()
        self.key = (env or {}).get("M3_TEST_API_KEY")
        headers = {"authorization": f"Bearer {self.key}"} if self.key else {}
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=120)
        self._wait_healthy()

    def _wait_for_url(self) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 1.0)
            if ready:
                line = self.proc.stdout.readline()
                if "listening on " in line:
                    return line.split("listening on ", 1)[1].strip()
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"m3-rag serve exited {self.proc.returncode}: {self.stderr_tail()}"
                )
        self.stop()
        raise RuntimeError(f"m3-rag serve did not start in {STARTUP_S} s")

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("m3-rag serve never answered /health")

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def post(self, path: str, body: Any = None, **kwargs: Any) -> httpx.Response:
        return self.client.post(path, json=body, **kwargs)

    def metric(self, name: str) -> float:
        """The value of an unlabelled gauge of ``/metrics``."""
        text = self.client.get("/metrics").text
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)

    def wait_idle(self, deadline_s: float = 120.0) -> None:
        """Until no model request is in progress (a request is released just after its
        answer is sent, so a client can see its answer a moment before)."""
        end = time.monotonic() + deadline_s
        while self.metric("m3rag_queue_depth") != 0:
            if time.monotonic() > end:
                raise AssertionError("model requests still in progress")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM (uvicorn shuts down gracefully), SIGKILL if it lingers."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if hasattr(self, "client"):
            self.client.close()
        self._log.close()

    def stderr_tail(self, n: int = 3000) -> str:
        """The end of what the server wrote on stderr."""
        if self._log.closed:
            return ""
        self._log.seek(0)
        return self._log.read()[-n:]


_SHARED: dict[tuple[Any, ...], Server] = {}


def shared_server(args: list[str], env: dict[str, str] | None = None) -> Server:
    """A server with these options, started on first use and stopped when pytest exits."""
    key = (tuple(args), tuple(sorted((env or {}).items())))
    server = _SHARED.get(key)
    if server is None or server.proc.poll() is not None:
        server = _SHARED[key] = Server(args, env)
    return server


@atexit.register
def _stop_all() -> None:
    for server in _SHARED.values():
        server.stop()


_INDEX_DIR = Path(tempfile.mkdtemp(prefix="m3-rag-served-index-")) / "index"


def main_server(m3_dir: Path, reranker_dir: Path) -> Server:
    """The server most tests share: the tiny M3 model, the tiny reranker, an index, an API
    key (so every request but /health needs it)."""
    return shared_server(
        [
            "--model",
            str(m3_dir),
            "--reranker",
            str(reranker_dir),
            "--index",
            str(_INDEX_DIR),
            "--device",
            "cpu",
            "--api-key-env",
            "M3_TEST_API_KEY",
        ],
        {
            "M3_TEST_API_KEY": API_KEY,
            "M3_RAG_SERVE_MAX_TEXTS": str(MAX_TEXTS),
            "M3_RAG_SERVE_MAX_CHARS": str(MAX_CHARS),
            "M3_RAG_SERVE_MAX_BODY_BYTES": str(MAX_BODY),
        },
    )
