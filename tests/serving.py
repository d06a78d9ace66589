"""Starting the real `serve` command for tests and benchmarks: a free loopback port, wait until healthy."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from mlx_diffusiongemma.toy import TOY_PATH


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mlx-diffusiongemma serve` in a subprocess on 127.0.0.1 (its log in `log`)."""

    def __init__(self, model: str | Path, *flags: str, log: Path, timeout: float = 120.0):
        self.model = str(model)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        argv = [sys.executable, "-m", "mlx_diffusiongemma", "serve", "--model", str(model), "--port",
                str(self.port), "--log-level", "warning", *flags]
        with open(log, "w") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited {self.proc.returncode}: {log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"serve did not come up in {timeout} s: {log.read_text()[-2000:]}")

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5).json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def endless_toy(path: Path) -> Path:
    """The toy with no end-of-sequence id (and a long context): every request runs to its `max_tokens`, so
    tests have requests that take as long as they like."""
    shutil.copytree(TOY_PATH, path)
    config = json.loads((path / "config.json").read_text())
    generation = json.loads((path / "generation_config.json").read_text())
    for section in (config, config["text_config"], generation):
        section["eos_token_id"] = []
    config["text_config"]["max_position_embeddings"] = 262144
    (path / "config.json").write_text(json.dumps(config))
    (path / "generation_config.json").write_text(json.dumps(generation))
    return path
