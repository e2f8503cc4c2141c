"""Vocabularies: how every organisation maps the same string id to the same table row.

A shared embedding table is keyed by string ids (product SKUs, diagnosis codes, person
names). Row ``r`` only means the same thing at every organisation if all of them turn an
id into a row the same way. A :class:`Vocabulary` is that mapping, in one of two kinds.

A published vocabulary file (``kind == "file"``)
    UTF-8 text, one id per line, ``\\n`` line endings; row ``i`` is line ``i`` (0-based).
    One extra last row, index ``n`` for a file of ``n`` ids, is the out-of-vocabulary
    (OOV) row: every id that is not in the file maps to it. A table keyed by a vocabulary
    of ``n`` ids therefore has ``n + 1`` rows. Ids are non-empty, unique, and contain no
    ``\\n`` or ``\\r``; a file may or may not end with a newline, but a blank line, a
    duplicate, bad UTF-8 or a byte-order mark is refused with its line number. The
    digest is ``"sha256:<hex>"`` of the canonical content: the ids joined by ``\\n`` plus
    one trailing ``\\n``, in UTF-8 -- exactly the bytes :meth:`Vocabulary.write` writes,
    so ``sha256sum vocab.txt`` of a canonical file shows the same hex. Order matters: the
    same ids in another order are another vocabulary, with another digest.

Hashing (``kind == "hash"``)
    ``row = H(id) mod buckets``, where ``H`` is BLAKE2b with an 8-byte digest over the
    UTF-8 bytes of the id, keyed with the UTF-8 bytes of an optional ``salt`` (at most
    64 bytes; empty means unkeyed), read as a big-endian unsigned 64-bit integer. It is
    the same in every process and on every machine (Python's ``hash()`` is not: it is
    randomised per process). There is no OOV row -- every id has a bucket -- but distinct
    ids can share one. The digest is ``"blake2b-8:<buckets>:<hex sha256 of salt>"``, so
    parties can compare salts without the salt itself being published. It only hides a
    salt that cannot be guessed: a short or common salt is found again by trying
    candidates against its SHA-256, so use a random one if it is meant to stay private.

Collisions under hashing
    Placing ``n`` distinct ids uniformly in ``B`` buckets, an id shares its bucket with at
    least one other id with probability ``1 - (1 - 1/B) ** (n - 1)``, which is also the
    expected fraction of ids that do (:meth:`Vocabulary.collision_rate`). For example
    100,000 ids in ``2**20`` (1,048,576) buckets: ``1 - (1 - 2**-20) ** 99,999`` =
    0.091, so about 9.1 % of the ids -- some 9,100 of them -- share their row with
    another id. It is close to ``n / B`` (here 0.095) while ``n`` is small against ``B``.

Every party compares :attr:`Vocabulary.digest` (what a federation spec publishes) before
it trusts that its rows mean what the others' rows mean. This module needs only numpy
and the standard library (no torch, no Flower).
"""

from __future__ import annotations

import hashlib
import logging
import math
import operator
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from fedembed.errors import FedembedError
from fedembed.store import atomic_write

log = logging.getLogger(__name__)

HASH_DIGEST_SIZE = 8
"""Bytes of BLAKE2b output used for a hashed row (read as a big-endian unsigned 64-bit integer)."""
MAX_SALT_BYTES = 64
"""Longest salt (UTF-8 bytes) BLAKE2b accepts as its key."""
MAX_BUCKETS = 2**63 - 1
"""Most buckets a hashed vocabulary may have: every row must fit in int64."""
FILE_MODE = 0o644
"""Mode a written vocabulary file is created with (before the umask): it is meant to be published."""


class VocabularyError(FedembedError, ValueError):
    """A vocabulary that cannot be built, read or used as asked (the message says where)."""


