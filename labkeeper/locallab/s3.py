"""moto's S3 server on a loopback port: a real HTTP S3 API for restic and boto3."""

from __future__ import annotations

import secrets as pysecrets
import shutil
import sys
from pathlib import Path

from pydantic import SecretStr

from labkeeper import b2
from labkeeper.locallab.ports import free_port, wait_for_port
from labkeeper.locallab.services import Service
from labkeeper.secrets import register


def moto_server_path() -> str:
    beside = Path(sys.executable).parent / "moto_server"
    if beside.exists():
        return str(beside)
    found = shutil.which("moto_server")
    if not found:
        raise RuntimeError("moto_server not found: install labkeeper with the demo or dev extra")
    return found


class LocalS3:
    def __init__(self, workdir: Path, *, bucket: str = "labkeeper-lab",
                 region: str = "us-east-1") -> None:
        self.workdir = workdir
        self.host = "127.0.0.1"
        self.port = 0
        self.bucket = bucket
        self.region = region
        self.access_key_id = "LK" + pysecrets.token_hex(8).upper()
        self.secret_access_key = pysecrets.token_urlsafe(24)
        register(self.secret_access_key)
        self.service: Service | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def target(self) -> b2.S3Target:
        return b2.S3Target(endpoint=self.endpoint, bucket=self.bucket, region=self.region,
                           access_key_id=SecretStr(self.access_key_id),
                           secret_access_key=SecretStr(self.secret_access_key))

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.service = Service(
            "moto_server", (moto_server_path(), "-H", self.host, "-p", str(self.port)),
            log_path=self.workdir / "moto.log",
        )
        self.service.start()
        try:
            wait_for_port(self.host, self.port, timeout=30)
        except TimeoutError:
            self.service.check_alive()
            raise
        b2.create_bucket(self.target())

    @property
    def pid(self) -> int | None:
        return self.service.pid if self.service else None

    def stop(self) -> None:
        if self.service:
            self.service.stop()
            self.service = None
