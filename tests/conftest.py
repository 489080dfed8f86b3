"""Shared test fixtures: a real Mosquitto broker per session and real models built by the project."""

from __future__ import annotations

import getpass
import os
import subprocess
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.broker_address import TlsFiles
from fleet.broker import MosquittoBroker, free_port, wait_for_port


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """One real mosquitto on a free loopback port for the whole session."""
    if not MosquittoBroker.available():
        pytest.fail("the mosquitto binary is missing: install it (apt-get install mosquitto) or run .ci/run")
    b = MosquittoBroker(tmp_path_factory.mktemp("mosquitto"))
    b.start()
    yield b
    b.kill()


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A broker of the test's own, for tests that stop, kill or restart it."""
    b = MosquittoBroker(tmp_path / "mosquitto")
    b.start()
    yield b
    b.kill()


@pytest.fixture(scope="session")
def example_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Build (once per session and variant) the project's real digits models; returns the variant's folder."""
    from fleet.examples.modelgen import build_example

    root = Path(os.environ["EDGEFLEET_TEST_MODELS"]) if "EDGEFLEET_TEST_MODELS" in os.environ else None
    root = root or tmp_path_factory.mktemp("models")
    built: dict[str, Path] = {}

    def get(variant: str = "good") -> Path:
        if variant not in built:
            out = root / variant
            if not (out / "card.json").exists():
                build_example(out, variant=variant)
            built[variant] = out
        return built[variant]

    return get


# --------------------------------------------------------------------------------------------------------------
# TLS: mqtts:// with a CA, a broker certificate and a client certificate.


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ip_address("127.0.0.1"))]), False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write_pem(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    cert_path, key_path = path.with_suffix(".crt"), path.with_suffix(".key")
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[str, TlsFiles]]:
    """A mosquitto that only takes TLS clients with a certificate from the test's CA; yields (url, client files)."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("edgefleet-test-ca", ca_key, None, ca_key)
    ca_path, _ = _write_pem(tmp_path / "ca", ca, ca_key)
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    server_cert, server_key_path = _write_pem(
        tmp_path / "server", _certificate("127.0.0.1", server_key, ca, ca_key), server_key
    )
    client_cert, client_key_path = _write_pem(
        tmp_path / "client", _certificate("fleet", client_key, ca, ca_key), client_key
    )
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(
        f"user {getpass.getuser()}\n"  # as root, mosquitto would switch to a user that cannot read the key
        f"listener {port} 127.0.0.1\nallow_anonymous true\nrequire_certificate true\n"
        f"cafile {ca_path}\ncertfile {server_cert}\nkeyfile {server_key_path}\n"
    )
    proc = subprocess.Popen([MosquittoBroker(tmp_path).binary, "-c", str(conf)], stderr=subprocess.DEVNULL)
    try:
        wait_for_port("127.0.0.1", port)
        yield f"mqtts://127.0.0.1:{port}", TlsFiles(ca_path, client_cert, client_key_path)
    finally:
        proc.kill()
        proc.wait()
