"""The same migration inside TLS (the HMAC handshake runs inside it), each side verifying the other's
certificate and name."""

from __future__ import annotations

import subprocess
from pathlib import Path

from umemd.protocol import PAGE_SIZE

from .conftest import SOURCE_SIZE, Migration
from .test_pull import finish


def self_signed(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=umem-test",
                    "-addext", "subjectAltName=DNS:umem-test", "-days", "1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def test_migration_over_tls(migration: Migration, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    tls = ["--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(cert), "--tls-name", "umem-test"]
    migration.pull(*tls)
    guest = migration.guest("sequential", threads=2, touches=100)
    migration.serve(*tls)
    assert finish(migration, guest)["present"] == SOURCE_SIZE // PAGE_SIZE
