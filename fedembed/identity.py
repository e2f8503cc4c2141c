"""Who is who: the federation's roster of organisation keys, and one organisation's identity.

The **roster** is part of what the federation agrees before training: every
organisation's name and public identity key (OpenSSH, ECDSA or Ed25519: in a deployment
the very key its SuperNode authenticates with). Every party holds its own copy, so nobody
has to believe a key a message hands it:

- the coordinator names an organisation by the roster key that signed its reply, never by
  what the reply says about itself, and binds every reply to its run, round, stage and the
  Flower node it came from (:func:`sign_reply`, :func:`verify_reply`);
- in secure aggregation, organisations check each other's key advertisements and the
  consistency signatures against the roster (:mod:`fedembed.secagg.protocol`), so a
  coordinator cannot slip in keys of its own (Sybils) or show parties different lists.

A roster is a directory of ``<name>.pub`` files (what ``fedembed certs`` writes) or a
JSON file ``{"name": "ecdsa-sha2-nistp384 AAAA...", ...}``. Names are printable text with
no control characters (:func:`check_name`), so they cannot forge a log line.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ConfigRecord, RecordDict

from fedembed.errors import FedembedError
from fedembed.secagg.primitives import CryptoError, SigningKey, VerifyKey, statement
from fedembed.wire import content_digest

log = logging.getLogger(__name__)

SIG_RECORD = "sig"
"""Name of the record that carries a reply's signature (excluded from its digest)."""


