"""Cryptographic primitives of secure aggregation, and nothing else.

Every primitive comes from the ``cryptography`` package; this module only fixes how they
are combined, so the protocol above it (:mod:`fedembed.secagg.protocol`) never touches a
raw cipher:

- **Key agreement**: X25519 (:class:`KeyPair`, :func:`agree`).
- **Key derivation**: HKDF-SHA256 with a domain-separation label (:func:`derive_key`).
  Every key used for a purpose is derived with a label naming that purpose and the context
  (run, round, phase, vector), so no key is ever used twice for two things.
- **Share encryption**: ChaCha20-Poly1305 AEAD (:func:`seal`, :func:`open_sealed`) with a
  random 96-bit nonce and associated data that binds sender, receiver, run and round: a
  ciphertext moved to another pair, round or run, or altered by one bit, fails to open.
- **Mask keystream**: ChaCha20 (:func:`keystream`), keyed by a derived 256-bit key, read
  as unsigned integers of the vector's dtype (uint8/16/32, i.e. modulo 2^8/16/32).
  Unlike Flower 1.42's SecAgg+ (numpy's Mersenne Twister seeded with the key folded to 32
  bits), the mask is a cryptographic PRG of a full-strength key.
- **DP noise randomness**: the same ChaCha20 keystream read in order (:class:`KeyStream`),
  the only source of the noise an organisation releases (:mod:`fedembed.dp.noise`).
- **Secret sharing**: Shamir t-of-n over the prime field GF(2^521 - 1)
  (:func:`shamir_split`, :func:`shamir_combine`); a 32-byte secret is an element of it.
- **Signatures**: an organisation's long-term identity key (:class:`SigningKey`,
  :class:`VerifyKey`): ECDSA over P-256/P-384/P-521 with SHA-2 or Ed25519, in OpenSSH
  format (the same key type Flower's SuperNode authentication uses). Every signed
  message is a :func:`statement`: a domain-separated, length-prefixed encoding of its
  kind and parts, so a signature for one purpose never verifies for another.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedembed.errors import FedembedError

PRIME = 2**521 - 1
"""The Mersenne prime of the Shamir field."""
SHARE_BYTES = 66
"""Bytes of one field element (521 bits), big-endian."""
KEY_BYTES = 32
NONCE_BYTES = 12
DOMAIN = b"fedembed/secagg/v1/"


class CryptoError(FedembedError, ValueError):
    """A ciphertext that does not open, a key of the wrong size, too few shares."""


# --------------------------------------------------------------------------- X25519
@dataclass(frozen=True)
class KeyPair:
    """An X25519 key pair (raw 32-byte encodings).

    Parameters
    ----------
    private : bytes
        Private key, 32 bytes.
    public : bytes
        Public key, 32 bytes.
    """

    private: bytes = field(repr=False)
    public: bytes

    def __repr__(self) -> str:  # never print the private half
        return f"KeyPair(public={self.public.hex()}, private=<hidden>)"

    @staticmethod
    def generate() -> KeyPair:
        """A fresh key pair from the operating system's randomness."""
        sk = X25519PrivateKey.generate()
        return KeyPair(_raw_private(sk), _raw_public(sk.public_key()))

    @staticmethod
    def from_private(private: bytes) -> KeyPair:
        """The key pair of a raw private key (after reconstruction from shares)."""
        sk = _private(private)
        return KeyPair(private, _raw_public(sk.public_key()))


def _raw_private(sk: X25519PrivateKey) -> bytes:
    return sk.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def _raw_public(pk: X25519PublicKey) -> bytes:
    return pk.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _private(raw: bytes) -> X25519PrivateKey:
    if len(raw) != KEY_BYTES:
        raise CryptoError(f"an X25519 private key has {KEY_BYTES} bytes, got {len(raw)}")
    return X25519PrivateKey.from_private_bytes(raw)


_PROBE = X25519PrivateKey.from_private_bytes(hashlib.sha256(DOMAIN + b"low-order-probe").digest())


def check_public_key(raw: bytes) -> None:
    """Raise :class:`CryptoError` unless ``raw`` is a usable X25519 public key.

    A low-order point (any of the small-subgroup encodings, canonical or not) is refused:
    every private key's clamped scalar is a multiple of the cofactor 8, so agreement with
    such a point is all zeros whatever the private key, and a mask or share key derived
    from it would be known to everyone.
    """
    if not isinstance(raw, bytes | bytearray) or len(raw) != KEY_BYTES:
        raise CryptoError(f"an X25519 public key has {KEY_BYTES} bytes")
    try:
        _PROBE.exchange(X25519PublicKey.from_public_bytes(bytes(raw)))
    except ValueError as exc:  # cryptography refuses an all-zero shared secret
        raise CryptoError("X25519 public key is a low-order point") from exc


