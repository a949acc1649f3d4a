"""Certificate and key inspection: every validation rule of an upload, as pure functions.

The admin forms, ``importconfig`` and the local CA all go through ``inspect_upload``;
each problem is a ``CertificateProblem`` whose message a person can act on.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import itertools
import re
import ssl
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs12

PrivateKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
    | dsa.DSAPrivateKey
)

MIN_RSA_BITS = 2048
ALLOWED_CURVES = ("secp256r1", "secp384r1", "secp521r1")
# A served chain is a leaf and one to three intermediates (sometimes the root too); ten
# is generous. The bound keeps a hostile upload from costing more than a real one.
MAX_CHAIN_CERTIFICATES = 10
# Ten certificates of 10 KB (each with a few hundred names) are 100 KB of PEM; a quarter
# mebibyte per upload (chain, key or PKCS#12 file) leaves room to spare.
MAX_UPLOAD_BYTES = 256 * 1024
# Matched marker by marker rather than with one lazy BEGIN…END pattern: that one
# rescans the rest of the text from every BEGIN without its END (quadratic).
_PEM_MARKER = re.compile(rb"-----(BEGIN|END) ([A-Z0-9 ]+)-----(\r?\n)?")


class CertificateProblem(ValueError):
    """A plain-words reason why a certificate, chain or key cannot be used.

    ``field`` names the form field the problem belongs to.
    """

    def __init__(self, message: str, field: str = "chain_pem") -> None:
        super().__init__(message)
        self.message = message
        self.field = field


@dataclass(frozen=True, slots=True)
class InspectedCertificate:
    """A validated certificate chain (leaf first) with its private key."""

    chain: tuple[x509.Certificate, ...]
    chain_pem: str
    key_pem: bytes  # PKCS#8, unencrypted: encrypt before storing
    reordered: bool
    complete: bool

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]


def describe(cert: x509.Certificate) -> str:
    """A short name for a certificate in messages: its subject, as RFC 4514."""
    return cert.subject.rfc4514_string() or f"serial {cert.serial_number:x}"


def pem_blocks(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(label, block) of each ``-----BEGIN label-----`` line up to the next matching END, in linear time."""
    begins: list[tuple[int, int, bytes]] = []  # (start, end of the BEGIN line, label)
    ends: dict[bytes, list[tuple[int, int]]] = {}  # label -> (start, end) of its END markers
    for match in _PEM_MARKER.finditer(data):
        label = match.group(2)
        if match.group(1) == b"END":
            ends.setdefault(label, []).append((match.start(), match.end(2) + 5))
        elif match.group(3):
            begins.append((match.start(), match.end(), label))
    next_end = dict.fromkeys(ends, 0)  # only ever moves forward: each marker is passed once
    done = 0
    for start, body, label in begins:
        if start < done:  # inside the block just found
            continue
        candidates = ends.get(label, [])
        index = next_end.get(label, 0)
        while index < len(candidates) and candidates[index][0] < body:
            index += 1
        next_end[label] = index
        if index < len(candidates):
            done = candidates[index][1]
            yield label, data[start:done]


def split_pem_blocks(data: bytes) -> tuple[list[bytes], list[bytes]]:
    """Return (certificate blocks, private key blocks) found in ``data``."""
    certs, keys = [], []
    for label, block in pem_blocks(data):
        if label == b"CERTIFICATE":
            certs.append(block)
        elif label.endswith(b"PRIVATE KEY"):
            keys.append(block)
    return certs, keys


def check_upload_size(data: bytes, what: str, field: str) -> None:
    if len(data) > MAX_UPLOAD_BYTES:
        raise CertificateProblem(
            f"{what} is {len(data) // 1024} KiB; at most {MAX_UPLOAD_BYTES // 1024} KiB are "
            "accepted, which is far more than any certificate needs.",
            field,
        )


def check_chain_length(count: int) -> None:
    if count > MAX_CHAIN_CERTIFICATES:
        raise CertificateProblem(
            f"The upload holds {count} certificates; a chain of at most {MAX_CHAIN_CERTIFICATES} "
            "is accepted (a leaf and its intermediates are rarely more than 4). Keep only the "
            "certificate and the ones that issued it."
        )


