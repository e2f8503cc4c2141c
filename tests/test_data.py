"""The dataset layer: Bags container, the real movies.db loader and the synthetic generator."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest

from fedembed.data import Bags, DataError, FederatedData, load_movies, make_synthetic, split_indices
from fedembed.data import movies as movies_mod
from fedembed.data.movies import normalise_name

FIVE = ["United States", "France", "United Kingdom", "Canada", "Germany"]


def bag_tuples(b: Bags) -> list[tuple[int, ...]]:
    return [tuple(b.ids[b.offsets[i] : b.offsets[i + 1]].tolist()) for i in range(len(b))]


def assert_same_data(a: FederatedData, b: FederatedData) -> None:
    assert a.vocab_size == b.vocab_size and [o.name for o in a.orgs] == [o.name for o in b.orgs]
    for x, y in zip(a.orgs, b.orgs):
        for split in ("train", "val", "test"):
            bx, by = getattr(x, split), getattr(y, split)
            np.testing.assert_array_equal(bx.offsets, by.offsets)
            np.testing.assert_array_equal(bx.ids, by.ids)
            np.testing.assert_array_equal(bx.targets, by.targets)


# ---------------------------------------------------------------- Bags / split_indices


def test_bags_subset_gathers_the_chosen_examples_in_order():
    b = Bags(np.array([0, 2, 2, 5]), np.array([1, 2, 3, 4, 5]), np.array([0, 1, 2]))
    s = b.subset(np.array([2, 0, 1, 2]))
    assert len(s) == 4
    assert bag_tuples(s) == [(3, 4, 5), (1, 2), (), (3, 4, 5)]
    np.testing.assert_array_equal(s.targets, [2, 0, 1, 2])
    assert s.offsets.dtype == np.int64 and s.ids.dtype == np.int64
    assert len(b.subset(np.array([], dtype=np.int64))) == 0


def test_bags_reject_inconsistent_arrays_and_bad_indices():
    with pytest.raises(DataError, match="len\\(ids\\)"):
        Bags(np.array([0, 3]), np.array([1, 2]), np.array([0]))
    with pytest.raises(DataError, match="targets"):
        Bags(np.array([0, 2]), np.array([1, 2]), np.array([0, 1]))
    b = Bags(np.array([0, 1]), np.array([7]), np.array([0]))
    with pytest.raises(DataError, match="subset indices"):
        b.subset(np.array([1]))


def test_split_indices_partitions_70_10_20_and_is_deterministic():
    tr, va, te = split_indices(1000, np.random.default_rng(3))
    assert (len(tr), len(va), len(te)) == (700, 100, 200)
    np.testing.assert_array_equal(np.sort(np.concatenate([tr, va, te])), np.arange(1000))
    again = split_indices(1000, np.random.default_rng(3))
    assert all(np.array_equal(x, y) for x, y in zip((tr, va, te), again))
    assert not np.array_equal(tr, split_indices(1000, np.random.default_rng(4))[0])
    small = split_indices(3, np.random.default_rng(0))
    assert [len(x) for x in small] == [1, 1, 1]


# ---------------------------------------------------------------- movies


def test_movies_five_orgs_are_the_largest_main_countries_with_nonempty_splits():
    data = load_movies(5)
    assert [o.name for o in data.orgs] == FIVE
    sizes = [len(o.train) + len(o.val) + len(o.test) for o in data.orgs]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] >= movies_mod.MIN_MOVIES
    for o in data.orgs:
        assert (o.target, o.kind) == ("genres", "multilabel")
        assert o.label_names == sorted(o.label_names) == data.orgs[0].label_names
        assert "Drama" in o.label_names and o.num_classes == len(o.label_names)
        for split in (o.train, o.val, o.test):
            assert len(split) > 0
            assert split.targets.dtype == np.float32 and split.targets.shape == (len(split), o.num_classes)
            assert (split.targets.sum(axis=1) >= 1).all()  # every movie has a genre
            assert (split.lengths() > 0).all()  # no empty bag
        n = len(o.train) + len(o.val) + len(o.test)
        assert abs(len(o.train) - 0.7 * n) <= 1 and abs(len(o.val) - 0.1 * n) <= 1


def test_movies_vocab_is_shared_sorted_and_independent_of_orgs_and_scenario():
    data = load_movies(5)
    assert data.id_names is not None and len(data.id_names) == data.vocab_size > 10_000
    assert data.id_names == sorted(set(data.id_names))  # sorted, unique
    assert not any("(" in n or n != n.strip() or not n for n in data.id_names)
    for o in data.orgs:
        for split in (o.train, o.val, o.test):
            assert split.ids.min() >= 0 and split.ids.max() < data.vocab_size
    # the same person has the same id whatever the federation looks like
    assert load_movies(100).vocab_size == load_movies(3, scenario="mixed").vocab_size == data.vocab_size
    # organisations really share people (that is the point of a shared table)
    us, fr = (set(np.unique(o.train.ids)) for o in data.orgs[:2])
    assert len(us & fr) > 100


def test_movies_names_are_normalised():
    assert normalise_name(" John Smith (screenplay)") == "John Smith"
    assert normalise_name("Sergeĭ (Sergeĭ Vasilʹevich)  Kostin") == "Sergeĭ Kostin"
    assert normalise_name("  ") == "" and normalise_name("N/A") == ""


def test_movies_splits_are_disjoint_and_deterministic_by_seed():
    a, b, c = load_movies(5, seed=0), load_movies(5, seed=0), load_movies(5, seed=1)
    assert_same_data(a, b)
    for oa, oc in zip(a.orgs, c.orgs):
        parts = [Counter(bag_tuples(getattr(oa, s))) for s in ("train", "val", "test")]
        union = parts[0] + parts[1] + parts[2]
        # a bag in two splits must be two different movies with the same people
        for i in range(3):
            for j in range(i + 1, 3):
                assert all(union[t] >= 2 for t in parts[i].keys() & parts[j].keys())
        # another seed re-splits the same movies
        other = Counter(bag_tuples(oc.train)) + Counter(bag_tuples(oc.val)) + Counter(bag_tuples(oc.test))
        assert other == union
        assert bag_tuples(oa.train) != bag_tuples(oc.train)


def test_movies_mixed_scenario_cycles_genres_decade_meter_by_rank():
    data = load_movies(5, scenario="mixed")
    assert [o.name for o in data.orgs] == FIVE
    assert [o.target for o in data.orgs] == ["genres", "decade", "meter", "genres", "decade"]
    assert [o.kind for o in data.orgs] == ["multilabel", "multiclass", "multiclass", "multilabel", "multiclass"]
    genres, decade, meter = data.orgs[0], data.orgs[1], data.orgs[2]
    assert data.orgs[3].label_names == genres.label_names
    assert decade.label_names == data.orgs[4].label_names
    assert decade.label_names == sorted(decade.label_names) and decade.label_names[-1] == "2010s"
    assert all(n.endswith("0s") and len(n) == 5 for n in decade.label_names)
    assert meter.num_classes == 2
    for o in (decade, meter):
        for split in (o.train, o.val, o.test):
            assert split.targets.dtype == np.int64
            assert split.targets.min() >= 0 and split.targets.max() < o.num_classes
    assert len(np.unique(decade.train.targets)) > 3
    assert set(np.unique(meter.train.targets)) == {0, 1}


def test_movies_100_orgs_split_countries_by_decade_then_year():
    data = load_movies(100)
    names = [o.name for o in data.orgs]
    assert len(names) == len(set(names)) == 100
    assert any(n.endswith("0s") and "-" in n for n in names)  # e.g. United States-2000s
    for o in data.orgs:
        assert len(o.train) + len(o.val) + len(o.test) >= movies_mod.MIN_MOVIES
        assert min(len(o.train), len(o.val), len(o.test)) > 0
    # countries not split stay whole; a group and its own sub-group never coexist
    for n in names:
        assert not any(m != n and m.startswith(n + "-") for m in names)


def test_movies_too_many_orgs_is_a_clear_error():
    with pytest.raises(DataError, match="cannot form 1000 organisations with at least 40 movies.*fewer"):
        load_movies(1000)
    with pytest.raises(DataError, match="unknown movies scenario"):
        load_movies(5, scenario="bogus")


def test_movies_missing_sample_data_says_how_to_install(monkeypatch, tmp_path):
    def missing(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(movies_mod.importlib.resources, "files", missing)
    with pytest.raises(FileNotFoundError, match="pip install bokeh-sampledata"):
        load_movies(5)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_movies(5, db_path=str(tmp_path / "nope.db"))


def test_movies_reload_is_fast_thanks_to_the_parse_cache():
    load_movies(5)
    t = time.perf_counter()
    for _ in range(3):
        load_movies(5)
    assert (time.perf_counter() - t) / 3 < 0.5


# ---------------------------------------------------------------- synthetic


def touched_fractions(data: FederatedData) -> list[float]:
    return [len(np.unique(o.train.ids)) / data.vocab_size for o in data.orgs]


@pytest.mark.parametrize("rows", [100_000, 1_000_000])
def test_synthetic_touch_fraction_is_calibrated(rows):
    data = make_synthetic(num_orgs=5, rows=rows, touch=0.01, seed=0)
    for f in touched_fractions(data):
        assert 0.01 / 1.5 <= f <= 0.01 * 1.5
        assert abs(f - 0.01) < 0.001  # in fact within 10%


def test_synthetic_other_touch_values_are_calibrated_too():
    for touch in (0.001, 0.05):
        for f in touched_fractions(make_synthetic(num_orgs=3, rows=100_000, touch=touch, seed=1)):
            assert touch / 1.5 <= f <= touch * 1.5


def test_synthetic_is_deterministic_by_seed():
    a, b = make_synthetic(num_orgs=3, rows=50_000, seed=7), make_synthetic(num_orgs=3, rows=50_000, seed=7)
    assert_same_data(a, b)
    c = make_synthetic(num_orgs=3, rows=50_000, seed=8)
    assert not np.array_equal(a.orgs[0].train.ids, c.orgs[0].train.ids)


def test_synthetic_orgs_share_a_popular_head_but_have_their_own_hot_rows():
    data = make_synthetic(num_orgs=5, rows=100_000, touch=0.01, seed=0)
    sets = [set(np.unique(o.train.ids).tolist()) for o in data.orgs]
    common = set.intersection(*sets)
    assert common  # a shared popular head
    most_popular = [Counter(o.train.ids.tolist()).most_common(1)[0][0] for o in data.orgs]
    assert len(set(most_popular)) == 1  # the hottest row is a head row, the same for all
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            jaccard = len(sets[i] & sets[j]) / len(sets[i] | sets[j])
            assert jaccard < 0.5  # mostly different rows
        # each org has many rows no other org touches
        others = set.union(*(s for k, s in enumerate(sets) if k != i))
        assert len(sets[i] - others) > 0.5 * len(sets[i])


def test_synthetic_ids_targets_and_shapes_are_valid():
    data = make_synthetic(num_orgs=4, rows=20_000, touch=0.02, seed=2, bag_size=6, num_classes=3)
    assert data.vocab_size == 20_000 and data.id_names is None and len(data.orgs) == 4
    for o in data.orgs:
        assert (o.kind, o.num_classes, len(o.label_names)) == ("multiclass", 3, 3)
        for split in (o.train, o.val, o.test):
            assert len(split) > 0 and (split.lengths() == 6).all()
            assert split.ids.min() >= 0 and split.ids.max() < data.vocab_size
            assert split.targets.dtype == np.int64 and set(np.unique(split.targets)) <= {0, 1, 2}
        assert len(np.unique(o.train.targets)) == 3  # no degenerate labelling
    assert len(o.train) + len(o.val) + len(o.test) >= 2000


def test_synthetic_million_rows_five_orgs_is_fast():
    t = time.perf_counter()
    data = make_synthetic(num_orgs=5, rows=1_000_000, touch=0.01, seed=3)
    assert time.perf_counter() - t < 5.0
    assert len(data.orgs) == 5


def test_synthetic_rejects_impossible_arguments():
    with pytest.raises(DataError, match="touch"):
        make_synthetic(touch=0.0)
    with pytest.raises(DataError, match="touch"):
        make_synthetic(rows=1000, touch=1.5)
    with pytest.raises(DataError, match="num_orgs"):
        make_synthetic(num_orgs=0)
