"""SecAgg+ without Flower: N parties, random sparse updates, dropouts at every stage, all row-set modes."""

from __future__ import annotations

import numpy as np
import pytest
from secagg_harness import Harness

from conftest import run_config
from fedembed.coordinator import Coordinator
from fedembed.secagg.protocol import ClientSession, RoundAbandoned
from fedembed.task import TaskSpec


def _secure_sum(n, vectors, drop_before_share=(), drop_before_mask=(), drop_before_unmask=(), k=None, t=None):
    """Run the protocol for one 'values' phase; vectors by party (1-based)."""
    h = Harness(n, k=k, t=t)
    h.share(skip=drop_before_share)
    for p in h.clients:
        if p in drop_before_share or p in drop_before_mask:
            continue
        h.accept(p)
        h.deliver(p, vectors[p])
    responses = h.check_and_unmask(skip=drop_before_unmask)
    return h.server.finish("values", responses, vectors[1].size, vectors[1].dtype.type)


@pytest.mark.parametrize(
    "drops",
    [
        {},
        {"drop_before_share": {2}},
        {"drop_before_mask": {3}},
        {"drop_before_unmask": {4}},
        {"drop_before_share": {1}, "drop_before_mask": {2}, "drop_before_unmask": {5}},
    ],
    ids=["none", "before-share", "before-mask", "after-mask", "one-at-every-stage"],
)
def test_secure_sum_equals_the_plain_sum_of_the_parties_that_delivered(drops):
    n = 8  # k = 7, t = 5 of 8 holders: tolerates 3 dropouts per neighbourhood
    rng = np.random.default_rng(1)
    vectors = {p: rng.integers(0, 2**32, size=5000, dtype=np.uint32) for p in range(1, n + 1)}
    total = _secure_sum(n, vectors, **drops)
    gone = set(drops.get("drop_before_share", ())) | set(drops.get("drop_before_mask", ()))
    expected = np.zeros(5000, dtype=np.uint32)
    for p, v in vectors.items():
        if p not in gone:
            expected += v
    assert np.array_equal(total, expected)


def test_sparse_neighbourhoods_with_dropouts_still_sum_exactly():
    n = 30
    rng = np.random.default_rng(2)
    vectors = {p: rng.integers(0, 255, size=2000, dtype=np.uint8) for p in range(1, n + 1)}
    total = _secure_sum(n, vectors, drop_before_mask={3, 17}, drop_before_unmask={8, 25}, k=8, t=5)
    expected = np.zeros(2000, dtype=np.uint8)
    for p, v in vectors.items():
        if p not in (3, 17):
            expected += v
    assert np.array_equal(total, expected)


def test_too_many_dropouts_abandon_the_sum():
    rng = np.random.default_rng(3)
    vectors = {p: rng.integers(0, 2**32, size=100, dtype=np.uint32) for p in range(1, 6)}
    with pytest.raises(RoundAbandoned):  # t = 3 of 5 holders; 3 gone before unmask leaves 2 shares
        _secure_sum(5, vectors, drop_before_unmask={1, 2, 3})


def test_tampered_replayed_and_misrouted_share_ciphertexts_are_complaints_against_their_sender():
    h = Harness(4)
    shares = h.share()
    u2, cts = h.server.masked_request(1)
    assert h.clients[1].accept_shares(h.roster, u2, cts) == {}  # the genuine ones open
    for name, bad in [
        ("tampered", (bytes([cts[2][0][0] ^ 1]) + cts[2][0][1:], cts[2][1])),
        ("misrouted", shares[2][3]),  # party 2's ciphertext for party 3, handed to party 1
    ]:
        h2 = Harness(4, keys=h.keys)
        h2.share()
        u2, cts2 = h2.server.masked_request(1)
        complaints = h2.clients[1].accept_shares(h2.roster, u2, {**cts2, 2: bad})
        assert list(complaints) == [2], name
        assert 2 not in h2.clients[1].received
    # replay: party 2's ciphertext for party 1 from a session of another round
    h3 = Harness(4, keys=h.keys)
    h3.share()
    u2, cts3 = h3.server.masked_request(1)
    complaints = h3.clients[1].accept_shares(h3.roster, u2, {**cts3, 2: cts[2]})
    assert list(complaints) == [2]


