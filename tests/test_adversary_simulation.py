"""Attacks inside a real Flower simulation (Ray workers run the organisations' ClientApp).

The hostile organisation is a Flower mod on its own ClientApp that rewrites its reply and
signs the result with its own identity key; the malicious coordinator is the real
coordinator with one stage sent twice.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import ray.cloudpickle
from flwr.app import Context, Message

from fedembed.config import RunConfig
from fedembed.identity import SIG_RECORD, Identity, sign_reply
from fedembed.secagg import server as secure_server
from fedembed.simulation import simulate
from fedembed.task import TaskSpec, simulated_federation
from fedembed.wire import encode_arrays

pytestmark = pytest.mark.slow
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the mods below run in Ray workers

TASK = TaskSpec("synthetic", {"seed": 0, "rows": 2000, "dim": 8})
ORGS = 3
FAKE_HEAD = {"head.0.weight": np.full((16, 8), 7.0, np.float32)}


_KEYS: list[str] = []  # the simulation's key directory, set before the ClientApp is shipped to Ray


def head_injector(msg: Message, context: Context, call_next) -> Message:
    """Organisation 1 adds a `head` record to every training reply and signs it with its own key."""
    out = call_next(msg, context)
    org = int(context.node_config["partition-id"])
    if org == 1 and msg.metadata.message_type == "train" and not out.has_error():
        cfg = msg.content["config"]
        out.content["head"] = encode_arrays(FAKE_HEAD)
        keys = Path(_KEYS[0])
        ident = Identity.load(keys / f"{org}.key", keys.parent / "roster.json")
        sign_reply(out.content, ident, str(cfg["run_key"]), int(cfg["round"]), "train", context.node_id)
    return out


def impersonator(msg: Message, context: Context, call_next) -> Message:
    """Organisation 2 says it is organisation 0 (signature name), with metrics of its choosing."""
    out = call_next(msg, context)
    if int(context.node_config["partition-id"]) == 2 and not out.has_error() and SIG_RECORD in out.content:
        out.content[SIG_RECORD]["name"] = "org-0"
    return out


def _simulate(tmp_path, mods, **kw):
    out = tmp_path / "run"
    _KEYS[:] = [str((out / "state" / "keys").resolve())]
    tasks, names, federation = simulated_federation(TASK, ORGS)
    cfg = RunConfig(federation=federation, rounds=2, **kw)
    return simulate(cfg, tasks, out, num_cpus=2, client_mods=mods, names=names)


def test_flower_head_injection_by_one_org_is_refused_every_round(tmp_path):
    log = _simulate(tmp_path, [head_injector])
    for r in log.rounds:
        assert "records outside the reply schema: ['head']" in r["rejected"]["org-1"]
        assert r["clients"] == 2 and r["rows_changed"] > 0
    assert "org-1" not in log.rounds[0]["metrics"]  # round 1's metrics rode on its refused round-2 reply


def test_flower_impersonation_is_refused_and_the_victim_keeps_its_own_metrics(tmp_path):
    log = _simulate(tmp_path, [impersonator])
    for r in log.rounds:
        bad = [who for who in r["rejected"] if who.startswith("node ")]
        assert len(bad) == 1 and "does not verify" in r["rejected"][bad[0]]
        assert "org-0" not in r["rejected"] and r["clients"] == 2
    final = log.final()
    assert set(final) >= {"org-0", "org-1"} and "org-2" not in final


def test_flower_coordinator_reasking_the_masked_stage_gets_refusals_only(tmp_path, monkeypatch):
    """The coordinator sends every organisation its `masked` message a second time (same round,
    same session): each organisation refuses, and no second masked vector exists anywhere."""
    orig = secure_server.SecureRound._exchange
    second: dict[int, object] = {}

    def reask(self, stage, contents, handle):
        orig(self, stage, contents, handle)
        if stage == "masked":
            for rep in self.coord.transport.exchange("train.masked", contents, self.cfg.round_timeout):
                second[rep.node] = rep.content

    monkeypatch.setattr(secure_server.SecureRound, "_exchange", reask)
    log = _simulate(tmp_path, None, secure=True, row_set="dense")
    assert len(second) == 3
    for content in second.values():
        assert content["info"]["status"] == "error" and "already answered" in content["info"]["error"]
        assert "masked" not in content
    assert all("abandoned" not in r and r["clients"] == 3 for r in log.rounds)
