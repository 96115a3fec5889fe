"""A throwaway certificate authority for the TLS tests (tests/bus/test_bus_*_tls.py): a CA, a
server certificate for 127.0.0.1 and a client certificate it signed, and a second CA that signed
nothing of these (what a client that does not trust the server holds). PEM files, made with the
`cryptography` package; keys unencrypted PKCS#8, which redis-server, Kafka and Python all read."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class TlsFiles:
    ca: Path  # the CA certificate: what a client trusts
    server_cert: Path  # the server's certificate (127.0.0.1), signed by `ca`
    server_key: Path
    server_key_and_chain: Path  # key then certificate in one file (Kafka's PEM keystore)
    client_cert: Path  # a client certificate signed by `ca` (mutual TLS)
    client_key: Path
    other_ca: Path  # a CA that signed none of these


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _ca(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(_name(common_name)).issuer_name(_name(common_name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def _leaf(ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, common_name: str, *,
          server: bool) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(_name(common_name)).issuer_name(ca.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage(
                   [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                   critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def make_tls_files(directory: Path) -> TlsFiles:
    """Write a fresh CA, server and client certificates into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = _ca("peernet-test-ca")
    other, _ = _ca("peernet-test-other-ca")
    server, server_key = _leaf(ca, ca_key, "127.0.0.1", server=True)
    client, client_key = _leaf(ca, ca_key, "peernet-test-client", server=False)
    files = TlsFiles(
        ca=directory / "ca.pem", server_cert=directory / "server.pem",
        server_key=directory / "server.key", server_key_and_chain=directory / "server-keystore.pem",
        client_cert=directory / "client.pem", client_key=directory / "client.key",
        other_ca=directory / "other-ca.pem")
    files.ca.write_bytes(_pem_cert(ca))
    files.other_ca.write_bytes(_pem_cert(other))
    files.server_cert.write_bytes(_pem_cert(server) + _pem_cert(ca))
    files.server_key.write_bytes(_pem_key(server_key))
    files.server_key_and_chain.write_bytes(_pem_key(server_key) + _pem_cert(server) + _pem_cert(ca))
    files.client_cert.write_bytes(_pem_cert(client))
    files.client_key.write_bytes(_pem_key(client_key))
    for key_file in (files.server_key, files.server_key_and_chain, files.client_key):
        key_file.chmod(0o600)
    return files