class IdentityError(FedembedError, ValueError):
    """A roster, key or signature that cannot be used; the message says which and why."""


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid organisation name, else raise :class:`IdentityError`.

    1-80 printable characters (any script), no leading or trailing space, no slash: a
    name can never carry a newline or another control character into a log line.
    """
    if (not isinstance(name, str) or not 1 <= len(name) <= 80 or not name.isprintable()
            or name != name.strip() or "/" in name or "\\" in name):
        raise IdentityError(
            f"organisation name {name!r} must be 1-80 printable characters without control characters, "
            "slashes or leading/trailing spaces"
        )
    return name


@dataclass(frozen=True)
class Roster:
    """The organisations of a federation: name -> public identity key.

    Parameters
    ----------
    keys : Mapping[str, VerifyKey]
        Every organisation's key. Names and keys are unique.
    """

    keys: Mapping[str, VerifyKey]

    def __post_init__(self) -> None:
        if not self.keys:
            raise IdentityError("the roster is empty: list every organisation's public key")
        for name in self.keys:
            check_name(name)
        seen: dict[VerifyKey, str] = {}
        for name, key in self.keys.items():
            if key in seen:
                raise IdentityError(f"organisations {seen[key]!r} and {name!r} have the same key in the roster")
            seen[key] = name

    # ------------------------------------------------------------------ loading
    @staticmethod
    def load(path: Path | str) -> Roster:
        """A roster from a directory of ``<name>.pub`` files or a JSON file.

        Raises
        ------
        IdentityError
            Missing path, unreadable or duplicate keys, bad names.
        """
        p = Path(path)
        try:
            if p.is_dir():
                files = sorted(p.glob("*.pub"))
                if not files:
                    raise IdentityError(f"roster directory {p} holds no <name>.pub files")
                return Roster({f.stem: _key(f.read_text(), f"{f}") for f in files})
            if p.is_file():
                doc = json.loads(p.read_text())
                if not isinstance(doc, dict):
                    raise IdentityError(f"roster file {p} must hold a JSON object name -> public key")
                return Roster.from_dict(doc)
        except (OSError, ValueError) as exc:
            if isinstance(exc, IdentityError):
                raise
            raise IdentityError(f"cannot read the roster {p}: {exc}") from exc
        raise IdentityError(f"roster {p} not found (a directory of <name>.pub files or a JSON file)")

    @staticmethod
    def load_key(path: Path | str) -> VerifyKey:
        """One OpenSSH public key file.

        Raises
        ------
        IdentityError
            Unreadable or not a supported public key.
        """
        try:
            return _key(Path(path).read_text(), str(path))
        except OSError as exc:
            raise IdentityError(f"cannot read public key {path}: {exc}") from exc

    @staticmethod
    def from_dict(d: Mapping[str, str]) -> Roster:
        """Inverse of :meth:`to_dict`."""
        return Roster({str(name): _key(text, f"roster entry {name!r}") for name, text in d.items()})

    def to_dict(self) -> dict[str, str]:
        """Name -> OpenSSH public key line (JSON-able)."""
        return {name: self.keys[name].openssh for name in sorted(self.keys)}

    def write(self, path: Path | str) -> Path:
        """Write the roster as a JSON file."""
        p = Path(path)
        p.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return p

    # ------------------------------------------------------------------ queries
    @property
    def names(self) -> list[str]:
        """Organisation names, sorted (a name's position + 1 is its party id)."""
        return sorted(self.keys)

    @property
    def digest(self) -> str:
        """SHA-256 of the roster (names and keys), hex: identical rosters have identical digests."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def __len__(self) -> int:
        return len(self.keys)

    def name_of(self, key: VerifyKey) -> str | None:
        """The name whose key is ``key``, or None."""
        return next((n for n, k in self.keys.items() if k == key), None)

    def party(self, name: str) -> int:
        """Party id of ``name`` in secure aggregation: its 1-based position in :attr:`names`."""
        if name not in self.keys:
            raise IdentityError(f"{name!r} is not in the roster")
        return self.names.index(name) + 1

    def name_of_party(self, party: int) -> str:
        """Inverse of :meth:`party`."""
        names = self.names
        if not 1 <= party <= len(names):
            raise IdentityError(f"party {party} is not in the roster of {len(names)} organisations")
        return names[party - 1]

    def verify(self, name: str, message: bytes, signature: bytes) -> bool:
        """Whether ``signature`` over ``message`` is by the roster key of ``name``."""
        key = self.keys.get(name)
        return key is not None and isinstance(signature, bytes | bytearray) and key.verify(message, bytes(signature))


def _key(text: str, where: str) -> VerifyKey:
    try:
        return VerifyKey.from_openssh(text)
    except CryptoError as exc:
        raise IdentityError(f"{where}: {exc}") from exc


@dataclass(frozen=True)
class Identity:
    """One organisation's identity: its roster name and its private signing key.

    Parameters
    ----------
    name : str
        Its name in the roster.
    key : SigningKey
        Its private identity key (never leaves the organisation; not shown in a repr).
    roster : Roster
        The federation's roster, as this organisation holds it.
    """

    name: str
    key: SigningKey
    roster: Roster

    @staticmethod
    def load(key_path: Path | str, roster: Roster | Path | str) -> Identity:
        """Load a private key and find its name in the roster.

        Raises
        ------
        IdentityError
            The key cannot be read or is not in the roster.
        """
        roster = roster if isinstance(roster, Roster) else Roster.load(roster)
        try:
            key = SigningKey.load(key_path)
        except CryptoError as exc:
            raise IdentityError(str(exc)) from exc
        name = roster.name_of(key.public)
        if name is None:
            raise IdentityError(
                f"the identity key {key_path} ({key.public!r}) is not in the roster: "
                "ask the federation to list its public half"
            )
        return Identity(name, key, roster)

    def sign(self, message: bytes) -> bytes:
        """Sign a :func:`fedembed.secagg.primitives.statement`."""
        return self.key.sign(message)

    def __repr__(self) -> str:
        return f"Identity({self.name!r}, {self.key.public!r})"


def make_identities(names: list[str], key_dir: Path) -> Roster:
    """Fresh keys for ``names`` (a simulation, a test): ``<key_dir>/<i>.key`` (0600) and the roster.

    Parameters
    ----------
    names : list[str]
        Organisation names, in organisation-index order.
    key_dir : Path
        Where the private keys go, one file per organisation index.
    """
    from fedembed.store import atomic_write

    key_dir.mkdir(parents=True, exist_ok=True)
    keys = {}
    for i, name in enumerate(names):
        sk = SigningKey.generate()
        atomic_write(key_dir / f"{i}.key", sk.private_openssh())
        keys[check_name(name)] = sk.public
    return Roster(keys)


# ---------------------------------------------------------------------- replies
def reply_statement(run_key: str, round_: int, stage: str, node: int, digest: bytes) -> bytes:
    """What an organisation signs for a reply: run, round, stage, its Flower node, the content digest."""
    return statement("reply", run_key, int(round_), stage, int(node), digest)


def sign_reply(content: RecordDict, identity: Identity, run_key: str, round_: int, stage: str, node: int) -> RecordDict:
    """Add the ``sig`` record to a reply: who sends it, bound to run, round, stage and node."""
    digest = content_digest(content, skip=(SIG_RECORD,))
    sig = identity.sign(reply_statement(run_key, round_, stage, node, digest))
    content[SIG_RECORD] = ConfigRecord({"name": identity.name, "signature": sig})
    return content


def verify_reply(content: RecordDict, roster: Roster, run_key: str, round_: int, stage: str, node: int) -> str:
    """The roster name of the organisation that signed ``content`` for this run, round, stage and node.

    Raises
    ------
    IdentityError
        No signature, a name not in the roster, or a signature that does not verify (forged,
        altered, replayed from another round, stage or run, or relayed from another node).
    """
    if SIG_RECORD not in content:
        raise IdentityError("the reply is not signed")
    rec = content[SIG_RECORD]
    name, sig = rec.get("name"), rec.get("signature")
    if not isinstance(name, str) or name not in roster.keys:
        raise IdentityError("the reply is signed by a name that is not in the roster")
    if not isinstance(sig, bytes):
        raise IdentityError(f"the signature of {name!r} is malformed")
    digest = content_digest(content, skip=(SIG_RECORD,))
    if not roster.verify(name, reply_statement(run_key, round_, stage, node, digest), sig):
        raise IdentityError(
            f"the signature claiming to be {name!r} does not verify for this run, round {round_}, stage "
            f"{stage!r} and node {node} (forged, altered, replayed or relayed)"
        )
    return name
