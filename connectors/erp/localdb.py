"""A private PostgreSQL cluster for tests and laptops, from the Debian ``postgresql`` package.

The system cluster and its service are left alone: this one lives in ``<PIECEFLOW_HOME>/postgres``,
listens only on the host and port of ``PIECEFLOW_DATABASE_URL`` (127.0.0.1:5433 by default), has
no Unix socket, trusts local TCP connections, and is started and stopped with ``pg_ctl``.

PostgreSQL refuses to run as root. When this process is root (CI containers), every server command
runs as the ``postgres`` system user that the Debian package creates (via ``runuser``), and the
cluster folder is owned by that user.

    python -m connectors.erp.localdb start|stop|status
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
from psycopg import sql

from streams.settings import Settings, get_settings

SERVER_USER = "postgres"
INSTALL_HINT = "install PostgreSQL: apt-get install -y postgresql (Debian/Ubuntu)"


class LocalDbError(RuntimeError):
    pass


def find_bindir() -> Path:
    """The folder with initdb/pg_ctl: ``pg_config --bindir`` if it has them, else the newest
    ``/usr/lib/postgresql/<version>/bin`` (Debian keeps them off PATH)."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        if out.returncode == 0 and out.stdout.strip():
            candidates.append(Path(out.stdout.strip()))

    def version(path: str) -> float:
        try:
            return float(Path(path).parent.name)
        except ValueError:
            return 0.0

    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)]
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    raise LocalDbError(f"no PostgreSQL server binaries (initdb, pg_ctl) found: {INSTALL_HINT}")


class LocalPostgres:
    """The private cluster that serves ``settings.database_url``."""

    def __init__(self, settings: Settings, timeout: float = 60.0) -> None:
        url = urlsplit(settings.database_url)
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or 5432
        self.user = url.username or "pieceflow"
        self.database = url.path.lstrip("/") or self.user
        self.url = settings.database_url
        self.root = settings.home.resolve() / "postgres"
        self.data = self.root / "data"
        self.log_file = self.root / "postgres.log"
        self.timeout = timeout
        if self.host not in ("127.0.0.1", "localhost", "::1"):
            raise LocalDbError(f"the local cluster only serves loopback URLs, not {self.host}")

    # ---- running commands as the server user ---------------------------------------------------

    @property
    def as_root(self) -> bool:
        return os.geteuid() == 0

    def _command(self, *args: str) -> list[str]:
        if not self.as_root:
            return list(args)
        if shutil.which("runuser") is None:
            raise LocalDbError("running as root needs runuser (util-linux) to drop to the postgres user")
        return ["runuser", "-u", SERVER_USER, "--", *args]

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            self._command(*args), capture_output=True, text=True, check=False, timeout=self.timeout + 30
        )
        if check and done.returncode != 0:
            raise LocalDbError(
                f"{Path(args[0]).name} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}"
                f"\n{self.log_tail()}"
            )
        return done

    def _pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self._run(str(find_bindir() / "pg_ctl"), "-D", str(self.data), *args, check=check)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_file.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    # ---- lifecycle ------------------------------------------------------------------------------

    def initialised(self) -> bool:
        return (self.data / "PG_VERSION").is_file()

    def init(self) -> bool:
        """Create the cluster if there is none; returns True when it was created now."""
        if self.initialised():
            return False
        bindir = find_bindir()
        self.root.mkdir(parents=True, exist_ok=True)
        if self.as_root:
            try:
                shutil.chown(self.root, user=SERVER_USER, group=SERVER_USER)
            except LookupError as exc:
                raise LocalDbError(f"no '{SERVER_USER}' system user to run PostgreSQL as: {INSTALL_HINT}") from exc
            # The server user must be able to reach the folder (a state folder under /root is not).
            probe = subprocess.run(self._command("test", "-w", str(self.root)), check=False)
            if probe.returncode != 0:
                raise LocalDbError(
                    f"the {SERVER_USER} user cannot write {self.root}; set PIECEFLOW_HOME to a folder it can reach"
                )
        # The superuser is the URL's user, so the sink and the tests connect without a role setup.
        self._run(
            str(bindir / "initdb"), "-D", str(self.data), "-U", self.user, "--auth=trust",
            "--encoding=UTF8", "--locale=C", "--no-instructions",
        )  # fmt: skip
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                "\n# pieceflow private cluster\n"
                f"listen_addresses = '{self.host}'\n"
                f"port = {self.port}\n"
                # No socket: /var/run/postgresql belongs to the system cluster, and TCP is all we use.
                "unix_socket_directories = ''\n"
                "max_connections = 50\n"
            )
        return True

    def running(self) -> bool:
        if not self.initialised():
            return False
        return self._pg_ctl("status", check=False).returncode == 0

    def start(self) -> bool:
        """Init if needed, start if not running, wait until it accepts connections and the
        database exists. Returns True when this call started the server."""
        self.init()
        started = False
        if not self.running():
            self._pg_ctl("start", "-w", "-t", str(int(self.timeout)), "-l", str(self.log_file))
            started = True
        self.wait_ready()
        self.ensure_database()
        return started

    def stop(self) -> bool:
        """Fast shutdown (open transactions are rolled back); returns True if it was running."""
        if not self.running():
            return False
        self._pg_ctl("stop", "-m", "fast", "-w", "-t", str(int(self.timeout)))
        return True

    def restart(self) -> None:
        self._pg_ctl("restart", "-m", "fast", "-w", "-t", str(int(self.timeout)), "-l", str(self.log_file))
        self.wait_ready()

    def wait_ready(self) -> None:
        """Poll a TCP connection for at most ``timeout`` seconds."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                with psycopg.connect(self._url("postgres"), connect_timeout=2):
                    return
            except psycopg.OperationalError as exc:
                if time.monotonic() >= deadline:
                    raise LocalDbError(
                        f"PostgreSQL on {self.host}:{self.port} not ready after {self.timeout:.0f}s: {exc}\n"
                        f"{self.log_tail()}"
                    ) from exc
                time.sleep(0.2)

    def ensure_database(self) -> None:
        with psycopg.connect(self._url("postgres"), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)).fetchone()
            if exists is None:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.database)))

    def _url(self, database: str) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("start", "stop", "status"):
        print("usage: python -m connectors.erp.localdb start|stop|status", file=sys.stderr)
        return 2
    db = LocalPostgres(get_settings())
    try:
        if argv[0] == "start":
            db.start()
            print(f"PostgreSQL is up: {db.url} (data in {db.data})")
        elif argv[0] == "stop":
            print("Stopped." if db.stop() else "Not running.")
        else:
            up = db.running()
            print(f"{'running' if up else 'stopped'}: {db.url} (data in {db.data})")
            return 0 if up else 1
    except LocalDbError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
