#!/usr/bin/env python3
"""Create the keys a secure Flower deployment needs, with the ``cryptography`` package.

Writes into ``OUT_DIR`` (default ``certificates/``):

=========================  ===============================================================
``ca.crt``, ``ca.key``     a private certificate authority (the SuperNodes and ``flwr``
                           trust ``ca.crt``; keep ``ca.key`` off the devices)
``server.pem``,            the SuperLink's TLS certificate, signed by the CA, with a
``server.key``             subjectAltName for every ``--host`` (IP addresses and DNS names),
                           plus ``127.0.0.1`` and ``localhost`` always: the operator's ``flwr``
                           and the proxy reach the hardened SuperLink on its loopback
``supernode-K``,           one ECDSA P-384 key pair per SuperNode in OpenSSH format: the
``supernode-K.pub``        private key for ``flower-supernode --auth-supernode-private-key``,
                           the public key for ``flwr supernode register``
=========================  ===============================================================

Private keys are created with mode 0600. Nothing is overwritten unless ``--force``; with
``--nodes N`` larger than before, only the missing SuperNode keys are added (the CA and
server certificate are kept), so the script can be rerun to enrol more devices.

Usage::

    python scripts/make_certs.py certificates --host 127.0.0.1 --host localhost --nodes 2
    python scripts/make_certs.py certificates --host 10.0.0.5 --host superlink.lab --nodes 10
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("127.0.0.1", "localhost")
CA_FILES = ("ca.crt", "ca.key")
SERVER_FILES = ("server.pem", "server.key")


def node_key_names(index: int) -> tuple[str, str]:
    """File names of SuperNode ``index``'s private and public key."""
    return f"supernode-{index}", f"supernode-{index}.pub"


def _write(path: Path, data: bytes, private: bool) -> None:
    """Write ``data`` to ``path`` atomically; private files are created 0600."""
    tmp = path.with_name(path.name + ".tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(tmp, flags, 0o600 if private else 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600 if private else 0o644)  # the umask may have narrowed it
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _subject_alt_names(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def make_ca(days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA (EC P-384) valid for ``days``."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedavg-relu deployment CA")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, hosts: list[str], days: int
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS server certificate for ``hosts`` (subjectAltName), signed by the CA."""
    if not hosts:
        raise ValueError("at least one --host is needed for the server certificate")
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(_subject_alt_names(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def make_node_keys() -> tuple[bytes, bytes]:
    """An ECDSA P-384 key pair in OpenSSH format (private, public), as Flower reads them."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


def make_certificates(
    out_dir: str | os.PathLike,
    hosts: list[str] | tuple[str, ...] = DEFAULT_HOSTS,
    num_nodes: int = 2,
    force: bool = False,
    days: int = 365,
) -> dict[str, list[Path]]:
    """Create (or complete) the CA, server certificate and ``num_nodes`` SuperNode key pairs.

    Returns ``{"created": [...], "kept": [...]}``. Without ``force``, existing files are kept and
    a CA/server pair that is only half there is an error (nothing is overwritten silently).
    """
    if num_nodes < 0:
        raise ValueError(f"--nodes={num_nodes}: expected a non-negative integer")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    created: list[Path] = []
    kept: list[Path] = []

    existing_ca = [name for name in CA_FILES + SERVER_FILES if (out / name).exists()]
    if existing_ca and not force:
        if len(existing_ca) != len(CA_FILES + SERVER_FILES):
            missing = sorted(set(CA_FILES + SERVER_FILES) - set(existing_ca))
            raise FileExistsError(
                f"{out}: {', '.join(existing_ca)} exist but {', '.join(missing)} do not; "
                "rerun with --force to create a new CA and server certificate"
            )
        kept += [out / name for name in CA_FILES + SERVER_FILES]
    else:
        ca_key, ca_cert = make_ca(days)
        names = [*hosts, *(h for h in DEFAULT_HOSTS if h not in hosts)]  # loopback: operator and proxy
        server_key, server_cert = make_server_cert(ca_key, ca_cert, names, days)
        _write(out / "ca.key", _key_pem(ca_key), private=True)
        _write(out / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
        _write(out / "server.key", _key_pem(server_key), private=True)
        _write(out / "server.pem", server_cert.public_bytes(serialization.Encoding.PEM), private=False)
        created += [out / name for name in CA_FILES + SERVER_FILES]

    for index in range(1, num_nodes + 1):
        private_name, public_name = node_key_names(index)
        if (out / private_name).exists() and (out / public_name).exists() and not force:
            kept += [out / private_name, out / public_name]
            continue
        private, public = make_node_keys()
        _write(out / private_name, private, private=True)
        _write(out / public_name, public, private=False)
        created += [out / private_name, out / public_name]
    return {"created": created, "kept": kept}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", default="certificates", help="output folder (default: certificates)")
    parser.add_argument(
        "--host", action="append", dest="hosts",
        help="an address the SuperNodes and flwr use to reach the SuperLink (IP or DNS name); "
        "repeat for several (127.0.0.1 and localhost are always added)",
    )
    parser.add_argument("--nodes", type=int, default=2, help="number of SuperNode key pairs (default: 2)")
    parser.add_argument("--days", type=int, default=365, help="certificate validity in days (default: 365)")
    parser.add_argument("--force", action="store_true", help="replace existing CA, certificate and keys")
    args = parser.parse_args(argv)
    try:
        result = make_certificates(args.out_dir, args.hosts or list(DEFAULT_HOSTS), args.nodes, args.force, args.days)
    except (FileExistsError, ValueError) as err:
        print(f"make_certs: {err}", file=sys.stderr)
        return 2
    for path in result["created"]:
        print(f"created {path}")
    for path in result["kept"]:
        print(f"kept    {path} (exists; --force replaces it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
