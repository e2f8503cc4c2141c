"""The federation spec: what every party must agree on about the shared tables.

The coordinator knows only this (with the recipe and the protocol settings of
:class:`fedembed.config.RunConfig`): each shared table's name, rows, dimension and the
vocabulary that keys its rows (the digest of a published id file, or a hashing scheme).
It loads no data and imports no torch. Every organisation derives the same description
from its own model and vocabularies (:meth:`fedembed.task.Task.table_specs`) and refuses
to take part when the two differ, naming the table (:meth:`FederationSpec.check`).

A spec file (TOML or JSON) published with the federation::

    [tables.people]
    dim = 32
    vocabulary = "people.txt"      # rows = ids in the file + 1 out-of-vocabulary row

    [tables.items]
    rows = 100000                  # keyed by row index
    dim = 16

    [tables.skus]
    dim = 16
    hash-buckets = 1048576         # ids hashed into this many rows

``fedembed spec`` writes one from a task.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedembed.errors import FedembedError

log = logging.getLogger(__name__)


class SpecError(FedembedError, ValueError):
    """A federation spec that cannot be read, or a model that does not match it."""


@dataclass(frozen=True)
class TableSpec:
    """One shared table as the federation publishes it.

    Parameters
    ----------
    rows : int
        Rows of the table (for a vocabulary: its ids + 1 out-of-vocabulary row).
    dim : int
        Embedding dimension.
    vocabulary : str or None
        Digest of the vocabulary that keys the rows (:attr:`fedembed.vocab.Vocabulary.digest`);
        None: rows are addressed by index.
    """

    rows: int
    dim: int
    vocabulary: str | None = None

    def __post_init__(self) -> None:
        for key in ("rows", "dim"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SpecError(f"{key} must be a positive integer, got {value!r}")
        if self.vocabulary is not None and not isinstance(self.vocabulary, str):
            raise SpecError(f"vocabulary must be a digest string, got {self.vocabulary!r}")

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, dim)``."""
        return (self.rows, self.dim)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"rows": self.rows, "dim": self.dim, "vocabulary": self.vocabulary}

    def describe(self) -> str:
        """``rows x dim`` and the vocabulary, for messages."""
        vocab = f", vocabulary {self.vocabulary[:24]}" if self.vocabulary else ", rows by index"
        return f"{self.rows} x {self.dim}{vocab}"