def test_session_survives_serialisation_between_stages():
    h = Harness(3)
    h.share()
    c = h.clients[1]
    again = ClientSession.from_json(c.to_json())
    assert again == c


def _chi2_uniform(values: np.ndarray, bins: int) -> float:
    counts = np.bincount(values, minlength=bins).astype(np.float64)
    expected = values.size / bins
    return float(((counts - expected) ** 2 / expected).sum())


def test_a_masked_vector_alone_is_statistically_uniform():
    # the most structured inputs there are: all zeros, and a 0/1 indicator of a few rows
    zeros = np.zeros(1_000_000, dtype=np.uint8)
    ones = zeros.copy()
    ones[:1000] = 1
    # chi-square with 255 degrees of freedom: mean 255, sd 22.6; 400 is > 6 sd (p < 1e-9)
    for vec in (zeros, ones):
        h = Harness(3, phases=("indicators", "values"))
        h.share()
        h.accept(1)
        assert _chi2_uniform(h.clients[1].mask_vector("indicators", vec), 256) < 400
    h = Harness(3)
    h.share()
    h.accept(1)
    masked = h.clients[1].mask_vector("values", np.zeros(1_000_000, dtype=np.uint32))
    assert _chi2_uniform((masked >> 24).astype(np.int64), 256) < 400  # top byte
    assert _chi2_uniform((masked & 0xFF).astype(np.int64), 256) < 400  # bottom byte
    # and unrelated to the input
    x = np.arange(1_000_000, dtype=np.uint32)
    h = Harness(3)
    h.share()
    h.accept(1)
    mx = h.clients[1].mask_vector("values", x)
    assert abs(np.corrcoef(x.astype(np.float64), mx.astype(np.float64))[0, 1]) < 0.01


def test_a_bad_share_from_one_holder_does_not_stop_the_sum():
    n = 5
    rng = np.random.default_rng(7)
    vectors = {p: rng.integers(0, 2**32, size=300, dtype=np.uint32) for p in range(1, n + 1)}
    h = Harness(n)
    h.share()
    for p in h.clients:
        h.accept(p)
        h.deliver(p, vectors[p])
    responses = h.check_and_unmask()
    responses[1] = {k: bytes(66) for k in responses[1]}  # party 1 answers garbage for everyone
    total = h.server.finish("values", responses, 300, np.uint32)
    expected = np.zeros(300, dtype=np.uint32)
    for v in vectors.values():
        expected += v
    assert np.array_equal(total, expected)


# ---------------------------------------------------------------- through the coordinator (no Flower)
def _run(tmp_path, direct_transport, secure, row_set="union", drop=None, rounds=1, orgs=4, **kw):
    task = TaskSpec("synthetic", {"orgs": orgs, "seed": 0, "rows": 3000, "dim": 4})
    cfg = run_config(task, rounds=rounds, secure=secure, row_set=row_set, drop=drop or {}, **kw)
    c = Coordinator(cfg, direct_transport(tmp_path / f"{secure}-{row_set}-{sorted((drop or {}).items())}", orgs, task=task))
    c.run()
    return c


STAGES = {
    "dense": ["train", "share", "masked", "check", "unmask"],
    "revealed": ["train", "share", "masked", "check", "unmask"],
    "union": ["train", "share", "indicators", "check_indicators", "unmask_indicators", "masked", "check", "unmask"],
}


