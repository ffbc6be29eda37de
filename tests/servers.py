"""Real servers on loopback for the tests: an MLflow tracking server (sqlite or PostgreSQL backend store,
served artifacts) and fresh PostgreSQL databases on the machine's server (127.0.0.1:5432, trust auth)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

# The PostgreSQL server every machine of the project runs; DLPIPE_TEST_POSTGRES names another.
POSTGRES_URL = os.environ.get("DLPIPE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(process: subprocess.Popen, timeout: float = 30) -> None:
    """Terminate a server process; kill it if it has not exited within `timeout` seconds."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def postgres_unreachable() -> str | None:
    """Why PostgreSQL cannot be used here (a skip reason), or None when it can."""
    try:
        import psycopg2
    except ImportError:
        return "psycopg2 is not installed (pip install -e '.[test]')"
    try:
        psycopg2.connect(POSTGRES_URL, connect_timeout=3).close()
    except psycopg2.OperationalError as exc:
        return f"no PostgreSQL server at {POSTGRES_URL}: {' '.join(str(exc).split())}"
    return None


@contextlib.contextmanager
def postgres_database(prefix: str) -> Iterator[str]:
    """A new, empty database on the PostgreSQL server, dropped afterwards. Yields its name."""
    import psycopg2

    name = f"dlpipe_{prefix}_{uuid.uuid4().hex[:10]}"
    admin = psycopg2.connect(POSTGRES_URL, connect_timeout=3)
    admin.autocommit = True  # CREATE / DROP DATABASE cannot run inside a transaction
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        yield name
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def postgres_rows(database: str, sql: str) -> list[tuple]:
    """The rows a query returns in `database` of the PostgreSQL server."""
    import psycopg2

    with (
        contextlib.closing(psycopg2.connect(database_url(database, "psycopg2"))) as connection,
        connection.cursor() as cursor,
    ):
        cursor.execute(sql)
        return cursor.fetchall()


def database_url(name: str, driver: str) -> str:
    """`POSTGRES_URL` pointed at database `name`: for SQLAlchemy with a driver (asyncpg), or for libpq
    and psycopg2 itself (driver psycopg2, SQLAlchemy's default for postgresql://)."""
    base = POSTGRES_URL.rsplit("/", 1)[0].split("://", 1)[1]
    scheme = "postgresql" if driver == "psycopg2" else f"postgresql+{driver}"
    return f"{scheme}://{base}/{name}"


@contextlib.contextmanager
def running_mlflow_server(root: Path, backend_store_uri: str) -> Iterator[str]:
    """`mlflow server` on a free loopback port with `backend_store_uri` and an artifact root under `root`
    (proxied: clients upload through the server). Yields its URL."""
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    command += ["--backend-store-uri", backend_store_uri, "--artifacts-destination", str(root / "artifacts")]
    log_file = open(root / "server.log", "w")  # noqa: SIM115 - the server writes to it until the block ends
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log_file)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    log = (root / "server.log").read_text()[-2000:]
                    raise RuntimeError(f"mlflow server did not start:\n{log}") from None
                time.sleep(0.5)
        yield url
    finally:
        stop(process)
        log_file.close()
