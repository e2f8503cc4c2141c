"""The benchmark (simulations/bench.py): its summary and targets, and a tiny real run."""

import json

import pytest

from simulations import bench
from simulations.flower_baselines import Meter, Call, Workload

WORK = Workload(rows=1000, dim=4, orgs=3, touch=0.05, seed=0, rounds=1, shares=3, threshold=2)


def _res(method, up, down, seconds, peak=10 * 2**20, rounds=2, warmup=1):
    return {
        "method": method,
        "warmup": warmup,
        "rounds": [
            {"round": r, "clients": 3, "upload_bytes": 3 * up, "download_bytes": 3 * down, "wall_seconds": seconds,
             "stages": {"train": {"seconds": seconds}}}
            for r in range(1, rounds + 1)
        ],
        "start_rss_bytes": 0,
        "peak_rss_bytes": peak,
    }


def test_summary_is_per_organisation_and_leaves_the_warmup_round_out():
    res = _res("fedembed-plain", 100, 50, 2.0)
    res["rounds"][0]["wall_seconds"] = 99.0  # warm-up: Ray start-up
    s = bench.summarise(res)
    assert s["measured_rounds"] == [2]
    assert s["upload_per_org"] == 100 and s["download_per_org"] == 50 and s["seconds_per_round"] == 2.0


def test_targets_say_met_not_met_or_not_run():
    s = {m: bench.summarise(r) for m, r in {
        "flower-fedavg": _res("flower-fedavg", 16_000, 16_000, 1.0),
        "flower-secaggplus": _res("flower-secaggplus", 32_000, 16_000, 30.0),
        "fedembed-plain": _res("fedembed-plain", 100, 50, 1.0),
        "fedembed-union": _res("fedembed-union", 2000, 50, 3.0),
    }.items()}
    t = bench.evaluate_targets(s, WORK)
    assert t["plain_upload_vs_dense_f32"]["status"] == "met" and t["plain_upload_vs_dense_f32"]["value"] == 160
    assert t["union_upload_vs_secaggplus"]["status"] == "not met"  # 16x < 30x
    assert t["union_speed_vs_secaggplus"]["status"] == "not met"  # 10x < 15x
    assert t["union_time_vs_plain"]["status"] == "not met"  # 3x > 2x
    assert t["dense_speed_vs_secaggplus"]["status"] == "not run"
    bench.print_report(s, t, WORK)  # renders


def test_meter_splits_rounds_and_stages_and_subtracts_its_own_time():
    m = Meter(calls=[Call("setup", 0.0, 3, 3, 10, 20, 0.0), Call("masked", 1.0, 3, 3, 100, 200, 0.5),
                     Call("setup", 5.0, 3, 3, 10, 20, 0.0)], t_end=6.0)
    r = m.rounds("setup")
    assert [x["round"] for x in r] == [1, 2]
    assert r[0]["stages"]["masked"]["seconds"] == 3.5 and r[0]["wall_seconds"] == 4.5
    assert r[0]["upload_bytes"] == 220 and r[1]["download_bytes"] == 10


@pytest.mark.slow
def test_tiny_benchmark_runs_flower_and_fedembed_and_writes_json(tmp_path):
    code = bench.main(["--rows", "2000", "--dim", "8", "--orgs", "3", "--touch", "0.05", "--rounds", "1", "--warmup", "0",
                       "--methods", "flower-fedavg,fedembed-union", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert code == 0, doc["errors"]
    fa, un = doc["methods"]["flower-fedavg"], doc["methods"]["fedembed-union"]
    assert fa["upload_per_org"] > 2000 * 8 * 4  # the dense float32 table, serialized
    assert 0 < un["upload_per_org"] and un["seconds_per_round"] > 0 and un["peak_rss_bytes"] > 0
    assert {"share", "masked", "unmask"} <= set(un["stage_seconds"])
    assert doc["targets"]["union_upload_vs_secaggplus"]["status"] == "not run"


def test_cheaper_metering_counts_the_same_bytes_as_record_bytes():
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    from fedembed.wire import record_bytes
    from simulations.flower_baselines import content_bytes

    c = RecordDict({"c": ConfigRecord({"x": [bytes(range(256)) * 1000], "y": 3}),
                    "a": ArrayRecord({"z": Array(np.arange(10_000))})})
    assert content_bytes(c) == record_bytes(c)