@pytest.mark.parametrize("row_set", ["dense", "union", "revealed"])
def test_secure_round_equals_plain_round_with_a_dropout_at_every_stage(tmp_path, direct_transport, row_set):
    """With the consistency check on every group (``consistency_check="always"``): every stage is a message."""
    plain_all = _run(tmp_path, direct_transport, False)
    plain_without = _run(tmp_path, direct_transport, False, drop={"train": [1]})
    for stage in STAGES[row_set]:
        secure = _run(tmp_path, direct_transport, True, row_set, drop={stage: [1]}, consistency_check="always")
        entry = secure.log.rounds[-1]
        assert "abandoned" not in entry
        who = "org-1" if "org-1" in entry["rejected"] else "node 101"  # unnamed if it never replied
        assert "dropped at stage" in entry["rejected"][who]
        # an org that vanished after its masked values arrived is still in the sum; one that
        # vanished in the indicator phase sends no values
        after_mask = stage in ("check", "unmask")
        ref = plain_all if after_mask else plain_without
        bound = entry["secure"]["error_bound"]
        diff = np.abs(ref.tables.tables["ids"] - secure.tables.tables["ids"]).max()
        assert diff <= bound, (stage, diff, bound)
        stages = entry["stages"]
        assert set(STAGES[row_set]) <= set(stages)
        assert all(stages[s]["upload_bytes"] >= 0 and stages[s]["seconds"] >= 0 for s in STAGES[row_set])


@pytest.mark.parametrize("row_set", ["dense", "union", "revealed"])
def test_without_the_consistency_check_a_dropout_at_any_stage_still_sums_exactly(tmp_path, direct_transport, row_set):
    """``auto``: a group is unmasked without its check when the whole roster took part and nobody who shared
    dropped; a dropout before the unmask brings the check back, one during the unmask is tolerated as before."""
    plain_all = _run(tmp_path, direct_transport, False)
    plain_without = _run(tmp_path, direct_transport, False, drop={"train": [1]})
    skipped = [s for s in STAGES[row_set] if not s.startswith("check")]
    for stage in skipped:
        secure = _run(tmp_path, direct_transport, True, row_set, drop={stage: [1]})
        entry = secure.log.rounds[-1]
        assert "abandoned" not in entry, (stage, entry.get("abandoned"))
        who = "org-1" if "org-1" in entry["rejected"] else "node 101"
        assert "dropped at stage" in entry["rejected"][who]
        ref = plain_all if stage == "unmask" else plain_without
        diff = np.abs(ref.tables.tables["ids"] - secure.tables.tables["ids"]).max()
        assert diff <= entry["secure"]["error_bound"], (stage, diff)
        checked = any(s.startswith("check") for s in entry["stages"])
        # the check comes back exactly when someone who could have shared is missing from the sum
        assert checked == (stage in ("train", "masked", "indicators", "unmask_indicators")), (stage, sorted(entry["stages"]))
    clean = _run(tmp_path, direct_transport, True, row_set).log.rounds[-1]
    assert not any(s.startswith("check") for s in clean["stages"])


def test_union_upload_is_far_smaller_than_dense(tmp_path, direct_transport):
    dense = _run(tmp_path, direct_transport, True, "dense").log.rounds[-1]
    union = _run(tmp_path, direct_transport, True, "union").log.rounds[-1]
    assert union["upload_bytes"] < dense["upload_bytes"] / 3
    assert union["secure"]["rows"] < 3000


def test_too_many_dropouts_abandon_the_round_cleanly_and_the_next_round_runs(tmp_path, direct_transport):
    c = _run(tmp_path, direct_transport, True, "union", drop={"unmask@1": [1, 2]}, rounds=2, neighbours=3, threshold=3)
    r1, r2 = c.log.rounds
    assert "abandoned" in r1 and r1.get("rows_changed") is None
    assert "abandoned" not in r2 and r2["rows_changed"] > 0
    assert c.tables.version == 2
    plain = _run(tmp_path, direct_transport, False, rounds=1)
    # round 1 changed nothing: every row still at version 0 or stamped by round 2 only
    assert set(np.unique(c.tables.versions["ids"])) <= {0, 2}
    del plain


@pytest.mark.parametrize("row_set", ["dense", "union", "revealed"])
def test_secure_and_plain_runs_agree_bit_for_bit_over_several_rounds(tmp_path, direct_transport, row_set):
    plain = _run(tmp_path, direct_transport, False, rounds=3)
    secure = _run(tmp_path, direct_transport, True, row_set, rounds=3)
    assert np.array_equal(plain.tables.tables["ids"], secure.tables.tables["ids"])
    assert [r["rows_changed"] for r in plain.log.rounds] == [r["rows_changed"] for r in secure.log.rounds]
