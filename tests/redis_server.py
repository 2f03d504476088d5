"""A real redis-server for tests: started on a free port, stopped afterwards.

`start_redis_server()` starts one (None when no redis-server binary is on PATH).
Fixtures for conftest.py (`from tests.redis_server import redis_url, redis_server`, or
`pytest_plugins`):
- `redis_url`: REDIS_URL when set, else a session-wide server of our own.
- `redis_server`: a private server the test may stop and restart (needs the binary).
Both skip when no Redis is available, unless SWITCHBOARD_REQUIRE_REDIS=1 (CI): then
they fail, so a broken CI image cannot pass by skipping every Redis test.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REQUIRE_ENV = "SWITCHBOARD_REQUIRE_REDIS"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ping(port: int, timeout_s: float = 0.2) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server subprocess without persistence, on 127.0.0.1:port."""

    def __init__(self, binary: str, port: int | None = None) -> None:
        self.binary = binary
        self.port = port or _free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="redis-test-")
        self._log = Path(self._dir.name) / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_s: float = 5.0) -> None:
        if self.running:
            return
        self._proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", self._dir.name,
             "--logfile", str(self._log), "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            if _ping(self.port):
                return
            time.sleep(0.01)
        self.stop()
        log = self._log.read_text(errors="replace")[-2000:] if self._log.exists() else ""
        raise RuntimeError(f"redis-server did not start on port {self.port}: {log}")

    def stop(self) -> None:
        """Stop the server process (its data is gone: no persistence)."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        self._dir.cleanup()


def start_redis_server(attempts: int = 3) -> RedisServer | None:
    """A running server on a free port, or None when no redis-server binary exists."""
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    last_error: Exception | None = None
    for _ in range(attempts):  # another process may grab the free port first
        server = RedisServer(binary)
        try:
            server.start()
            return server
        except RuntimeError as exc:
            server.cleanup()
            last_error = exc
    raise RuntimeError(f"could not start redis-server: {last_error}")


def _unavailable(reason: str) -> None:
    if os.environ.get(REQUIRE_ENV):
        pytest.fail(f"{reason}, and {REQUIRE_ENV} is set", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a Redis for this test session (REDIS_URL, or a server started here)."""
    env_url = os.environ.get("REDIS_URL")
    if env_url:
        yield env_url
        return
    server = start_redis_server()
    if server is None:
        _unavailable("no redis-server binary on PATH and REDIS_URL is not set")
        return
    try:
        yield server.url
    finally:
        server.cleanup()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A private server this test may stop and restart."""
    server = start_redis_server()
    if server is None:
        _unavailable("no redis-server binary on PATH (needed to restart a server)")
        return
    try:
        yield server
    finally:
        server.cleanup()
