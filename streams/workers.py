"""Pipeline workers as child processes: the demo, the benchmark and the tests start them this way."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from streams.settings import Settings
from streams.stack import log_tail


class WorkerProcess:
    """``pieceflow worker`` as a child process, with its own log file."""

    def __init__(self, settings: Settings, log_dir: Path, name: str, env: dict[str, str]) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log = log_dir / f"{name}.log"
        # The child talks to the same cluster as the parent, whatever the parent's settings came from.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streams", "worker", "--loglevel", "info"],
            env={**os.environ, **settings.cluster_env(), **env},
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self) -> str:
        return log_tail(self.log, 60)

    def stop(self, timeout: float = 30.0) -> None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
