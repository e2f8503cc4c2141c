"""Shared test helpers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # examples/ is importable as a user's own package would be
    sys.path.insert(0, str(ROOT))

from fedembed.coordinator import Reply  # noqa: E402
from fedembed.org import Organisation, handle_content  # noqa: E402


class DirectTransport:
    """Delivers coordinator messages straight to in-process organisations (no Flower).

    ``tamper`` may rewrite a reply (node, content) -> content, to play a faulty org;
    every reply content is kept in ``seen`` for inspection.
    """

    def __init__(self, state_root: Path, num_orgs: int, tamper=None) -> None:
        self.orgs = {100 + i: Organisation(i, state_root / f"org-{i}") for i in range(num_orgs)}
        self.tamper = tamper
        self.seen: list[tuple[int, str, object]] = []

    def node_ids(self, minimum: int, timeout: float) -> list[int]:
        return sorted(self.orgs)

    def exchange(self, message_type, contents, timeout):
        return list(self.exchange_iter(message_type, contents, timeout))

    def exchange_iter(self, message_type, contents, timeout):
        for node, content in contents.items():
            try:
                out = handle_content(self.orgs[node], content)
            except Exception as exc:  # what Flower turns into an error reply
                self.seen.append((node, message_type, exc))
                yield Reply(node, None, f"{type(exc).__name__}: {exc}")
                continue
            if self.tamper is not None:
                out = self.tamper(node, out)
            self.seen.append((node, message_type, out))
            yield Reply(node, out)


@pytest.fixture
def direct_transport():
    return DirectTransport
