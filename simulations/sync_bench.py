"""Sync bench (issue 14): download bytes per organisation per round, full sync against working-set sync.

Runs the coordinator and every organisation in this process (no Ray: organisations answer
one after another through :func:`fedembed.org.handle_content`, the very code a ClientApp
runs) once per sync policy, and measures, per organisation and round:

- ``download``: the serialized bytes of its ``train`` message (:func:`fedembed.wire.record_bytes`:
  plan + sync, what Flower ships);
- ``limit``: the physical limit, the rows of its working set that changed since it last
  saw them, at ``4 x dim`` bytes each (float32 values, nothing else);
- ``sync_rows``: the rows its sync carried; ``request_rows``: the rows its request names.

Rounds after the first (round 1 downloads nothing: version 0 is regenerated from the
seed) are averaged. The coordinator's memory is the rows and bytes of the sync records it
holds for a round (``records_rows``: rows of the per-request records, against their bound;
``records_bytes``: all records; ``fallbacks``: organisations that got the shared full sync
because per-request records were at their bound).

It also plays the coordinator against the ``padded`` request (``auto`` in plain rounds):
per organisation, the rows asked for beyond what its uploads showed (its *cover*), the
share of them that only its held-out data looks up, and how well a coordinator that ranks
the cover by how many *other* organisations uploaded each row picks those out (precision
of its top k, k = how many there are; chance = their share). Writes
``OUT/sync_bench.json`` and prints tables.

Usage::

    .venv/bin/python simulations/sync_bench.py --task movies --orgs 5 --rounds 3 --out runs/sync/movies5
    .venv/bin/python simulations/sync_bench.py --task movies --orgs 100 --rounds 3 --out runs/sync/movies100
    .venv/bin/python simulations/sync_bench.py --task synthetic --option rows=1000000 --option dim=64 \\
        --option touch=0.01 --orgs 5 --rounds 3 --out runs/sync/synthetic1m
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedembed.config import RunConfig  # noqa: E402
from fedembed.coordinator import REQUEST_RECORD_TABLES, Coordinator, Reply  # noqa: E402
from fedembed.identity import Identity, make_identities  # noqa: E402
from fedembed.org import Organisation, handle_content  # noqa: E402
from fedembed.task import TaskSpec, parse_options, simulated_federation  # noqa: E402
from fedembed.wire import decode_sync, decode_update, record_bytes  # noqa: E402
from fedembed.workingset import SyncPolicy, working_set  # noqa: E402

log = logging.getLogger("fedembed.sync_bench")


class InProcess:
    """Delivers each message to an in-process organisation and measures what it receives."""

    def __init__(self, state: Path, specs: list[TaskSpec], names: list[str], sync: str) -> None:
        self.roster = make_identities(names, state / "keys")
        self.orgs = {
            100 + i: Organisation(i, state / f"org-{i}", Identity.load(state / "keys" / f"{i}.key", self.roster), None,
                                  spec, "cpu", sync=SyncPolicy(sync))
            for i, spec in enumerate(specs)
        }
        self.coordinator: Coordinator | None = None
        self.rows: list[dict] = []  # one entry per (round, organisation)
        self.uploaded: dict[int, set[int]] = {n: set() for n in self.orgs}  # what each one's uploads showed
        self.records: list[tuple[int, int]] = []  # per exchange: sync records' rows and bytes the coordinator held

    def node_ids(self, minimum: int, timeout: float) -> list[int]:  # noqa: D102
        return sorted(self.orgs)

    def exchange(self, message_type, contents, timeout):  # noqa: D102
        return list(self.exchange_iter(message_type, contents, timeout))

    def exchange_iter(self, message_type, contents, timeout):  # noqa: D102
        c = self.coordinator
        # the sync records built for this exchange (the memory they cost): rows of the per-request ones (bounded), bytes of all
        version, rows = c._request_rows
        self.records.append((rows if version == c.tables.version else 0,
                             sum(record_bytes(r) for r in {id(r): r for r in c._sync_records.values()}.values())))
        for node, content in contents.items():
            org = self.orgs[node]
            since = int(content["config"]["since"])
            shapes = c.shapes
            sync = decode_sync(content["sync"], shapes)
            ws = working_set(org.task, shapes)
            changed = sum(int((c.tables.versions[n][ids] > since).sum()) for n, ids in ws.items())
            self.rows.append({
                "round": int(content["config"]["round"]), "type": message_type, "org": node - 100,
                "download": record_bytes(content), "sync_bytes": record_bytes(content) - _plan_bytes(content),
                "sync_rows": sum(int(rs.ids.size) for rs in sync.values()),
                "working_set_rows": sum(int(v.size) for v in ws.values()),
                "limit_rows": changed, "limit": sum(changed_n * 4 * shapes[n][1] for n, changed_n in
                                                    ((n, int((c.tables.versions[n][ids] > since).sum())) for n, ids in ws.items())),
            })
            self.rows[-1]["fallback"] = node in c.wants and not content["config"]["request"]
            try:
                out = handle_content(org, content, message_type, node)
            except Exception as exc:  # what Flower turns into an error reply
                yield Reply(node, None, f"{type(exc).__name__}: {exc}")
                continue
            if "update" in out:
                for tu in decode_update(out["update"], shapes).values():
                    self.uploaded[node].update(tu.ids.tolist())
            yield Reply(node, out)


def _plan_bytes(content) -> int:
    from flwr.app import RecordDict

    return record_bytes(RecordDict({"config": content["config"]}))


def run(task: TaskSpec, orgs: int, rounds: int, sync: str, seed: int, out: Path) -> dict:
    """One run with every organisation on policy ``sync``; per-round means of the measured rows."""
    specs, names, federation = simulated_federation(task, orgs)
    transport = InProcess(out / f"state-{sync}", specs, names, sync)
    cfg = RunConfig(federation=federation, rounds=rounds, seed=seed)
    c = Coordinator(cfg, transport, roster=transport.roster)
    transport.coordinator = c
    t0 = time.perf_counter()
    c.run()
    seconds = time.perf_counter() - t0
    train = [r for r in transport.rows if r["type"] == "train" and r["round"] > 1]
    rejected = sum(len(e["rejected"]) for e in c.log.rounds)
    requests = [sum(int(req.ids.size) for req in c.wants[n][0].values()) if n in c.wants else 0 for n in transport.orgs]
    mean = {k: float(np.mean([r[k] for r in train])) for k in ("download", "sync_bytes", "sync_rows", "working_set_rows",
                                                                  "limit_rows", "limit")}
    per_round = [sum(r["download"] for r in transport.rows if r["type"] == "train" and r["round"] == k)
                 for k in range(1, rounds + 1)]
    return {"sync": sync, "mean_per_org_round": mean, "download_per_round": per_round,
            "upload_per_round": [e["upload_bytes"] for e in c.log.rounds], "refused": rejected, "seconds": seconds,
            "request_rows": float(np.mean(requests)), "fallbacks": sum(bool(r.get("fallback")) for r in train),
            "records_rows": max(r for r, _ in transport.records), "records_bytes": max(b for _, b in transport.records),
            "records_bound_rows": int(REQUEST_RECORD_TABLES * sum(s[0] for s in c.shapes.values())),
            "attack": _attack(transport, c), "final": c.log.final().get("mean", {}), "tables_sha": _digest(c.tables.tables)}


def _attack(transport: InProcess, c: Coordinator) -> dict:
    """The coordinator's best guess at each organisation's held-out-only rows from its request and everyone's uploads.

    Per organisation: ``cover`` = rows asked for beyond what its own uploads showed;
    ``secret`` = those of them only its held-out data looks up (the ground truth, from its
    task); the attacker ranks the cover by how many other organisations uploaded each row
    (held-out rows of one organisation are often others' training rows, decoys are uniform
    over the table) and takes the top ``len(secret)``.
    """
    popularity = np.zeros(sum(s[0] for s in c.shapes.values()), dtype=np.int64)
    for up in transport.uploaded.values():
        popularity[list(up)] += 1
    covers, shares, precisions = [], [], []
    for node, org in transport.orgs.items():
        if node not in c.wants or len(c.shapes) != 1:
            continue
        name = next(iter(c.shapes))
        asked = c.wants[node][0][name].ids.astype(np.int64)
        cover = np.setdiff1d(asked, np.fromiter(transport.uploaded[node], np.int64))
        train = np.unique(org.task._split("train").ids) if hasattr(org.task, "_split") else np.zeros(0, np.int64)
        secret = np.intersect1d(cover, np.setdiff1d(working_set(org.task, c.shapes)[name], train))
        covers.append(cover.size)
        if cover.size == 0 or secret.size == 0:
            continue
        others = popularity[cover] - np.isin(cover, np.fromiter(transport.uploaded[node], np.int64))
        top = cover[np.argsort(-others, kind="stable")[: secret.size]]
        shares.append(secret.size / cover.size)
        precisions.append(float(np.isin(top, secret).mean()))
    return {"cover_rows": float(np.mean(covers)) if covers else 0.0,
            "held_out_share": float(np.mean(shares)) if shares else 0.0,
            "popularity_precision": float(np.mean(precisions)) if precisions else 0.0}


def _digest(tables: dict) -> str:
    import hashlib

    h = hashlib.sha256()
    for n in sorted(tables):
        h.update(np.ascontiguousarray(tables[n]).tobytes())
    return h.hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="movies")
    p.add_argument("--option", action="append", default=[], help="task option KEY=VALUE")
    p.add_argument("--orgs", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modes", default="full,working-set,auto", help="sync policies to run, comma-separated")
    p.add_argument("--out", type=Path, default=Path("runs/sync"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    task = TaskSpec(args.task, {"seed": args.seed, **parse_options(args.option)})
    load = os.getloadavg()
    results = [run(task, args.orgs, args.rounds, m, args.seed, args.out) for m in args.modes.split(",")]
    doc = {"task": args.task, "options": task.options, "orgs": args.orgs, "rounds": args.rounds,
           "load_before": load, "load_after": os.getloadavg(), "results": results}
    (args.out / "sync_bench.json").write_text(json.dumps(doc, indent=2))
    print(f"{args.task} {task.options} x {args.orgs} orgs, {args.rounds} rounds (means over rounds 2..{args.rounds}, "
          f"per organisation per round); load {load[0]:.1f} -> {doc['load_after'][0]:.1f}")
    print("| sync | download KiB | sync rows | working set rows | changed rows of it (limit) | limit KiB | "
          "download / limit | refused | tables |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|---|")
    for r in results:
        m = r["mean_per_org_round"]
        print(f"| {r['sync']} | {m['download'] / 1024:,.1f} | {m['sync_rows']:,.0f} | {m['working_set_rows']:,.0f} | "
              f"{m['limit_rows']:,.0f} | {m['limit'] / 1024:,.1f} | {m['download'] / max(m['limit'], 1):.2f} | "
              f"{r['refused']} | {r['tables_sha']} |")
    print()
    print("| sync | request rows / org | per-request record rows (bound) | records MiB | full-sync fallbacks | cover rows / org | "
          "held-out-only share of cover | popularity attack precision | seconds |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|")
    for r in results:
        a = r["attack"]
        print(f"| {r['sync']} | {r['request_rows']:,.0f} | {r['records_rows']:,} / {r['records_bound_rows']:,} | "
              f"{r['records_bytes'] / 2**20:,.1f} | {r['fallbacks']} | {a['cover_rows']:,.0f} | "
              f"{a['held_out_share']:.3f} | {a['popularity_precision']:.3f} | {r['seconds']:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