def _show(item: object, limit: int = 60) -> str:
    """``repr`` of an offending id, shortened so one huge id cannot flood a message."""
    text = repr(item)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_ids(ids: list[Any], where: Callable[[int], str]) -> dict[str, int]:
    """Validate non-empty ``ids`` in order, return id -> row; the first bad one raises, named with ``where(i)``."""
    index: dict[str, int] = {}
    for i, item in enumerate(ids):
        if not isinstance(item, str):
            raise VocabularyError(f"{where(i)}: id {_show(item)} is of type {type(item).__name__}, not a str")
        if not item:
            raise VocabularyError(f"{where(i)}: empty id")
        if "\n" in item or "\r" in item:
            hint = " (Windows line endings?)" if item.endswith("\r") else ""
            raise VocabularyError(f"{where(i)}: id {_show(item)} contains a line break (\\n or \\r){hint}")
        first = index.setdefault(item, i)
        if first != i:
            raise VocabularyError(f"{where(i)}: duplicate id {_show(item)} (first at {where(first)})")
    return index


def _salt_key(salt: str) -> bytes:
    """The BLAKE2b key of ``salt``: its UTF-8 bytes, at most 64 of them."""
    if not isinstance(salt, str):
        raise VocabularyError(f"salt must be a str, not {type(salt).__name__}")
    try:
        key = salt.encode("utf-8")
    except UnicodeEncodeError as err:
        raise VocabularyError(f"salt cannot be encoded as UTF-8 ({err.reason} at character {err.start})") from None
    if len(key) > MAX_SALT_BYTES:
        raise VocabularyError(f"salt is {len(key)} bytes in UTF-8; BLAKE2b takes at most {MAX_SALT_BYTES}")
    return key