def agree(private: bytes, peer_public: bytes) -> bytes:
    """X25519 shared secret of our private key and a peer's public key (32 bytes).

    Raises
    ------
    CryptoError
        For a malformed key or a low-order peer key (all-zero shared secret).
    """
    check_public_key(peer_public)
    try:
        return _private(private).exchange(X25519PublicKey.from_public_bytes(bytes(peer_public)))
    except ValueError as exc:  # low-order point
        raise CryptoError(f"key agreement failed: {exc}") from exc


# --------------------------------------------------------------------------- HKDF
def derive_key(secret: bytes, label: str, context: bytes = b"") -> bytes:
    """A 256-bit key for one purpose: HKDF-SHA256(secret, info = domain | label | context).

    Parameters
    ----------
    secret : bytes
        Input keying material (an X25519 shared secret or a random seed).
    label : str
        The purpose, e.g. ``"share-key"`` or ``"mask/pair/values"``.
    context : bytes
        What else the key is bound to (run digest, round, parties).
    """
    info = DOMAIN + label.encode() + b"|" + context
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


# --------------------------------------------------------------------------- AEAD
def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """ChaCha20-Poly1305 encryption: ``nonce || ciphertext || tag``.

    Parameters
    ----------
    key : bytes
        32-byte key (from :func:`derive_key`).
    plaintext : bytes
        What to encrypt.
    associated : bytes
        Authenticated, not encrypted: who sends to whom, in which run and round.
    """
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated)


def open_sealed(key: bytes, sealed: bytes, associated: bytes) -> bytes:
    """Inverse of :func:`seal`.

    Raises
    ------
    CryptoError
        When the ciphertext, the nonce, the tag or the associated data were altered, or
        the ciphertext was made for another sender, receiver, round or run.
    """
    if len(sealed) < NONCE_BYTES + 16:
        raise CryptoError("ciphertext too short")
    try:
        return ChaCha20Poly1305(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], associated)
    except InvalidTag as exc:
        raise CryptoError("ciphertext failed authentication (tampered, replayed or misrouted)") from exc


# --------------------------------------------------------------------------- PRG
def keystream(key: bytes, n: int, dtype: type = np.uint32) -> np.ndarray:
    """``n`` pseudo-random unsigned integers of ``dtype`` from ChaCha20 under ``key``.

    The key is used for this one stream only (callers derive it with :func:`derive_key`
    from a label naming the vector), so a zero nonce is safe. Uniform over the dtype's
    range: a mask modulo 2^8, 2^16 or 2^32. Deterministic in ``(key, n, dtype)``, and a
    prefix of a longer stream with the same key.
    """
    out = np.zeros(n, dtype=dtype)
    keystream_add(key, out)
    return out


def keystream_add(key: bytes, target: np.ndarray, subtract: bool = False, chunk: int = 1 << 22) -> None:
    """Add (or subtract) :func:`keystream` ``(key, target.size, target.dtype)`` into ``target`` in place.

    The same modular arithmetic as ``target += keystream(...)``, generated ``chunk``
    elements at a time, so masking a vector costs no second vector of memory.
    """
    if len(key) != KEY_BYTES:
        raise CryptoError(f"a keystream key has {KEY_BYTES} bytes, got {len(key)}")
    if not target.flags.c_contiguous or target.dtype.kind != "u":
        raise ValueError("target must be a C-contiguous unsigned integer array")
    flat = target.reshape(-1)
    dtype = target.dtype
    enc = Cipher(algorithms.ChaCha20(key, b"\0" * 16), mode=None).encryptor()
    buf = np.empty(min(chunk, flat.size) * dtype.itemsize, dtype=np.uint8)
    zeros = bytes(buf.size)
    for start in range(0, flat.size, chunk):
        stop = min(start + chunk, flat.size)
        nbytes = (stop - start) * dtype.itemsize
        enc.update_into(zeros[:nbytes], memoryview(buf)[:nbytes])
        stream = buf[:nbytes].view(dtype.newbyteorder("<")).astype(dtype, copy=False)
        if subtract:
            flat[start:stop] -= stream
        else:
            flat[start:stop] += stream


