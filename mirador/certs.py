"""`mirador certs`: a private CA and one certificate per role for mutual TLS between the services (--tls-dir).

    mirador certs --out certs/                       # loopback, compose and Kubernetes names
    mirador certs --out certs/ --hosts gpu-3.internal 10.0.0.7

Writes ca.pem, ca-key.pem and, for each role (gateway, scheduler, worker, vision, admin), <role>.pem and
<role>-key.pem. A certificate's common name is its role; the services admit callers by it (common/security.py).
Every certificate names the usual places a service is reached at: localhost, 127.0.0.1, ::1, the compose service
name (<role>) and the Kubernetes Service (mirador-<role>), plus --hosts. The `admin` certificate is for operators
(grpcurl -cacert ca.pem -cert admin.pem -key admin-key.pem ...). Keep ca-key.pem off the servers: it signs new
certificates.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from common.security import ROLES

SERVICE_ROLES = ("gateway", "scheduler", "worker", "vision")


def _names(role: str, extra: Sequence[str], namespace: str) -> list[str]:
    names = ["localhost", "127.0.0.1", "::1"]
    if role in SERVICE_ROLES:
        k8s = f"mirador-{role}"
        names += [
            role,
            k8s,
            f"{k8s}.{namespace}",
            f"{k8s}.{namespace}.svc",
            f"{k8s}.{namespace}.svc.cluster.local",
        ]
    return [*dict.fromkeys([*names, *extra])]


def write_certs(
    out: Path, hosts: Sequence[str] = (), days: int = 365, namespace: str = "default"
) -> list[Path]:
    """Create the CA and every role's key and certificate in `out`; returns the files written."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    written: list[Path] = []

    def save(name: str, data: bytes, private: bool) -> None:
        path = out / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        written.append(path)

    def key_pem(key) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mirador internal CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    save("ca.pem", ca.public_bytes(serialization.Encoding.PEM), private=False)
    save("ca-key.pem", key_pem(ca_key), private=True)

    for role in ROLES:
        key = ec.generate_private_key(ec.SECP256R1())
        sans = []
        for n in _names(role, hosts, namespace):
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                sans.append(x509.DNSName(n))
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, role)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            # every service is a server to its callers and a client of the next service
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        save(f"{role}.pem", cert.public_bytes(serialization.Encoding.PEM), private=False)
        save(f"{role}-key.pem", key_pem(key), private=True)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mirador certs",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out", required=True, help="directory to write the PEM files to (created if missing)"
    )
    parser.add_argument(
        "--hosts", nargs="*", default=[], help="more DNS names or IP addresses the services are reached at"
    )
    parser.add_argument("--days", type=int, default=365, help="validity of every certificate (default: 365)")
    parser.add_argument(
        "--namespace", default="default", help="Kubernetes namespace of the Services (default: default)"
    )
    parser.add_argument("--force", action="store_true", help="overwrite an existing CA in --out")
    ns = parser.parse_args(argv)
    out = Path(ns.out)
    if (out / "ca.pem").exists() and not ns.force:
        print(f"mirador certs: {out / 'ca.pem'} exists; pass --force to replace the CA", file=sys.stderr)
        return 2
    try:
        import cryptography  # noqa: F401
    except ImportError:
        print("mirador certs needs the cryptography package: pip install cryptography", file=sys.stderr)
        return 2
    written = write_certs(out, ns.hosts, ns.days, ns.namespace)
    print(
        f"wrote {len(written)} files to {out}: ca.pem, and <role>.pem / <role>-key.pem for {', '.join(ROLES)}"
    )
    print(f"start each service with --tls-dir {out} (in production, give each only ca.pem and its own pair)")
    return 0
