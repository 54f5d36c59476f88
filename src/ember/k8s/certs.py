"""Make the webhook's TLS material and fill in ``caBundle``.

The API server calls webhooks over HTTPS only and checks the serving
certificate against the ``caBundle`` of the webhook configuration, so the
installer needs a CA, a server certificate for the Service's DNS names, and
the CA spliced into the manifest. ``cryptography`` does the X.509 work.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ember.errors import EmberError
from ember.util import atomic_write

WEBHOOK_KINDS = ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration")


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(cn: str = "ember-webhook-ca", days: int = 3650) -> tuple[bytes, bytes]:
    """A self-signed CA: (certificate PEM, key PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def make_server_cert(ca_cert_pem: bytes, ca_key_pem: bytes, names: list[str],
                     days: int = 825) -> tuple[bytes, bytes]:
    """A serving certificate for DNS names / IP addresses, signed by the CA."""
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = []
    for n in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            alt.append(x509.DNSName(n))
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(names[0]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_cert.public_key()), critical=False)  # type: ignore[arg-type]
            .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def service_names(service: str, namespace: str) -> list[str]:
    return [f"{service}.{namespace}.svc", f"{service}.{namespace}.svc.cluster.local",
            f"{service}.{namespace}", service]


def write_certs(out_dir: Path, names: list[str]) -> dict[str, Path]:
    """ca.crt, tls.crt, tls.key (0600) in out_dir; returns their paths."""
    ca_cert, ca_key = make_ca()
    cert, key = make_server_cert(ca_cert, ca_key, names)
    paths = {"ca": out_dir / "ca.crt", "cert": out_dir / "tls.crt", "key": out_dir / "tls.key"}
    atomic_write(paths["ca"], ca_cert)
    atomic_write(paths["cert"], cert)
    atomic_write(paths["key"], key, mode=0o600)
    return paths


def fill_ca_bundle(manifest_text: str, ca_pem: bytes) -> str:
    """Set caBundle on every webhook of every webhook configuration in the text."""
    try:
        docs = list(yaml.safe_load_all(manifest_text))
    except yaml.YAMLError:
        raise EmberError("webhook manifest: not valid YAML") from None
    bundle = base64.b64encode(ca_pem).decode()
    touched = 0
    for doc in docs:
        if isinstance(doc, dict) and doc.get("kind") in WEBHOOK_KINDS:
            for hook in doc.get("webhooks") or []:
                hook.setdefault("clientConfig", {})["caBundle"] = bundle
                touched += 1
    if not touched:
        raise EmberError("webhook manifest: no MutatingWebhookConfiguration or "
                         "ValidatingWebhookConfiguration webhooks in it")
    return yaml.safe_dump_all([d for d in docs if d is not None], sort_keys=False)
