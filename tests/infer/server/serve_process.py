"""Start a real `jaxtx serve` (uvicorn) subprocess on 127.0.0.1 at a free port and wait for /health: the one way the
server tests launch it."""
import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jax
import pytest

STARTUP_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(args: list, *, log_name: str = "jaxtx-serve"):
    """Yields (process, base url, log file). The server sees the test process's CPU devices and, as every test, no
    persistent compilation cache (conftest.py); a process that exits or stays silent past STARTUP_S fails the test
    with the tail of its log."""
    port = free_port()
    cmd = [sys.executable, "-m", "jaxtx", "serve", "--port", str(port), *args]
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(jax.device_count()))
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"{log_name}-{port}.log", "w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_S
    try:
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"jaxtx serve exited with {proc.returncode}:\n{log.read()[-4000:]}")
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"jaxtx serve did not answer /health within {STARTUP_S} s")
            time.sleep(0.5)
        yield proc, base, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
