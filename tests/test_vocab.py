"""Vocabularies: published id files (with an OOV row) and salted hashing (fedembed.vocab)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedembed.vocab import Vocabulary, VocabularyError

ROOT = Path(__file__).resolve().parents[1]
IDS = ["sku-001", "sku-002", "Ünïcødé naïve", "日本語", "J45.909", "O'Brien, Mary"]


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _run_child(code: str, hash_seed: str = "0") -> str:
    env = _child_env()
    env["PYTHONHASHSEED"] = hash_seed  # str hash() differs from this process's: only a stable hash survives
    done = subprocess.run(
        [sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


# ----------------------------------------------------------------- file vocabularies


def test_round_trip_from_ids_write_load_gives_equal_vocab_same_digest_and_lookup(tmp_path: Path) -> None:
    vocab = Vocabulary.from_ids(IDS)
    path = vocab.write(tmp_path / "vocab.txt")
    assert path == tmp_path / "vocab.txt"
    loaded = Vocabulary.load(path)

    assert loaded == vocab
    assert loaded.digest == vocab.digest
    assert loaded.ids() == IDS
    probe = IDS[::-1] + ["not-there"]
    np.testing.assert_array_equal(loaded.lookup(probe), vocab.lookup(probe))
    # The digest is the SHA-256 of the bytes on disk, computed independently here.
    data = path.read_bytes()
    assert data == ("\n".join(IDS) + "\n").encode("utf-8")
    assert vocab.digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert not list(tmp_path.glob("*.tmp")), "the temporary file was left behind"


def test_load_without_trailing_newline_has_the_canonical_digest(tmp_path: Path) -> None:
    path = tmp_path / "v.txt"
    path.write_bytes("\n".join(IDS).encode("utf-8"))
    assert Vocabulary.load(path).digest == Vocabulary.from_ids(IDS).digest


def test_write_replaces_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "v.txt"
    path.write_text("old\nfile\nwith\nmore\nlines\nthan\nthe\nnew\none\n", encoding="utf-8")
    Vocabulary.from_ids(["x", "y"]).write(path)
    assert path.read_bytes() == b"x\ny\n"


def test_order_matters_same_ids_in_another_order_give_another_digest() -> None:
    a = Vocabulary.from_ids(IDS)
    b = Vocabulary.from_ids(IDS[1:] + IDS[:1])
    assert a.digest != b.digest
    assert a != b
    assert a.lookup(["sku-001"])[0] != b.lookup(["sku-001"])[0]


def test_unknown_ids_map_to_the_last_row_and_lookup_with_oov_counts_them() -> None:
    vocab = Vocabulary.from_ids(IDS)
    n = len(IDS)
    assert vocab.rows == n + 1
    assert vocab.size == n
    assert vocab.oov_row == n
    assert vocab.kind == "file"

    rows, oov = vocab.lookup_with_oov(["sku-002", "missing", "日本語", "", "sku-001 ", "SKU-001"])
    assert rows.dtype == np.int64
    assert rows.tolist() == [1, n, 3, n, n, n]
    assert oov == 4
    assert vocab.lookup_with_oov(IDS)[1] == 0
    np.testing.assert_array_equal(vocab.lookup(IDS), np.arange(n))
    assert vocab.id_of(n) is None
    assert [vocab.id_of(i) for i in range(n)] == IDS


def test_lookup_accepts_iterators_tuples_and_numpy_arrays_in_order() -> None:
    vocab = Vocabulary.from_ids(IDS)
    expected = [4, 0, len(IDS)]
    probe = ["J45.909", "sku-001", "nope"]
    assert vocab.lookup(iter(probe)).tolist() == expected
    assert vocab.lookup(tuple(probe)).tolist() == expected
    assert vocab.lookup(np.array(probe)).tolist() == expected
    assert vocab.lookup([]).shape == (0,)


def test_lookup_refuses_a_single_string_non_string_ids_and_unencodable_hashed_ids() -> None:
    for vocab in (Vocabulary.from_ids(IDS), Vocabulary.hashed(64)):
        with pytest.raises(TypeError, match="not one str"):
            vocab.lookup("sku-001")
        # ints passed by mistake must not silently land in the OOV row
        with pytest.raises(TypeError, match="position 1 is of type int"):
            vocab.lookup(["sku-001", 7])
    # A lone surrogate has no UTF-8 bytes: no file can hold it (OOV), no hash can take it.
    assert Vocabulary.from_ids(IDS).lookup_with_oov(["x\ud800"])[1] == 1
    with pytest.raises(VocabularyError, match="position 0 .*cannot be encoded as UTF-8"):
        Vocabulary.hashed(64).lookup(["x\ud800"])


@pytest.mark.parametrize(
    "ids, message",
    [
        (["a", "b", "a"], r"position 2 \(line 3\): duplicate id 'a' \(first at position 0 \(line 1\)\)"),
        (["a", "", "b"], r"position 1 \(line 2\): empty id"),
        (["a", "b\nc"], r"position 1 \(line 2\): id 'b\\nc' contains a line break"),
        (["a", "b", "c\r"], r"position 2 \(line 3\): id 'c\\r' contains a line break"),
        (["a", 3], r"position 1 \(line 2\): id 3 is of type int"),
        (["ok", "x\ud800"], r"position 1 \(line 2\): id 'x\\ud800' cannot be encoded as UTF-8"),
        ([], r"no ids"),
    ],
)
def test_from_ids_refuses_bad_ids_naming_the_first_one_and_its_position(ids: list, message: str) -> None:
    with pytest.raises(VocabularyError, match=message):
        Vocabulary.from_ids(ids)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"a\nb\nc\nb\n", r"line 4: duplicate id 'b' \(first at .*line 2\)"),
        (b"a\nb\n\nc\n", r"line 3: empty id"),
        (b"a\nb\nc\n\n", r"line 4: empty id"),
        (b"a\nb\xff\xfec\nd\n", r"line 2: not UTF-8"),
        (b"a\r\nb\r\n", r"line 1: id 'a\\r' contains a line break .*Windows line endings"),
        ("\ufeffa\nb\n".encode("utf-8"), r"line 1: starts with a byte-order mark"),
    ],
    ids=["duplicate", "blank-line", "two-trailing-newlines", "bad-utf8", "crlf", "bom"],
)
def test_bad_files_are_refused_naming_the_path_and_line_number(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(VocabularyError, match=message) as caught:
        Vocabulary.load(path)
    assert str(path) in str(caught.value)


def test_missing_and_empty_files_are_refused_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(VocabularyError, match="cannot be read") as caught:
        Vocabulary.load(missing)
    assert str(missing) in str(caught.value)
    assert isinstance(caught.value, ValueError)

    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(VocabularyError, match="empty") as caught:
        Vocabulary.load(empty)
    assert str(empty) in str(caught.value)


def test_id_of_refuses_rows_outside_the_table() -> None:
    vocab = Vocabulary.from_ids(IDS)
    for row in (-1, vocab.rows):
        with pytest.raises(VocabularyError, match="outside"):
            vocab.id_of(row)
    assert vocab.id_of(np.int64(2)) == IDS[2]


# ----------------------------------------------------------------- hashing


def test_hashing_is_the_same_in_a_fresh_python_process() -> None:
    probe = ["sku-001", "日本語", "J45.909", "O'Brien, Mary", "x"]
    here = {salt: Vocabulary.hashed(1000, salt).lookup(probe).tolist() for salt in ("", "pepper")}
    code = (
        "import json; from fedembed.vocab import Vocabulary\n"
        f"probe = {probe!r}\n"
        "print(json.dumps({s: Vocabulary.hashed(1000, s).lookup(probe).tolist() for s in ('', 'pepper')}))\n"
    )
    for seed in ("0", "12345"):
        assert json.loads(_run_child(code, hash_seed=seed)) == here


def test_hashed_rows_are_in_range_and_bucket_is_the_documented_blake2b() -> None:
    rng = random.Random(1)
    ids = [f"id-{rng.getrandbits(64):x}" for _ in range(5000)]
    for buckets in (1, 7, 2**16):
        vocab = Vocabulary.hashed(buckets, salt="s")
        rows, oov = vocab.lookup_with_oov(ids)
        assert rows.dtype == np.int64 and rows.shape == (len(ids),)
        assert rows.min() >= 0 and rows.max() < buckets
        assert oov == 0
        assert vocab.rows == vocab.size == buckets
        assert vocab.oov_row is None
        assert vocab.kind == "hash"
    vocab = Vocabulary.hashed(2**16, salt="s")
    expected = int.from_bytes(hashlib.blake2b("日本語".encode(), digest_size=8, key=b"s").digest(), "big") % 2**16
    assert vocab.lookup(["日本語"]).tolist() == [expected]


def test_different_salts_give_different_rows_and_digests_and_the_salt_is_not_in_the_digest() -> None:
    ids = [f"patient-{i}" for i in range(2000)]
    salt_a, salt_b = "correct-horse-battery", "staple-orange-lamp"
    a = Vocabulary.hashed(2**16, salt=salt_a)
    b = Vocabulary.hashed(2**16, salt=salt_b)
    plain = Vocabulary.hashed(2**16)
    assert np.mean(a.lookup(ids) != b.lookup(ids)) > 0.99
    assert np.mean(a.lookup(ids) != plain.lookup(ids)) > 0.99
    assert len({a.digest, b.digest, plain.digest}) == 3
    assert a != b
    for vocab, salt in ((a, salt_a), (b, salt_b)):
        assert salt not in vocab.digest
        assert salt not in repr(vocab) and salt not in json.dumps(vocab.describe())
        assert vocab.digest == f"blake2b-8:{2**16}:" + hashlib.sha256(salt.encode()).hexdigest()
    assert Vocabulary.hashed(2**16, salt=salt_a) == a
    assert Vocabulary.hashed(2**17, salt=salt_a) != a


def test_measured_collision_fraction_matches_collision_rate() -> None:
    rng = random.Random(20000)
    ids = list({f"{rng.getrandbits(64):016x}" for _ in range(20000)})
    assert len(ids) == 20000
    expected = Vocabulary.hashed(2**16).collision_rate(20000)
    assert expected == pytest.approx(1 - (1 - 2**-16) ** 19999)  # 0.263
    measured = []
    for salt in ("", "a", "b", "c", "d"):  # one draw varies by about 0.004 (sd); the mean of five by about 0.002
        rows = Vocabulary.hashed(2**16, salt=salt).lookup(ids)
        counts = np.bincount(rows, minlength=2**16)
        measured.append(float(np.mean(counts[rows] >= 2)))  # ids that share their bucket with another id
    assert all(abs(m - expected) < 0.02 for m in measured), (measured, expected)
    assert abs(np.mean(measured) - expected) < 0.01, (measured, expected)


def test_collision_rate_edge_cases_and_file_vocabularies_have_none() -> None:
    assert Vocabulary.from_ids(IDS).collision_rate(10**6) == 0.0
    vocab = Vocabulary.hashed(2**20)
    assert vocab.collision_rate(0) == vocab.collision_rate(1) == 0.0
    assert vocab.collision_rate(100_000) == pytest.approx(0.09096, abs=1e-5)  # the module docstring's example
    assert Vocabulary.hashed(1).collision_rate(2) == 1.0
    with pytest.raises(VocabularyError):
        vocab.collision_rate(-1)


@pytest.mark.parametrize("buckets", [0, -5, 2**63, 1.5, True, "10"])
def test_hashed_refuses_bad_bucket_counts(buckets: object) -> None:
    with pytest.raises(VocabularyError, match="buckets"):
        Vocabulary.hashed(buckets)  # type: ignore[arg-type]


def test_hashed_refuses_a_salt_longer_than_blake2b_keys() -> None:
    Vocabulary.hashed(8, salt="k" * 64)
    with pytest.raises(VocabularyError, match="at most 64"):
        Vocabulary.hashed(8, salt="k" * 65)


def test_hashing_vocabulary_has_no_ids_file_or_oov_row(tmp_path: Path) -> None:
    vocab = Vocabulary.hashed(16)
    with pytest.raises(VocabularyError):
        vocab.ids()
    with pytest.raises(VocabularyError):
        vocab.write(tmp_path / "v.txt")
    assert not (tmp_path / "v.txt").exists()
    assert vocab.id_of(3) is None


# ----------------------------------------------------------------- description, equality, imports


def test_describe_is_json_serialisable() -> None:
    file_vocab = Vocabulary.from_ids(IDS)
    hash_vocab = Vocabulary.hashed(2**16, salt="s")
    assert json.loads(json.dumps(file_vocab.describe())) == {
        "kind": "file",
        "size": len(IDS),
        "rows": len(IDS) + 1,
        "digest": file_vocab.digest,
    }
    assert json.loads(json.dumps(hash_vocab.describe())) == {
        "kind": "hash",
        "buckets": 2**16,
        "rows": 2**16,
        "digest": hash_vocab.digest,
    }


def test_equality_follows_the_digest_and_repr_is_short() -> None:
    a, b = Vocabulary.from_ids(IDS), Vocabulary.from_ids(list(IDS))
    assert a == b and hash(a) == hash(b)
    assert a != Vocabulary.hashed(len(IDS) + 1)
    assert a != a.digest
    text = repr(a)
    assert text.startswith("Vocabulary(kind='file', rows=7, digest='sha256:")
    assert len(text) < 80


def test_importing_vocab_pulls_in_neither_torch_nor_flower() -> None:
    out = _run_child("import sys, fedembed.vocab; print(sorted(m for m in ('torch', 'flwr') if m in sys.modules))")
    assert json.loads(out.replace("'", '"')) == []