class Vocabulary:
    """The mapping from string ids to table rows that every organisation shares.

    Build one with :meth:`from_ids`, :meth:`load` or :meth:`hashed`, not with the
    constructor. Two vocabularies are equal iff their :attr:`digest` is equal.
    """

    __slots__ = ("_buckets", "_digest", "_ids", "_index", "_key", "_kind")

    def __init__(
        self,
        kind: str,
        digest: str,
        ids: list[str] | None = None,
        index: dict[str, int] | None = None,
        buckets: int = 0,
        key: bytes = b"",
    ) -> None:
        self._kind = kind
        self._digest = digest
        self._ids = ids
        self._index = index
        self._buckets = buckets
        self._key = key

    # ----------------------------------------------------------------- constructors

    @staticmethod
    def from_ids(ids: Iterable[str]) -> Vocabulary:
        """A file vocabulary of ``ids``, in order: ``ids[i]`` gets row ``i``.

        Parameters
        ----------
        ids : iterable of str
            The known ids, in row order. Each must be a non-empty str without ``\\n`` or
            ``\\r`` that can be encoded as UTF-8, and they must be unique; at least one.

        Returns
        -------
        Vocabulary
            ``kind == "file"``, ``rows == len(ids) + 1`` (the last row is the OOV row).

        Raises
        ------
        VocabularyError
            On the first offending id, naming it, its 0-based position and the line it
            would have in the file (position + 1).
        """
        if isinstance(ids, str):
            raise VocabularyError("from_ids takes an iterable of ids, not one str")
        ids = list(ids)
        if not ids:
            raise VocabularyError("no ids (a vocabulary needs at least one)")
        index = _check_ids(ids, lambda i: f"position {i} (line {i + 1})")
        return Vocabulary._from_checked(ids, index)

    @staticmethod
    def _from_checked(ids: list[str], index: dict[str, int]) -> Vocabulary:
        try:
            content = _canonical(ids)
        except UnicodeEncodeError:
            for i, item in enumerate(ids):
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError as err:
                    raise VocabularyError(
                        f"position {i} (line {i + 1}): id {_show(item)} cannot be encoded as UTF-8 ({err.reason})"
                    ) from None
            raise  # pragma: no cover - the join failed, so one id must fail on its own
        return Vocabulary("file", "sha256:" + hashlib.sha256(content).hexdigest(), ids=ids, index=index)

    @staticmethod
    def load(path: str | Path) -> Vocabulary:
        """Read a published vocabulary file (one id per line, UTF-8, row ``i`` = line ``i``).

        A trailing newline is optional; :attr:`digest` is that of the canonical content
        (ids joined by ``\\n`` plus a trailing ``\\n``) whether or not the file ends with one.

        Parameters
        ----------
        path : str or Path
            The file.

        Returns
        -------
        Vocabulary
            ``kind == "file"`` with one row per line plus the OOV row.

        Raises
        ------
        VocabularyError
            Naming the path, and the 1-based line number where there is one: a missing or
            unreadable file, bad UTF-8, a byte-order mark, a blank line, a line ending in
            ``\\r`` (Windows line endings), a duplicate id (and the line it first appeared
            on), or a file with no ids.
        """
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as err:
            raise VocabularyError(f"vocabulary file {path}: cannot be read ({err.strerror or err})") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            line = data.count(b"\n", 0, err.start) + 1
            raise VocabularyError(
                f"vocabulary file {path}, line {line}: not UTF-8 ({err.reason} at byte {err.start})"
            ) from None
        if text.startswith("\ufeff"):
            raise VocabularyError(
                f"vocabulary file {path}, line 1: starts with a byte-order mark (U+FEFF); save it as UTF-8 without one"
            )
        if not text:
            raise VocabularyError(f"vocabulary file {path}: empty (a vocabulary needs at least one id)")
        lines = text[:-1].split("\n") if text.endswith("\n") else text.split("\n")

        def where(i: int) -> str:
            return f"vocabulary file {path}, line {i + 1}"

        index = _check_ids(lines, where)
        vocab = Vocabulary._from_checked(lines, index)
        log.debug("loaded vocabulary %s: %d ids, %s", path, len(lines), vocab.digest)
        return vocab

    @staticmethod
    def hashed(buckets: int, salt: str = "") -> Vocabulary:
        """A hashing vocabulary: ``row = BLAKE2b-8(salt-keyed, UTF-8 id) mod buckets``.

        Parameters
        ----------
        buckets : int
            Number of rows, ``1 <= buckets <= 2**63 - 1``.
        salt : str, optional
            Key of the hash (at most 64 bytes in UTF-8); ``""`` (default) means unkeyed.
            Only its SHA-256 appears in :attr:`digest`.

        Returns
        -------
        Vocabulary
            ``kind == "hash"``, ``rows == size == buckets``, no OOV row.

        Raises
        ------
        VocabularyError
            If ``buckets`` is not an int in range or the salt is too long.
        """
        if isinstance(buckets, bool) or not isinstance(buckets, (int, np.integer)):
            raise VocabularyError(f"buckets must be an int, not {type(buckets).__name__}")
        buckets = int(buckets)
        if not 1 <= buckets <= MAX_BUCKETS:
            raise VocabularyError(f"buckets must be between 1 and {MAX_BUCKETS}, got {buckets}")
        key = _salt_key(salt)
        digest = f"blake2b-{HASH_DIGEST_SIZE}:{buckets}:{hashlib.sha256(key).hexdigest()}"
        return Vocabulary("hash", digest, buckets=buckets, key=key)

    # ----------------------------------------------------------------- properties

    @property
    def kind(self) -> str:
        """``"file"`` (a published list of ids) or ``"hash"`` (hashed into buckets)."""
        return self._kind

    @property
    def rows(self) -> int:
        """Rows a table keyed by this vocabulary needs: ``size + 1`` for a file, ``buckets`` for hashing."""
        return len(self._ids) + 1 if self._ids is not None else self._buckets

    @property
    def oov_row(self) -> int | None:
        """The out-of-vocabulary row (``size``) for a file vocabulary; ``None`` for hashing."""
        return len(self._ids) if self._ids is not None else None

    @property
    def size(self) -> int:
        """Number of known ids for a file vocabulary; the number of buckets for hashing."""
        return len(self._ids) if self._ids is not None else self._buckets

    @property
    def digest(self) -> str:
        """What a federation spec publishes and every party compares.

        ``"sha256:<hex>"`` of the canonical file content for a file vocabulary;
        ``"blake2b-8:<buckets>:<hex sha256 of salt>"`` for hashing.
        """
        return self._digest

    # ----------------------------------------------------------------- use

    def lookup(self, ids: Iterable[str]) -> np.ndarray:
        """Rows of ``ids``, in the same order.

        For a file vocabulary this is one dict look-up per id (about 0.35 s per million
        ids on a 2-core test machine); ids not in the vocabulary get :attr:`oov_row` (see
        :meth:`lookup_with_oov` for how many did). For hashing it is one BLAKE2b per id in
        a Python loop (about 0.8 s per million ids on the same machine). Nothing is cached.

        Parameters
        ----------
        ids : iterable of str
            The ids, e.g. a list, tuple or 1-D numpy array of strings. Not a single str.

        Returns
        -------
        np.ndarray
            int64, shape ``(len(ids),)``, every value in ``[0, rows)``.

        Raises
        ------
        TypeError
            If ``ids`` is a single str, or an id is not a str (its position is named).
        VocabularyError
            Hashing only: an id that cannot be encoded as UTF-8 (a lone surrogate); a file
            vocabulary maps such an id to the OOV row, since no file can hold it.
        """
        return self.lookup_with_oov(ids)[0]

    def lookup_with_oov(self, ids: Iterable[str]) -> tuple[np.ndarray, int]:
        """Rows of ``ids`` and how many of them were out of vocabulary.

        Parameters
        ----------
        ids : iterable of str
            As for :meth:`lookup`.

        Returns
        -------
        rows : np.ndarray
            As :meth:`lookup` returns.
        oov : int
            How many ids mapped to :attr:`oov_row` (always 0 for hashing).

        Raises
        ------
        TypeError, VocabularyError
            As for :meth:`lookup`.
        """
        if isinstance(ids, (str, bytes)):
            raise TypeError(f"lookup takes an iterable of ids, not one {type(ids).__name__}")
        if isinstance(ids, np.ndarray):
            ids = ids.tolist()  # plain str elements, much faster than list(array)
        elif not isinstance(ids, (list, tuple)):
            ids = list(ids)
        if self._index is not None:
            return self._lookup_file(ids)
        return self._lookup_hash(ids), 0

    def _lookup_file(self, ids: list[str] | tuple[str, ...]) -> tuple[np.ndarray, int]:
        get = self._index.get
        rows = np.fromiter((get(item, -1) for item in ids), dtype=np.int64, count=len(ids))
        missed = np.flatnonzero(rows < 0)
        # A hit equals a str key, so only the misses can be of the wrong type (e.g. ints
        # passed by mistake, which would otherwise all land silently in the OOV row).
        for i in missed.tolist():
            if not isinstance(ids[i], str):
                raise TypeError(f"id at position {i} is of type {type(ids[i]).__name__}, not a str: {_show(ids[i])}")
        rows[missed] = len(self._ids)
        return rows, int(missed.size)

    def _lookup_hash(self, ids: list[str] | tuple[str, ...]) -> np.ndarray:
        blake2b, key = hashlib.blake2b, self._key
        try:
            raw = b"".join(
                [blake2b(item.encode("utf-8"), digest_size=HASH_DIGEST_SIZE, key=key).digest() for item in ids]
            )
        except (AttributeError, UnicodeEncodeError):
            for i, item in enumerate(ids):
                if not isinstance(item, str):
                    raise TypeError(
                        f"id at position {i} is of type {type(item).__name__}, not a str: {_show(item)}"
                    ) from None
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError as err:
                    raise VocabularyError(
                        f"id at position {i} ({_show(item)}) cannot be encoded as UTF-8 ({err.reason})"
                    ) from None
            raise  # pragma: no cover - some id failed above
        values = np.frombuffer(raw, dtype=">u8")
        return (values % np.uint64(self._buckets)).astype(np.int64)

    def id_of(self, row: int) -> str | None:
        """The id of ``row``.

        Parameters
        ----------
        row : int
            A row in ``[0, rows)``.

        Returns
        -------
        str or None
            The id for a known row of a file vocabulary; ``None`` for its OOV row and for
            every row of a hashing vocabulary (a bucket has no single id).

        Raises
        ------
        VocabularyError
            If ``row`` is outside ``[0, rows)``.
        """
        row = operator.index(row)
        if not 0 <= row < self.rows:
            raise VocabularyError(f"row {row} is outside [0, {self.rows})")
        if self._ids is None or row == len(self._ids):
            return None
        return self._ids[row]

    def ids(self) -> list[str]:
        """The known ids in row order (a new list).

        Raises
        ------
        VocabularyError
            For a hashing vocabulary, which has no list of ids.
        """
        if self._ids is None:
            raise VocabularyError("a hashing vocabulary has no list of ids")
        return list(self._ids)

    def write(self, path: str | Path) -> Path:
        """Write the canonical file (ids joined by ``\\n`` plus a trailing ``\\n``, UTF-8).

        Atomic: the bytes go to a temporary file in the same directory, which is flushed,
        fsync'ed and renamed over ``path``, so a crash leaves the old file or the new one.
        The file is created with mode 0644 (before the umask), since it is meant to be
        published. The SHA-256 of the written bytes is :attr:`digest`.

        Parameters
        ----------
        path : str or Path
            Destination; its directory must exist.

        Returns
        -------
        Path
            ``path``.

        Raises
        ------
        VocabularyError
            For a hashing vocabulary, which has no file.
        OSError
            If the file cannot be written.
        """
        if self._ids is None:
            raise VocabularyError("a hashing vocabulary has no file to write")
        path = Path(path)
        atomic_write(path, _canonical(self._ids), mode=FILE_MODE)
        log.debug("wrote vocabulary %s: %d ids, %s", path, len(self._ids), self._digest)
        return path

    def describe(self) -> dict[str, Any]:
        """A JSON-serialisable summary.

        Returns
        -------
        dict
            ``{"kind": "file", "size": n, "rows": n + 1, "digest": ...}`` or
            ``{"kind": "hash", "buckets": B, "rows": B, "digest": ...}``.
        """
        if self._ids is not None:
            return {"kind": "file", "size": self.size, "rows": self.rows, "digest": self._digest}
        return {"kind": "hash", "buckets": self._buckets, "rows": self.rows, "digest": self._digest}

    def collision_rate(self, n_ids: int) -> float:
        """Expected fraction of ``n_ids`` distinct ids that share their row with another id.

        Parameters
        ----------
        n_ids : int
            Number of distinct ids looked up, ``>= 0``.

        Returns
        -------
        float
            For hashing into ``B`` buckets, ``1 - (1 - 1/B) ** (n_ids - 1)`` (0 for fewer
            than two ids); for a file vocabulary 0.0 (known ids have rows of their own; the
            OOV row shared by unknown ids is counted by :meth:`lookup_with_oov` instead).

        Raises
        ------
        VocabularyError
            If ``n_ids`` is negative.
        """
        n_ids = operator.index(n_ids)
        if n_ids < 0:
            raise VocabularyError(f"n_ids must be >= 0, got {n_ids}")
        if self._ids is not None or n_ids < 2:
            return 0.0
        if self._buckets == 1:
            return 1.0
        # 1 - (1 - 1/B)**(n-1), computed without losing precision when 1/B is tiny.
        return -math.expm1((n_ids - 1) * math.log1p(-1.0 / self._buckets))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Vocabulary):
            return NotImplemented
        return self._digest == other._digest

    def __hash__(self) -> int:
        return hash(self._digest)

    def __repr__(self) -> str:
        return f"Vocabulary(kind={self._kind!r}, rows={self.rows}, digest={self._digest[:23]!r}...)"


def _canonical(ids: list[str]) -> bytes:
    """The canonical file content of ``ids``: joined by ``\\n``, one trailing ``\\n``, UTF-8."""
    return ("\n".join(ids) + "\n").encode("utf-8")