def load_certificates(data: bytes, what: str = "The certificate chain") -> list[x509.Certificate]:
    blocks, _ = split_pem_blocks(data)
    if not blocks:
        raise CertificateProblem(
            f"{what} is not PEM: paste blocks that start with "
            "'-----BEGIN CERTIFICATE-----'."
        )
    certs = []
    for number, block in enumerate(blocks, start=1):
        try:
            certs.append(x509.load_pem_x509_certificate(block))
        except ValueError:
            raise CertificateProblem(
                f"{what}: certificate number {number} is damaged and cannot be read."
            ) from None
    return certs


def load_private_key(data: bytes, passphrase: bytes | None) -> PrivateKey:
    _, blocks = split_pem_blocks(data)
    if not blocks:
        raise CertificateProblem(
            "The private key is not PEM: paste a block that starts with "
            "'-----BEGIN PRIVATE KEY-----' (or RSA / EC PRIVATE KEY).",
            "key_pem",
        )
    if len(blocks) > 1:
        raise CertificateProblem("Paste exactly one private key, not several.", "key_pem")
    block = blocks[0]
    encrypted = b"ENCRYPTED" in block
    if encrypted and not passphrase:
        raise CertificateProblem(
            "The private key is encrypted: enter its passphrase.", "passphrase"
        )
    try:
        key = serialization.load_pem_private_key(block, passphrase if encrypted else None)
    except ValueError:
        if encrypted:
            raise CertificateProblem(
                "The passphrase does not open the private key.", "passphrase"
            ) from None
        raise CertificateProblem("The private key is damaged and cannot be read.", "key_pem") from None
    except TypeError:
        raise CertificateProblem(
            "The private key cannot be read with this passphrase.", "passphrase"
        ) from None
    except Exception:
        raise CertificateProblem(
            "The private key uses a format or algorithm that is not supported.", "key_pem"
        ) from None
    return key  # type: ignore[return-value]


def _looks_like_pkcs12(data: bytes) -> bool:
    """Whether ``data`` opens like a PKCS#12 PFX: a DER SEQUENCE whose first field is version 3.

    OpenSSL says "invalid password or PKCS12 data" for both; this tells a file that is
    not PKCS#12 at all from one that only needs its passphrase.
    """
    if len(data) < 5 or data[0] != 0x30:
        return False
    length_bytes = data[1] - 0x80 if data[1] > 0x80 else 0
    if length_bytes > 4:
        return False
    return data[2 + length_bytes:5 + length_bytes] == b"\x02\x01\x03"


def load_pkcs12(data: bytes, passphrase: bytes | None) -> tuple[PrivateKey, list[x509.Certificate]]:
    if not _looks_like_pkcs12(data):
        raise CertificateProblem(
            "The PKCS#12 file is not PKCS#12 (.p12/.pfx), or it is damaged.", "pkcs12_file"
        )
    try:
        key, cert, extra = pkcs12.load_key_and_certificates(data, passphrase or None)
    except ValueError:
        if not passphrase:
            raise CertificateProblem(
                "The PKCS#12 file is protected by a passphrase: enter it.", "passphrase"
            ) from None
        raise CertificateProblem(
            "The passphrase does not open the PKCS#12 file.", "passphrase"
        ) from None
    if key is None or cert is None:
        raise CertificateProblem(
            "The PKCS#12 file must hold a certificate and its private key.", "pkcs12_file"
        )
    return key, [cert, *extra]  # type: ignore[return-value]


def key_type_and_size(key: object) -> tuple[str, int]:
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return "RSA", key.key_size
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}", key.curve.key_size
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "Ed25519", 256
    if isinstance(key, ed448.Ed448PrivateKey | ed448.Ed448PublicKey):
        return "Ed448", 456
    if isinstance(key, dsa.DSAPrivateKey | dsa.DSAPublicKey):
        return "DSA", key.key_size
    return type(key).__name__, 0