class KeyStream:
    """A ChaCha20 keystream read in order: the cryptographic random source of released DP noise.

    Reads continue where the last one stopped, so ``read(a) + read(b) == read(a + b)``;
    the stream is the one :func:`keystream` gives under the same key (a zero nonce: the key
    must serve this stream only; derive it with :func:`derive_key` from a label naming it).
    Without the key, its output cannot be told from uniform bytes or predicted, unlike
    numpy's generators, whose state an observer of enough outputs reconstructs.

    Parameters
    ----------
    key : bytes
        32 bytes.
    """

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise CryptoError(f"a keystream key has {KEY_BYTES} bytes, got {len(key)}")
        self._enc = Cipher(algorithms.ChaCha20(bytes(key), b"\0" * 16), mode=None).encryptor()

    def __repr__(self) -> str:  # never print the key
        return "KeyStream(<key>)"

    def read(self, nbytes: int) -> bytes:
        """The next ``nbytes`` bytes of the stream."""
        return self._enc.update(bytes(int(nbytes)))

    def words(self, n: int) -> np.ndarray:
        """The next ``n`` little-endian uint64 words of the stream (uniform over [0, 2^64))."""
        return np.frombuffer(self.read(8 * int(n)), dtype="<u8").astype(np.uint64, copy=False)


# --------------------------------------------------------------------------- Shamir
def shamir_split(secret: bytes, threshold: int, xs: list[int]) -> dict[int, bytes]:
    """Split ``secret`` into shares at points ``xs``; any ``threshold`` of them recover it.

    Parameters
    ----------
    secret : bytes
        At most 65 bytes (an element of GF(2^521 - 1)).
    threshold : int
        Shares needed (t), ``1 <= t <= len(xs)``.
    xs : list[int]
        Distinct non-zero evaluation points (the receivers' party ids).

    Returns
    -------
    dict[int, bytes]
        Point -> share value (66 bytes, big-endian).
    """
    if not 1 <= threshold <= len(xs):
        raise CryptoError(f"threshold {threshold} must be in [1, {len(xs)}]")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise CryptoError("share points must be distinct and non-zero")
    if len(secret) >= SHARE_BYTES:
        raise CryptoError("secret too long for the field")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    out = {}
    for x in xs:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        out[x] = y.to_bytes(SHARE_BYTES, "big")
    return out


def shamir_combine(shares: dict[int, bytes], threshold: int, length: int = KEY_BYTES) -> bytes:
    """Recover a secret of ``length`` bytes from at least ``threshold`` shares (Lagrange at 0).

    Raises
    ------
    CryptoError
        With fewer than ``threshold`` shares, a malformed share, or a result that does
        not fit ``length`` bytes (inconsistent shares).
    """
    if len(shares) < threshold:
        raise CryptoError(f"{len(shares)} shares, {threshold} needed")
    pts = sorted(shares.items())[:threshold]
    for x, y in pts:
        if len(y) != SHARE_BYTES or not 0 < x < PRIME:
            raise CryptoError("malformed share")
    secret = 0
    for i, (xi, yi) in enumerate(pts):
        num, den = 1, 1
        for j, (xj, _) in enumerate(pts):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + int.from_bytes(yi, "big") * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * length):
        raise CryptoError("shares are inconsistent (the result does not fit the secret's size)")
    return secret.to_bytes(length, "big")


# --------------------------------------------------------------------------- signatures
def statement(kind: str, *parts: bytes | str | int) -> bytes:
    """The bytes a signature covers: domain, kind and every part, length-prefixed.

    Parameters
    ----------
    kind : str
        What is signed (``"advert"``, ``"share"``, ``"check"``, ``"reply"``...): a
        signature made for one kind never verifies for another.
    *parts : bytes, str or int
        The signed fields, in a fixed order (each type-tagged and length-prefixed).
    """
    out = [DOMAIN, b"sig/", kind.encode(), b"|"]
    for p in parts:
        if isinstance(p, bool) or not isinstance(p, bytes | bytearray | str | int):
            raise TypeError(f"cannot sign a part of type {type(p).__name__}")
        # type-tagged: an int (any size, e.g. a 64-bit Flower node id) in decimal, str as UTF-8
        b = b"s" + p.encode() if isinstance(p, str) else b"i" + str(p).encode() if isinstance(p, int) else b"b" + bytes(p)
        out += [struct.pack(">I", len(b)), b]
    return b"".join(out)


