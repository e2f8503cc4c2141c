"""Organisations built from the real ``movies.db`` of the ``bokeh-sampledata`` package.

Each movie is a bag of people ids: its directors, writers and cast. All organisations
index one shared vocabulary of people, so a person's embedding row is learnt jointly.

Vocabulary
    Names are normalised (annotations in parentheses such as ``"John Smith (screenplay)"``
    removed, whitespace collapsed and stripped, empty and ``"N/A"`` names dropped). The
    vocabulary is built over ALL movies of the database (not only the kept ones) and sorted
    by name, so ids do not depend on ``num_orgs``, ``scenario`` or ``seed``. People who
    appear in a single movie are kept with their own id (about half of the ~64k people);
    there is no shared "rare" id. A person listed in several roles of one movie (e.g.
    director and writer) appears once in that movie's bag.

Organisations
    A movie belongs to its main production country (the first listed one). A movie is
    usable if it has a non-empty bag, a country and at least one genre (so organisations
    are the same in both scenarios). Starting from one group per country, while there are
    fewer than ``num_orgs`` groups of at least ``min_movies`` usable movies, the largest
    group is split finer: a country into (country, decade) groups named ``"France-1990s"``,
    a (country, decade) into (country, year) groups named ``"United States-2004"``.
    Sub-groups below ``min_movies`` are dropped. The ``num_orgs`` largest groups are kept,
    ranked by size (ties by name); movies of other groups are not used. With
    ``num_orgs <= 25`` the organisations are just the largest countries (United States,
    France, United Kingdom, Canada, Germany, Australia, ... in the shipped database); at
    most 140 organisations can be formed with ``min_movies=40``.

Targets
    ``scenario="same"``: every organisation predicts ``genres``, multi-label over every
    genre seen in the kept movies (sorted names).
    ``scenario="mixed"``: organisation of rank ``r`` predicts ``TARGET_CYCLE[r % 3]``:
    ``genres`` (r = 0, 3, 6, ...), ``decade`` (r = 1, 4, ...; multi-class over the decades
    present in the kept movies, e.g. ``"1940s"`` .. ``"2010s"``) and ``meter`` (r = 2, 5, ...;
    binary, Rotten Tomatoes ``Meter >= 60``; movies without a Meter are dropped for that
    organisation). With 5 organisations of the shipped database: United States genres,
    France decade, United Kingdom meter, Canada genres, Germany decade. Label spaces are
    shared by all organisations with the same target. Note that once organisations are
    split by decade or year, a ``decade`` organisation sees one class only (a warning is
    logged).

Each organisation's usable movies are split 70/10/20 into train/val/test with a generator
seeded by ``(seed, name)``, so an organisation's split does not depend on which others
are present.
"""

from __future__ import annotations

import functools
import importlib.resources
import logging
import re
import sqlite3
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedembed.data.bags import Bags, DataError, FederatedData, OrgData, split_indices

log = logging.getLogger(__name__)

SCENARIOS = ("same", "mixed")
TARGET_CYCLE = ("genres", "decade", "meter")
MIN_MOVIES = 40
FRESH_METER = 60
METER_LABELS = ["rotten (<60)", "fresh (>=60)"]
_PAREN = re.compile(r"\([^)]*\)")
_SPACE = re.compile(r"\s+")


def movies_db_path() -> Path:
    """Path of ``movies.db`` inside the installed ``bokeh_sampledata`` package.

    Raises
    ------
    FileNotFoundError
        The package is not installed or does not ship the file.
    """
    hint = "install the sample data with `pip install bokeh-sampledata` (or pass db_path=...)"
    try:
        root = importlib.resources.files("bokeh_sampledata")
    except ModuleNotFoundError as e:
        raise FileNotFoundError(f"package bokeh_sampledata is not installed: {hint}") from e
    path = Path(str(root / "_data" / "movies.db"))
    if not path.is_file():
        raise FileNotFoundError(f"movies.db not found at {path}: {hint}")
    return path


def normalise_name(name: str) -> str:
    """A person's name without parenthesised annotations and with collapsed whitespace.

    Parameters
    ----------
    name : str
        Raw name, e.g. ``" John Smith (screenplay)"``.

    Returns
    -------
    str
        ``"John Smith"``; ``""`` for an empty or ``"N/A"`` name.
    """
    out = _SPACE.sub(" ", _PAREN.sub(" ", name)).strip()
    return "" if out == "N/A" else out


def _split_list(field: str | None) -> list[str]:
    return [x.strip() for x in (field or "").split(",") if x.strip() and x.strip() != "N/A"]