def check_key_strength(key: object) -> None:
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size < MIN_RSA_BITS:
        raise CertificateProblem(
            f"The RSA key has {key.key_size} bits; at least {MIN_RSA_BITS} are required.",
            "key_pem",
        )
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name not in ALLOWED_CURVES:
        raise CertificateProblem(
            f"The EC key uses the curve {key.curve.name}; use P-256, P-384 or P-521.", "key_pem"
        )
    if isinstance(key, dsa.DSAPrivateKey):
        raise CertificateProblem("DSA keys are not accepted by TLS clients; use RSA or EC.", "key_pem")


def _public_der(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def is_self_signed(cert: x509.Certificate) -> bool:
    return issued_by(cert, cert)


def _key_identifier(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> bytes | None:
    """The certificate's subject (or authority) key identifier, if it has a readable one."""
    try:
        value = cert.extensions.get_extension_for_class(kind).value
    except (x509.ExtensionNotFound, ValueError):
        return None
    if isinstance(value, x509.SubjectKeyIdentifier):
        return value.digest
    if isinstance(value, x509.AuthorityKeyIdentifier):
        return value.key_identifier
    return None


# Signature checks spent looking for one certificate's issuer. Within the chain limit every
# candidate gets its check; beyond it the walk stays linear however many certificates share a name.
MAX_ISSUER_TRIES = MAX_CHAIN_CERTIFICATES


class _IssuerIndex:
    """The certificates not yet placed in the chain, by subject name and by key identifier.

    Finding an issuer is a look-up and a few signature checks, never a scan of the
    whole upload: its issuer's key identifier (RFC 5280 asks every CA-issued
    certificate for one) names the candidate, and the subject name names the rest.
    """

    def __init__(self, certs: Iterable[x509.Certificate]) -> None:
        # Dicts as ordered sets: upload order decides between equal candidates.
        self.by_subject: dict[x509.Name, dict[x509.Certificate, None]] = {}
        self.by_key_id: dict[bytes, dict[x509.Certificate, None]] = {}
        for cert in certs:
            self.by_subject.setdefault(cert.subject, {})[cert] = None
            key_id = _key_identifier(cert, x509.SubjectKeyIdentifier)
            if key_id is not None:
                self.by_key_id.setdefault(key_id, {})[cert] = None

    def take(self, cert: x509.Certificate) -> None:
        self.by_subject.get(cert.subject, {}).pop(cert, None)
        key_id = _key_identifier(cert, x509.SubjectKeyIdentifier)
        if key_id is not None:
            self.by_key_id.get(key_id, {}).pop(cert, None)

    def issuer_of(self, cert: x509.Certificate) -> x509.Certificate | None:
        authority = _key_identifier(cert, x509.AuthorityKeyIdentifier)
        by_key = self.by_key_id.get(authority, {}) if authority is not None else {}
        tried: set[x509.Certificate] = set()
        for candidate in itertools.chain(by_key, self.by_subject.get(cert.issuer, {})):
            if candidate in tried:  # named by both its key identifier and its subject
                continue
            if issued_by(cert, candidate):
                return candidate
            tried.add(candidate)
            if len(tried) == MAX_ISSUER_TRIES:
                break
        return None


def order_chain(
    certs: Sequence[x509.Certificate], key: PrivateKey
) -> tuple[tuple[x509.Certificate, ...], bool]:
    """Put the certificate of ``key`` first and each issuer after its subject.

    Returns the ordered chain and whether the input was out of order. The walk
    goes from the leaf up, and costs at most ``MAX_ISSUER_TRIES + 1`` signature
    checks per certificate, whatever their order or names.
    """
    unique = list(dict.fromkeys(certs))
    key_der = _public_der(key.public_key())
    leaf = next((c for c in unique if _public_der(c.public_key()) == key_der), None)
    if leaf is None:
        raise CertificateProblem(
            "The private key does not match the certificate: they are not a pair.", "key_pem"
        )
    index = _IssuerIndex(unique)
    index.take(leaf)
    ordered = [leaf]
    while len(ordered) < len(unique) and not is_self_signed(ordered[-1]):
        issuer = index.issuer_of(ordered[-1])
        if issuer is None:
            break
        index.take(issuer)
        ordered.append(issuer)
    if len(ordered) < len(unique):
        placed = set(ordered)
        stray = next(c for c in unique if c not in placed)
        raise CertificateProblem(
            f"'{describe(stray)}' is not part of the chain of '{describe(leaf)}': "
            "remove it, or add the certificates that link it."
        )
    return tuple(ordered), unique != ordered


def check_validity(chain: Iterable[x509.Certificate], now: dt.datetime) -> None:
    for index, cert in enumerate(chain):
        role = "The certificate" if index == 0 else f"The chain certificate '{describe(cert)}'"
        if now < cert.not_valid_before_utc:
            raise CertificateProblem(
                f"{role} is not valid yet: it starts on {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC."
            )
        if now > cert.not_valid_after_utc:
            raise CertificateProblem(
                f"{role} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC."
            )


def check_signature_hash(cert: x509.Certificate) -> None:
    algorithm = cert.signature_hash_algorithm
    if isinstance(algorithm, hashes.SHA1 | hashes.MD5):
        raise CertificateProblem(
            f"'{describe(cert)}' is signed with {algorithm.name.upper()}, which clients refuse."
        )


@functools.lru_cache(maxsize=1)
def system_roots() -> tuple[x509.Certificate, ...]:
    """The machine's trusted roots (the OpenSSL default CA file), read once."""
    paths = ssl.get_default_verify_paths()
    candidates = [paths.cafile, paths.openssl_cafile, "/etc/ssl/certs/ca-certificates.crt"]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            try:
                with warnings.catch_warnings():
                    # Some long-lived roots carry non-positive serials; they still verify.
                    warnings.simplefilter("ignore")
                    return tuple(x509.load_pem_x509_certificates(Path(candidate).read_bytes()))
            except ValueError:
                continue
    return ()


def chain_is_complete(
    chain: Sequence[x509.Certificate], known_issuers: Sequence[x509.Certificate] = ()
) -> bool:
    """True when the chain ends at a root, or at a certificate whose issuer is trusted."""
    last = chain[-1]
    if is_self_signed(last):
        return True
    return any(issued_by(last, root) for root in (*known_issuers, *system_roots()))


def incomplete_chain_message(chain: Sequence[x509.Certificate]) -> str:
    """Which certificate a chain that ends short of a trusted root lacks, by its subject.

    Ending at the leaf, the chain lacks the intermediate that issued it (CAs issue
    leaves from intermediates); ending at an intermediate, it lacks that one's root,
    which this machine does not trust either.
    """
    last = chain[-1]
    issuer = last.issuer.rfc4514_string()
    accept = "or tick 'Accept an incomplete chain' if your clients trust that issuer directly."
    if len(chain) == 1:
        return (
            f"The chain is incomplete: the intermediate certificate '{issuer}', which issued "
            f"'{describe(last)}', is missing. Append it after the certificate (CAs send it with "
            f"the certificate, often as chain.pem or fullchain.pem), {accept}"
        )
    return (
        f"The chain is incomplete: it ends at the intermediate '{describe(last)}', whose issuer, "
        f"the root '{issuer}', is neither included nor trusted by this machine. Append that root "
        f"certificate after the intermediate, {accept}"
    )


def to_pem(chain: Iterable[x509.Certificate]) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode("ascii") for c in chain)


def key_to_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def dns_names(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [name.lower() for name in ext.value.get_values_for_type(x509.DNSName)]


def fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def inspect_upload(
    *,
    chain_pem: bytes = b"",
    key_pem: bytes = b"",
    passphrase: bytes | None = None,
    pkcs12_data: bytes | None = None,
    now: dt.datetime,
    known_issuers: Sequence[x509.Certificate] = (),
    allow_incomplete: bool = False,
) -> InspectedCertificate:
    """Validate an upload (PEM chain + key, or PKCS#12) and return it normalised.

    Sizes and the number of certificates are checked before anything is parsed, so
    the work is bounded whatever is uploaded.
    """
    check_upload_size(chain_pem, "The certificate chain", "chain_pem")
    check_upload_size(key_pem, "The private key", "key_pem")
    check_upload_size(pkcs12_data or b"", "The PKCS#12 file", "pkcs12_file")
    pem_count = len(split_pem_blocks(chain_pem)[0])
    if pkcs12_data:
        key, certs = load_pkcs12(pkcs12_data, passphrase)
        check_chain_length(len(certs) + pem_count)
        if chain_pem.strip():
            certs += load_certificates(chain_pem)
    else:
        if not chain_pem.strip():
            raise CertificateProblem("Paste or upload the certificate chain (PEM).")
        check_chain_length(pem_count)
        certs = load_certificates(chain_pem)
        if not key_pem.strip():
            # A single paste holding both the chain and the key is common.
            _, keys_in_chain = split_pem_blocks(chain_pem)
            if not keys_in_chain:
                raise CertificateProblem("Paste or upload the private key (PEM).", "key_pem")
            key_pem = keys_in_chain[0]
        key = load_private_key(key_pem, passphrase)
    check_key_strength(key)
    chain, reordered = order_chain(certs, key)
    check_validity(chain, now)
    for cert in chain:
        check_signature_hash(cert)
    complete = chain_is_complete(chain, known_issuers)
    if not complete and not allow_incomplete:
        raise CertificateProblem(incomplete_chain_message(chain))
    return InspectedCertificate(
        chain=chain,
        chain_pem=to_pem(chain),
        key_pem=key_to_pem(key),
        reordered=reordered,
        complete=complete,
    )


def inspect_ca_bundle(data: bytes, now: dt.datetime) -> list[x509.Certificate]:
    """Validate a bundle of CA certificates (for client auth or upstream verification)."""
    certs = load_certificates(data, "The CA bundle")
    for cert in certs:
        try:
            constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is not None and not constraints.ca:
            raise CertificateProblem(
                f"'{describe(cert)}' is not a CA certificate (basicConstraints CA:FALSE); "
                "a bundle holds the CAs that issue certificates, not the certificates themselves.",
                "bundle_pem",
            )
        if now > cert.not_valid_after_utc:
            raise CertificateProblem(
                f"The CA '{describe(cert)}' expired on {cert.not_valid_after_utc:%Y-%m-%d} UTC.",
                "bundle_pem",
            )
    return certs


def inspect_crls(
    data: bytes, cas: Sequence[x509.Certificate], now: dt.datetime
) -> list[x509.CertificateRevocationList]:
    """Validate CRLs: PEM, issued and signed by a CA of the bundle, not past their next update."""
    blocks = [block for label, block in pem_blocks(data) if label == b"X509 CRL"]
    if not blocks:
        raise CertificateProblem(
            "The revocation list is not PEM: paste blocks that start with '-----BEGIN X509 CRL-----'.",
            "crl_pem",
        )
    crls = []
    for number, block in enumerate(blocks, start=1):
        try:
            crl = x509.load_pem_x509_crl(block)
        except ValueError:
            raise CertificateProblem(
                f"CRL number {number} is damaged and cannot be read.", "crl_pem"
            ) from None
        issuer = next((ca for ca in cas if ca.subject == crl.issuer), None)
        if issuer is None or not crl.is_signature_valid(issuer.public_key()):  # type: ignore[arg-type]
            raise CertificateProblem(
                f"CRL number {number} was not issued by a CA of this bundle "
                f"(its issuer is '{crl.issuer.rfc4514_string()}').",
                "crl_pem",
            )
        next_update = crl.next_update_utc
        if next_update is not None and next_update < now:
            raise CertificateProblem(
                f"CRL number {number} expired on {next_update:%Y-%m-%d %H:%M} UTC: "
                "upload a fresh one from its CA.",
                "crl_pem",
            )
        crls.append(crl)
    return crls