@dataclass(frozen=True)
class FederationSpec:
    """The shared tables of a federation, by name.

    Parameters
    ----------
    tables : Mapping[str, TableSpec]
        Table name -> its spec.
    """

    tables: Mapping[str, TableSpec]

    def __post_init__(self) -> None:
        if not self.tables:
            raise SpecError("a federation shares at least one table")
        for name in self.tables:
            if not isinstance(name, str) or not name or not name.isprintable():
                raise SpecError(f"table names are non-empty printable strings, got {name!r}")
        object.__setattr__(self, "tables", {n: self.tables[n] for n in sorted(self.tables)})

    def shapes(self) -> dict[str, tuple[int, int]]:
        """``(rows, dim)`` of every table."""
        return {n: t.shape for n, t in self.tables.items()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (also what the digest covers)."""
        return {"tables": {n: t.to_dict() for n, t in self.tables.items()}}

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces): sent in every plan."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @property
    def digest(self) -> str:
        """``sha256:<hex>`` of the canonical JSON: names the federation's tables in caches and checkpoints."""
        return "sha256:" + hashlib.sha256(self.to_json().encode()).hexdigest()

    @staticmethod
    def from_dict(doc: Mapping[str, Any], base: Path | None = None) -> FederationSpec:
        """Build from a dict (the canonical form, or a spec file's, see the module docstring).

        Parameters
        ----------
        doc : Mapping
            ``{"tables": {name: {rows, dim, vocabulary | hash-buckets}}}``. In a spec file
            ``vocabulary`` may be a path of an id file (relative to ``base``), read to
            derive rows and digest.
        base : Path, optional
            Directory relative paths are resolved against.

        Raises
        ------
        SpecError
            Unknown keys, missing rows/dim, an unreadable vocabulary.
        """
        if not isinstance(doc, Mapping) or set(doc) - {"tables"} or not isinstance(doc.get("tables"), Mapping):
            raise SpecError("a federation spec is {'tables': {name: {rows, dim, ...}}}")
        tables = {}
        for name, t in doc["tables"].items():
            if not isinstance(t, Mapping):
                raise SpecError(f"table {name!r}: expected a table of settings, got {t!r}")
            unknown = set(t) - {"rows", "dim", "vocabulary", "hash-buckets", "hash-salt"}
            if unknown:
                raise SpecError(f"table {name!r}: unknown settings {sorted(unknown)}")
            vocab, rows = t.get("vocabulary"), t.get("rows")
            if "hash-buckets" in t:
                from fedembed.vocab import Vocabulary

                v = Vocabulary.hashed(int(t["hash-buckets"]), str(t.get("hash-salt", "")))
                vocab, rows = v.digest, v.rows
            elif isinstance(vocab, str) and not vocab.startswith(("sha256:", "blake2b")):
                from fedembed.vocab import Vocabulary, VocabularyError

                path = Path(vocab) if base is None or Path(vocab).is_absolute() else Path(base) / vocab
                try:
                    v = Vocabulary.load(path)
                except VocabularyError as exc:
                    raise SpecError(f"table {name!r}: {exc}") from exc
                if rows is not None and int(rows) != v.rows:
                    raise SpecError(f"table {name!r}: rows = {rows}, but its vocabulary {path} needs {v.rows}")
                vocab, rows = v.digest, v.rows
            if rows is None or "dim" not in t:
                raise SpecError(f"table {name!r}: needs rows (or a vocabulary) and dim")
            tables[str(name)] = TableSpec(rows=rows, dim=t["dim"], vocabulary=vocab)
        return FederationSpec(tables)

    @staticmethod
    def from_json(text: str) -> FederationSpec:
        """Inverse of :meth:`to_json`."""
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(f"federation spec is not JSON: {exc}") from exc
        return FederationSpec.from_dict(doc)

    @staticmethod
    def load(path: str | Path) -> FederationSpec:
        """Read a spec file, TOML (``.toml``) or JSON; vocabulary paths are relative to it."""
        path = Path(path)
        doc = read_spec_file(path)
        try:
            return FederationSpec.from_dict(doc, base=path.parent)
        except SpecError as exc:
            raise SpecError(f"federation spec {path}: {exc}") from exc

    def write(self, path: str | Path) -> Path:
        """Write the canonical JSON form to ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    def check(self, own: Mapping[str, TableSpec]) -> None:
        """Refuse a model whose shared tables differ from the federation's.

        Parameters
        ----------
        own : Mapping[str, TableSpec]
            The organisation's own tables (from its model and vocabularies).

        Raises
        ------
        SpecError
            Names the first table that differs and how.
        """
        missing = sorted(set(self.tables) - set(own))
        extra = sorted(set(own) - set(self.tables))
        if missing or extra:
            raise SpecError(
                f"this organisation's model shares tables {sorted(own)}, the federation's are {sorted(self.tables)}"
                + (f" (missing {missing})" if missing else "") + (f" (not in the federation: {extra})" if extra else "")
            )
        for name, fed in self.tables.items():
            mine = own[name]
            if mine != fed:
                what = []
                if mine.shape != fed.shape:
                    what.append(f"shape {mine.rows} x {mine.dim} here, {fed.rows} x {fed.dim} in the federation")
                if mine.vocabulary != fed.vocabulary:
                    what.append(f"vocabulary {mine.vocabulary or 'none (rows by index)'} here, "
                                f"{fed.vocabulary or 'none (rows by index)'} in the federation")
                raise SpecError(f"table {name!r} differs from the federation's: " + "; ".join(what))


def read_spec_file(path: Path) -> dict[str, Any]:
    """The raw document of a spec file: TOML when it ends in ``.toml``, else JSON.

    Raises
    ------
    SpecError
        The file cannot be read or parsed (naming it).
    """
    import tomllib

    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise SpecError(f"federation spec {path}: {exc.strerror or exc}") from exc
    try:
        return tomllib.loads(raw.decode()) if Path(path).suffix == ".toml" else json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SpecError(f"federation spec {path}: {exc}") from exc


def vocabulary_files(path: Path) -> dict[str, Path]:
    """Table -> the vocabulary file a spec file names (resolved against the file); digests are left out."""
    out = {}
    for name, t in read_spec_file(path).get("tables", {}).items():
        v = t.get("vocabulary") if isinstance(t, Mapping) else None
        if isinstance(v, str) and not v.startswith(("sha256:", "blake2b")):
            out[name] = Path(v) if Path(v).is_absolute() else Path(path).parent / v
    return out