@dataclass(frozen=True)
class _Parsed:
    """The whole database, parsed once (arrays are read-only)."""

    names: tuple[str, ...]  # vocabulary, sorted
    offsets: np.ndarray  # CSR of people ids per movie (all movies)
    ids: np.ndarray
    year: np.ndarray  # int64
    meter: np.ndarray  # float64, NaN when missing
    country: tuple[str, ...]  # main country, "" when missing
    genres: tuple[tuple[str, ...], ...]


@functools.lru_cache(maxsize=4)
def _parse(path: str) -> _Parsed:
    uri = Path(path).resolve().as_uri() + "?mode=ro"
    try:
        con = sqlite3.connect(uri, uri=True)
        try:
            rows = con.execute(
                'SELECT o.ID, o.Year, o.Genre, o.Director, o.Writer, o."Cast", o.Country, t.Meter '
                "FROM omdb o LEFT JOIN tomatoes t ON o.ID = t.ID ORDER BY o.ID"
            ).fetchall()
        finally:
            con.close()
    except sqlite3.Error as e:
        raise DataError(f"cannot read movies database {path}: {e}; is it the bokeh-sampledata movies.db?") from e
    if not rows:
        raise DataError(f"movies database {path} has no movies in table omdb")
    people = []
    for r in rows:
        names = {normalise_name(x) for field in r[3:6] for x in (field or "").split(",")}
        names.discard("")
        people.append(sorted(names))
    vocab = sorted({p for ps in people for p in ps})
    index = {p: i for i, p in enumerate(vocab)}
    lengths = np.fromiter((len(ps) for ps in people), dtype=np.int64, count=len(people))
    offsets = np.zeros(len(people) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.fromiter((index[p] for ps in people for p in ps), dtype=np.int64, count=int(offsets[-1]))
    year = np.array([r[1] if r[1] is not None else -1 for r in rows], dtype=np.int64)
    meter = np.array([np.nan if r[7] is None else float(r[7]) for r in rows], dtype=np.float64)
    country = tuple((_split_list(r[6]) or [""])[0] for r in rows)
    genres = tuple(tuple(_split_list(r[2])) for r in rows)
    for a in (offsets, ids, year, meter):
        a.setflags(write=False)
    log.debug("parsed %s: %d movies, %d people", path, len(rows), len(vocab))
    return _Parsed(tuple(vocab), offsets, ids, year, meter, country, genres)


def _group_name(key: tuple) -> str:
    if len(key) == 1:
        return key[0]
    if len(key) == 2:
        return f"{key[0]}-{key[1]}s"
    return f"{key[0]}-{key[2]}"


def _children(key: tuple, members: np.ndarray, year: np.ndarray) -> dict[tuple, np.ndarray]:
    if len(key) == 1:
        sub = year[members] // 10 * 10
        return {(key[0], int(d)): members[sub == d] for d in np.unique(sub)}
    if len(key) == 2:
        sub = year[members]
        return {(key[0], key[1], int(y)): members[sub == y] for y in np.unique(sub)}
    return {}


def _groups(
    country: np.ndarray, year: np.ndarray, usable: np.ndarray, num_orgs: int, min_movies: int
) -> list[tuple[str, np.ndarray]]:
    """The ``num_orgs`` organisations as (name, movie indices), largest first."""
    usable_idx = np.flatnonzero(usable)
    by_country: dict[tuple, list[int]] = {}
    for i in usable_idx:
        by_country.setdefault((country[i],), []).append(int(i))
    groups = {k: np.array(v, dtype=np.int64) for k, v in by_country.items() if len(v) >= min_movies}

    def size_order(k: tuple) -> tuple:
        return (-len(groups[k]), _group_name(k))

    blocked: set[tuple] = set()  # groups whose split would not add an organisation
    while len(groups) < num_orgs:
        candidates = sorted((k for k in groups if len(k) < 3 and k not in blocked), key=size_order)
        for k in candidates:
            kids = {c: m for c, m in _children(k, groups[k], year).items() if len(m) >= min_movies}
            if len(kids) >= 2:
                del groups[k]
                groups.update(kids)
                break
            blocked.add(k)
        else:
            raise DataError(
                f"cannot form {num_orgs} organisations with at least {min_movies} movies each: the movies "
                f"database allows at most {len(groups)} (country, decade or year groups); "
                f"ask for fewer organisations or lower min_movies"
            )
    keys = sorted(groups, key=size_order)[:num_orgs]
    return [(_group_name(k), groups[k]) for k in keys]


def _make_bags(p: _Parsed, movies: np.ndarray, targets: np.ndarray) -> Bags:
    all_bags = Bags(p.offsets, p.ids, np.zeros(len(p.year), dtype=np.int8))
    sub = all_bags.subset(movies)
    return Bags(sub.offsets, sub.ids, targets)


def load_movies(
    num_orgs: int = 5,
    scenario: str = "same",
    seed: int = 0,
    db_path: str | None = None,
    min_movies: int = MIN_MOVIES,
) -> FederatedData:
    """Federated people -> genres (or decade, meter) data from bokeh-sampledata's movies.db.

    See the module docstring for how ids, organisations and targets are built.

    Parameters
    ----------
    num_orgs : int
        Number of organisations (1 to 140 with the shipped database and ``min_movies=40``).
    scenario : str
        ``"same"`` (every organisation predicts genres) or ``"mixed"`` (targets cycle
        genres, decade, meter by rank).
    seed : int
        Seed of the train/val/test splits.
    db_path : str | None
        Path of a ``movies.db``; by default the one shipped in ``bokeh_sampledata``.
    min_movies : int
        Minimum number of usable movies of an organisation.

    Returns
    -------
    FederatedData
        ``vocab_size`` people, ``id_names`` their names, ``num_orgs`` organisations.

    Raises
    ------
    FileNotFoundError
        ``bokeh-sampledata`` is not installed (or ``db_path`` does not exist).
    DataError
        Unknown scenario, bad ``num_orgs``, or not enough movies for ``num_orgs``
        organisations.
    """
    if scenario not in SCENARIOS:
        raise DataError(f"unknown movies scenario {scenario!r}: use one of {SCENARIOS}")
    if int(num_orgs) < 1:
        raise DataError(f"num_orgs must be at least 1, got {num_orgs}")
    if int(min_movies) < 3:
        raise DataError(f"min_movies must be at least 3 (one movie per split), got {min_movies}")
    if db_path is None:
        path = movies_db_path()
    else:
        path = Path(db_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"movies database {path} does not exist: pass the path of a movies.db, or omit db_path "
                "to use the one of `pip install bokeh-sampledata`"
            )
    p = _parse(str(path.resolve()))

    country = np.array(p.country, dtype=object)
    has_genre = np.fromiter((len(g) > 0 for g in p.genres), dtype=bool, count=len(p.genres))
    usable = (np.diff(p.offsets) > 0) & (country != "") & (p.year >= 0) & has_genre
    groups = _groups(country, p.year, usable, int(num_orgs), int(min_movies))

    kept = np.sort(np.concatenate([m for _, m in groups]))
    genre_names = sorted({g for i in kept for g in p.genres[i]})
    genre_index = {g: j for j, g in enumerate(genre_names)}
    decades = sorted({int(y) // 10 * 10 for y in p.year[kept]})
    decade_index = {d: j for j, d in enumerate(decades)}
    decade_names = [f"{d}s" for d in decades]

    orgs = []
    one_decade: list[str] = []
    for rank, (name, movies) in enumerate(groups):
        target = "genres" if scenario == "same" else TARGET_CYCLE[rank % len(TARGET_CYCLE)]
        if target == "genres":
            kind, labels = "multilabel", genre_names
            y = np.zeros((len(movies), len(genre_names)), dtype=np.float32)
            for row, i in enumerate(movies):
                y[row, [genre_index[g] for g in p.genres[i]]] = 1.0
        elif target == "decade":
            kind, labels = "multiclass", decade_names
            y = np.array([decade_index[int(v) // 10 * 10] for v in p.year[movies]], dtype=np.int64)
            if len(np.unique(y)) == 1:
                one_decade.append(name)
        else:
            kind, labels = "multiclass", METER_LABELS
            meter = p.meter[movies]
            has = ~np.isnan(meter)
            if (~has).any():
                log.debug("organisation %s: dropping %d movies without a Meter", name, int((~has).sum()))
            movies, meter = movies[has], meter[has]
            y = (meter >= FRESH_METER).astype(np.int64)
        bags = _make_bags(p, movies, y)
        rng = np.random.default_rng([int(seed), zlib.crc32(name.encode())])
        tr, va, te = split_indices(len(bags), rng)
        orgs.append(
            OrgData(name, target, kind, len(labels), list(labels), bags.subset(tr), bags.subset(va), bags.subset(te))
        )
        log.debug("organisation %d %s: target %s, %d/%d/%d movies", rank, name, target, len(tr), len(va), len(te))
    if one_decade:
        log.warning(
            "%d organisations predict the decade but see a single decade (trivial task): %s",
            len(one_decade),
            ", ".join(one_decade[:5]) + (", ..." if len(one_decade) > 5 else ""),
        )
    log.info(
        "movies: %d organisations (%s), %d people, scenario %s",
        len(orgs),
        ", ".join(o.name for o in orgs[:6]) + (", ..." if len(orgs) > 6 else ""),
        len(p.names),
        scenario,
    )
    return FederatedData(vocab_size=len(p.names), orgs=orgs, id_names=list(p.names))