_SIGNING_TYPES = (ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey)
_CURVE_HASH = {"secp256r1": hashes.SHA256, "secp384r1": hashes.SHA384, "secp521r1": hashes.SHA512}


class VerifyKey:
    """An organisation's public identity key (ECDSA P-256/384/521 or Ed25519).

    Parameters
    ----------
    key : EllipticCurvePublicKey or Ed25519PublicKey
        The key, as loaded by ``cryptography``.
    """

    def __init__(self, key: ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey) -> None:
        if isinstance(key, ec.EllipticCurvePublicKey):
            if key.curve.name not in _CURVE_HASH:
                raise CryptoError(f"unsupported curve {key.curve.name} (use P-256, P-384, P-521 or Ed25519)")
        elif not isinstance(key, ed25519.Ed25519PublicKey):
            raise CryptoError(f"unsupported identity key type {type(key).__name__} (use ECDSA or Ed25519)")
        self._key = key
        self.openssh = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()

    @staticmethod
    def from_openssh(text: str | bytes) -> VerifyKey:
        """Parse an OpenSSH public key line (``ecdsa-sha2-nistp384 AAAA... comment``)."""
        data = text.encode() if isinstance(text, str) else bytes(text)
        try:
            return VerifyKey(serialization.load_ssh_public_key(data.strip()))
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise CryptoError(f"not an OpenSSH public key: {exc}") from exc

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the key's OpenSSH encoding, hex (identifies the key in logs)."""
        return hashlib.sha256(self.openssh.split()[1].encode()).hexdigest()

    def verify(self, message: bytes, signature: bytes) -> bool:
        """Whether ``signature`` is this key's signature of ``message``."""
        try:
            if isinstance(self._key, ed25519.Ed25519PublicKey):
                self._key.verify(bytes(signature), message)
            else:
                self._key.verify(bytes(signature), message, ec.ECDSA(_CURVE_HASH[self._key.curve.name]()))
        except (InvalidSignature, ValueError, TypeError):
            return False
        return True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VerifyKey) and other.openssh.split()[:2] == self.openssh.split()[:2]

    def __hash__(self) -> int:
        return hash(tuple(self.openssh.split()[:2]))

    def __repr__(self) -> str:
        return f"VerifyKey({self.openssh.split()[0]} SHA256:{self.fingerprint[:16]})"


class SigningKey:
    """An organisation's private identity key; signs :func:`statement` bytes.

    Parameters
    ----------
    key : EllipticCurvePrivateKey or Ed25519PrivateKey
        The key, as loaded by ``cryptography``.
    """

    def __init__(self, key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> None:
        if not isinstance(key, _SIGNING_TYPES):
            raise CryptoError(f"unsupported identity key type {type(key).__name__} (use ECDSA or Ed25519)")
        self._key = key
        self.public = VerifyKey(key.public_key())

    @staticmethod
    def generate() -> SigningKey:
        """A fresh ECDSA P-384 key (the type ``fedembed certs`` and ``ssh-keygen -t ecdsa -b 384`` make)."""
        return SigningKey(ec.generate_private_key(ec.SECP384R1()))

    @staticmethod
    def load(path: Path | str) -> SigningKey:
        """Load an unencrypted private key file (OpenSSH or PEM).

        Raises
        ------
        CryptoError
            If the file cannot be read or holds no supported private key.
        """
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise CryptoError(f"cannot read identity key {path}: {exc}") from exc
        try:
            key = (serialization.load_ssh_private_key(data, password=None) if b"OPENSSH" in data
                   else serialization.load_pem_private_key(data, password=None))
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise CryptoError(f"{path} holds no usable unencrypted private key: {exc}") from exc
        return SigningKey(key)

    def private_openssh(self) -> bytes:
        """The private key in OpenSSH format (to be written 0600 by the caller)."""
        return self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )

    def sign(self, message: bytes) -> bytes:
        """Signature of ``message`` (build it with :func:`statement`)."""
        if isinstance(self._key, ed25519.Ed25519PrivateKey):
            return self._key.sign(message)
        return self._key.sign(message, ec.ECDSA(_CURVE_HASH[self._key.curve.name]()))

    def __repr__(self) -> str:
        return f"SigningKey(public={self.public!r}, private=<hidden>)"
