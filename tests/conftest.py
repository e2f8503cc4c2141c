"""Shared test helpers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # examples/ is importable as a user's own package would be
    sys.path.insert(0, str(ROOT))

import functools  # noqa: E402

from fedembed.config import RunConfig  # noqa: E402
from fedembed.coordinator import Reply  # noqa: E402
from fedembed.identity import Identity, make_identities, sign_reply  # noqa: E402
from fedembed.org import Organisation, handle_content  # noqa: E402
from fedembed.spec import FederationSpec  # noqa: E402
from fedembed.task import TaskSpec, simulated_federation  # noqa: E402


@functools.lru_cache(maxsize=16)
def _federation(spec_json: str, orgs: int) -> FederationSpec:
    return simulated_federation(TaskSpec.from_json(spec_json), orgs)[2]


def run_config(task: TaskSpec, **kw) -> RunConfig:
    """A RunConfig for ``task`` simulated over ``task.options["orgs"]`` organisations (its federation spec derived)."""
    return RunConfig(federation=_federation(task.to_json(), int(task.options.get("orgs", 1))), **kw)


class DirectTransport:
    """Delivers coordinator messages straight to in-process organisations (no Flower).

    Every organisation gets a fresh identity key (``org-<i>`` in :attr:`roster`; pass
    ``roster=transport.roster`` to the Coordinator). ``tamper`` may rewrite a reply
    (node, content) -> content, to play a faulty org (``tamper3`` also gets the message
    type); every reply content is kept in ``seen`` for inspection.
    """

    def __init__(
        self, state_root: Path, num_orgs: int, tamper=None, names=None, policy=None, resign=True, task: TaskSpec | None = None
    ) -> None:
        if task is None:
            raise TypeError("DirectTransport needs the organisations' task (task=TaskSpec(...))")
        self.resign = resign
        names = names or [f"org-{i}" for i in range(num_orgs)]
        self.roster = make_identities(names, state_root / "keys")
        self.identities = [Identity.load(state_root / "keys" / f"{i}.key", self.roster) for i in range(num_orgs)]
        self.orgs = {
            100 + i: Organisation(i, state_root / f"org-{i}", self.identities[i], policy, task.for_org(i, num_orgs))
            for i in range(num_orgs)
        }
        self.tamper = tamper
        self.seen: list[tuple[int, str, object]] = []

    def node_ids(self, minimum: int, timeout: float) -> list[int]:
        return sorted(self.orgs)

    def exchange(self, message_type, contents, timeout):
        return list(self.exchange_iter(message_type, contents, timeout))

    def exchange_iter(self, message_type, contents, timeout):
        for node, content in contents.items():
            try:
                out = handle_content(self.orgs[node], content, message_type, node)
            except Exception as exc:  # what Flower turns into an error reply
                self.seen.append((node, message_type, exc))
                yield Reply(node, None, f"{type(exc).__name__}: {exc}")
                continue
            if self.tamper is not None:
                out = self.tamper(node, out, message_type) if getattr(self, "tamper_gets_type", False) else self.tamper(node, out)
                if self.resign and out is not None:  # the hostile org signs what it sends, as a real one would
                    cfg = content["config"]
                    out = sign_reply(out, self.identities[node - 100], str(cfg["run_key"]), int(cfg["round"]), message_type, node)
            self.seen.append((node, message_type, out))
            yield Reply(node, out)


@pytest.fixture
def direct_transport():
    return DirectTransport


def serving_worker(directory: Path, handler):
    """A :class:`fedembed.worker.Worker` for ``handler`` serving on a thread under ``directory``; yields it, closes it.

    For fixtures: ``yield from serving_worker(tmp_path / "org", handler)``.
    """
    import threading

    from fedembed.worker import Worker, socket_path

    w = Worker(socket_path(directory), handler)
    threading.Thread(target=w.serve_forever, daemon=True).start()
    yield w
    w.close()
