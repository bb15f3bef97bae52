"""Credentials of a secure deployment: TLS certificates and SuperNode authentication keys.

Flower's SuperLink authenticates SuperNodes (``--enable-supernode-auth``) by elliptic-curve
keys: each SuperNode signs its requests with its private key
(``flower-supernode --auth-supernode-private-key``) and the SuperLink only accepts the
public keys registered with it (``flwr supernode register``). Flower requires TLS for it.

``fedsim auth keys`` writes what such a deployment needs (:func:`make_node_keys`, and with
``--tls-host`` :func:`make_tls`: a CA of its own and a SuperLink certificate signed by
it, for trying a deployment out; use your organisation's CA for a real one), and
``fedsim auth register`` registers the nodes' public keys (:func:`register_nodes`).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

# Flower accepts the NIST curves; P-384 is the one its documentation uses
NODE_KEY_CURVE = ec.SECP384R1


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a SuperLink's TLS: the CA certificate, the server certificate and key."""

    ca: Path
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _subject_alternative_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_tls(folder: Path, hosts: list[str], days: int = 30) -> TlsFiles:
    """A new CA and a SuperLink certificate for ``hosts`` (names or IP addresses) signed
    by it, valid for ``days``; written as ``ca.pem``, ``server.pem``, ``server.key``."""
    if not hosts:
        raise ValueError("the SuperLink certificate needs at least one host name or address")
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())

    def certificate(subject: str, public_key, extension: x509.ExtensionType) -> x509.Certificate:
        return (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name("fedsim CA"))
                .public_key(public_key).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=days))
                .add_extension(extension, critical=False).sign(ca_key, hashes.SHA256()))

    ca = certificate("fedsim CA", ca_key.public_key(), x509.BasicConstraints(ca=True, path_length=None))
    server = certificate(hosts[0], key.public_key(),
                         x509.SubjectAlternativeName([_subject_alternative_name(h) for h in hosts]))
    files = TlsFiles(folder / "ca.pem", folder / "server.pem", folder / "server.key")
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    files.key.chmod(0o600)
    return files


def make_node_key(private_key: Path) -> Path:
    """A SuperNode key pair in OpenSSH format: ``private_key`` and ``private_key.pub``
    (what ``ssh-keygen -t ecdsa -b 384 -N ''`` writes); returns the public key's path."""
    key = ec.generate_private_key(NODE_KEY_CURVE())
    private_key.parent.mkdir(parents=True, exist_ok=True)
    private_key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                              serialization.NoEncryption()))
    private_key.chmod(0o600)
    public_key = private_key.with_name(private_key.name + ".pub")
    public_key.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                         serialization.PublicFormat.OpenSSH))
    return public_key


def make_node_keys(folder: Path, num_nodes: int) -> list[Path]:
    """Key pairs ``supernode-<i>`` / ``supernode-<i>.pub`` for ``num_nodes`` SuperNodes;
    returns the private keys' paths."""
    if num_nodes < 1:
        raise ValueError(f"num_nodes: {num_nodes} is not a number of SuperNodes (>= 1)")
    keys = [folder / f"supernode-{i}" for i in range(num_nodes)]
    for key in keys:
        make_node_key(key)
    return keys


def register_nodes(public_keys: list[Path], superlink: str, root_certificates: Path) -> list[int]:
    """Register SuperNode public keys with the SuperLink at ``superlink`` (HOST:PORT, TLS
    verified against ``root_certificates``) with ``flwr supernode register``; returns the
    node id Flower gives each key."""
    from fedsim.deploy import flwr_connection

    node_ids = []
    with flwr_connection(superlink, root_certificates) as (flwr, env, connection):
        for public_key in public_keys:
            result = subprocess.run([flwr, "supernode", "register", str(public_key), connection, "--format", "json"],
                                    env=env, capture_output=True, text=True, check=False)
            reply = _last_json(result.stdout)
            if result.returncode != 0 or not reply.get("success"):
                reason = reply.get("error-message") or (result.stdout + result.stderr).strip()[-500:]
                raise RuntimeError(f"{public_key}: registration refused by {superlink}: {reason}")
            node_ids.append(int(reply["node-id"]))
    return node_ids


def _last_json(text: str) -> dict:
    """The JSON object ``flwr ... --format json`` prints (after any other output)."""
    start = text.find("{")
    try:
        return json.loads(text[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        return {}
