"""Drives the secure-aggregation state machines directly (no transport), with a real roster."""

from __future__ import annotations

import numpy as np

from fedembed.identity import Identity, Roster
from fedembed.secagg.graph import default_threshold
from fedembed.secagg.primitives import SigningKey
from fedembed.secagg.protocol import ClientSession, SecurePolicy, ServerSession, session_context

CTX = session_context("run", 1)
_KEYS: dict[int, SigningKey] = {}


def keys_for(n: int) -> dict[int, SigningKey]:
    """Identity keys of parties 1..n (cached across tests: key generation is the slow part)."""
    for p in range(1, n + 1):
        _KEYS.setdefault(p, SigningKey.generate())
    return {p: _KEYS[p] for p in range(1, n + 1)}


class Harness:
    """n parties with identities in one roster (party p is ``org-<p:03d>``), a server session, stage helpers."""

    def __init__(self, n: int, phases=("values",), k=None, t=None, policy=None, context=CTX, keys=None, absent=0):
        """``absent``: roster members beyond the n parties, who take no part in the session."""
        everyone = keys or keys_for(n + absent)
        self.roster = Roster({f"org-{p:03d}": key.public for p, key in everyone.items()})
        self.keys = {p: key for p, key in everyone.items() if p <= n}
        self.ids = {p: Identity(f"org-{p:03d}", key, self.roster) for p, key in self.keys.items()}
        self.policy = policy or SecurePolicy()
        self.phases = list(phases)
        self.context = context
        self.clients = {p: ClientSession.new(context, self.phases) for p in self.ids}
        adverts = {p: c.advert(self.ids[p]) for p, c in self.clients.items()}  # node id == party id here
        k = n - 1 if k is None else k
        self.server = ServerSession(context, self.phases, adverts, {p: i.name for p, i in self.ids.items()},
                                    self.roster, k, t or default_threshold(min(k, n - 1)))

    def share(self, skip=()):
        s = self.server
        shares = {}
        for p, c in self.clients.items():
            if p in skip:
                continue
            shares[p] = c.make_shares(self.ids[p], self.policy, s.parties, s.threshold, s.share_request(p), s.k)
        s.route_shares(shares)
        return shares

    def accept(self, p):
        return self.clients[p].accept_shares(self.roster, *self.server.masked_request(p))

    def deliver(self, p, vector, phase="values"):
        masked = self.clients[p].mask_vector(phase, vector)
        self.server.add_masked(phase, p, masked, vector.size, vector.dtype.type)
        return masked

    def check_and_unmask(self, phase="values", skip=(), extra=b""):
        s = self.server
        u3 = s.check_request(phase, extra)
        for p in u3:
            s.add_check(phase, p, self.clients[p].sign_check(self.ids[p], self.policy, phase, u3, extra))
        return {p: self.clients[p].unmask(self.ids[p], self.policy, phase, s.signatures[phase])
                for p in u3 if p not in skip}


def random_vectors(n: int, size: int, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {p: rng.integers(0, 2**32, size=size, dtype=np.uint32) for p in range(1, n + 1)}
