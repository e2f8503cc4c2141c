"""SecAgg+ (Bell et al. 2020) as two state machines, one per side, with no transport in them.

One round of secure aggregation over one or two *phases* (vectors summed in turn:
``values``, preceded by ``indicators`` in ``union`` mode). Each phase is an independent
SecAgg+ instance (its own mask key pair and self-mask seed) sharing the key
advertisement and the share exchange:

1. **advertise** (merged with local training): :meth:`ClientSession.new` makes an X25519
   pair for share encryption, and per phase an X25519 mask pair and a 32-byte self-mask
   seed; :meth:`ClientSession.advert` returns the public keys and a hash commitment to
   each seed.
2. **share**: the coordinator numbers the parties 1..n, draws the neighbour graph
   (:mod:`fedembed.secagg.graph`) and sends each its neighbours' adverts.
   :meth:`ClientSession.make_shares` splits every seed and mask private key t-of-k
   (Shamir) among its neighbours and itself (k + 1 holders) and encrypts each neighbour's shares with an AEAD key
   from X25519 + HKDF; the associated data binds run, round, sender and receiver.
3. **masked** (once per phase): the coordinator forwards each party the ciphertexts
   addressed to it and the set U2 of parties that shared. :meth:`ClientSession.accept_shares`
   opens them (a tampered, replayed or misrouted one raises :class:`ShareError`);
   :meth:`ClientSession.mask` adds to the vector its self mask and, for each neighbour in
   U2, the pairwise mask (+ toward a larger party id, - toward a smaller one), all
   ChaCha20 keystreams modulo 2^bits.
4. **unmask** (once per phase): for each neighbour that delivered its vector the party
   reveals its share of that neighbour's seed; for each that did not, its share of that
   neighbour's mask key; never both for one neighbour in one phase
   (:meth:`ClientSession.unmask` enforces it). :meth:`ServerSession.finish` recombines,
   checks each result against its commitment (seeds) or advertised public key (mask keys),
   strips the masks and returns the exact modular sum over the parties that delivered.

If fewer than t of some neighbourhood answer, or fewer than two vectors were delivered,
:class:`RoundAbandoned` is raised and the caller leaves its state unchanged.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fedembed.secagg.graph import neighbour_graph
from fedembed.secagg.primitives import (
    DOMAIN,
    SHARE_BYTES,
    CryptoError,
    KeyPair,
    agree,
    check_public_key,
    derive_key,
    keystream,
    keystream_add,
    open_sealed,
    seal,
    shamir_combine,
    shamir_split,
)

log = logging.getLogger(__name__)

PHASES = ("indicators", "values")
MAX_SUBSETS = 64
"""Subsets of t shares tried per secret before a round is abandoned (bad shares)."""


class ShareError(CryptoError):
    """A share ciphertext from a named party that fails to open or is missing."""

    def __init__(self, party: int, reason: str) -> None:
        super().__init__(f"share from party {party}: {reason}")
        self.party = party


class RoundAbandoned(RuntimeError):
    """Too few parties remain to finish the round's secure sum; nothing was learned."""


class ProtocolError(ValueError):
    """A request that breaks the protocol (inconsistent lists, unknown parties)."""


def session_context(run_key: str, round_: int) -> bytes:
    """Bytes binding every key and ciphertext of a session to its run and round."""
    return hashlib.sha256(DOMAIN + run_key.encode()).digest()[:16] + struct.pack(">Q", round_)


def _pair(a: int, b: int) -> bytes:
    return struct.pack(">II", min(a, b), max(a, b))


def _share_ad(context: bytes, src: int, dst: int) -> bytes:
    return DOMAIN + b"share|" + context + struct.pack(">II", src, dst)


def seed_commitment(context: bytes, phase: str, seed: bytes) -> bytes:
    """SHA-256 commitment to a self-mask seed (lets the coordinator verify its reconstruction)."""
    return hashlib.sha256(DOMAIN + b"seed|" + phase.encode() + b"|" + context + seed).digest()


def pair_key(private: bytes, peer_public: bytes, me: int, peer: int, context: bytes, phase: str) -> bytes:
    """Keystream key of the pairwise mask of ``me`` and ``peer`` for ``phase`` (equal on both sides)."""
    return derive_key(agree(private, peer_public), f"mask/pair/{phase}", context + _pair(me, peer))


def self_key(seed: bytes, party: int, context: bytes, phase: str) -> bytes:
    """Keystream key of the self mask of ``party`` for ``phase``."""
    return derive_key(seed, f"mask/self/{phase}", context + struct.pack(">I", party))


def pair_mask(
    private: bytes, peer_public: bytes, me: int, peer: int, context: bytes, phase: str, n: int, dtype: type
) -> np.ndarray:
    """The pairwise mask of ``me`` and ``peer`` for ``phase`` (the same array on both sides)."""
    return keystream(pair_key(private, peer_public, me, peer, context, phase), n, dtype)


def self_mask(seed: bytes, party: int, context: bytes, phase: str, n: int, dtype: type) -> np.ndarray:
    """The self mask of ``party`` for ``phase``."""
    return keystream(self_key(seed, party, context, phase), n, dtype)


# =========================================================================== client
@dataclass
class ClientSession:
    """One organisation's side of a secure aggregation session (serialisable between stages).

    Parameters
    ----------
    context : bytes
        :func:`session_context` of the run and round.
    phases : list[str]
        Vectors summed in this session, in order (subset of :data:`PHASES`).
    enc : KeyPair
        Share-encryption key pair.
    mask : dict[str, KeyPair]
        Mask key pair per phase.
    seeds : dict[str, bytes]
        Self-mask seed per phase.
    """

    context: bytes
    phases: list[str]
    enc: KeyPair
    mask: dict[str, KeyPair]
    seeds: dict[str, bytes]
    party: int = 0
    threshold: int = 0
    neighbours: dict[int, dict[str, bytes]] = field(default_factory=dict)
    received: dict[int, dict[str, bytes]] = field(default_factory=dict)
    u2: list[int] = field(default_factory=list)
    revealed: dict[str, str] = field(default_factory=dict)

    @staticmethod
    def new(context: bytes, phases: list[str]) -> ClientSession:
        """Fresh keys and seeds for a session."""
        bad = [p for p in phases if p not in PHASES]
        if bad or not phases:
            raise ProtocolError(f"phases must be a non-empty subset of {PHASES}, got {phases}")
        return ClientSession(
            context=context,
            phases=list(phases),
            enc=KeyPair.generate(),
            mask={p: KeyPair.generate() for p in phases},
            seeds={p: os.urandom(32) for p in phases},
        )

    # ---------------------------------------------------------------- stage 1
    def advert(self) -> dict[str, bytes]:
        """Public keys and seed commitments: ``enc``, ``mask.<phase>``, ``commit.<phase>``."""
        out = {"enc": self.enc.public}
        for p in self.phases:
            out[f"mask.{p}"] = self.mask[p].public
            out[f"commit.{p}"] = seed_commitment(self.context, p, self.seeds[p])
        return out

    # ---------------------------------------------------------------- stage 2
    def make_shares(self, party: int, threshold: int, neighbours: dict[int, dict[str, bytes]]) -> dict[int, bytes]:
        """Encrypted t-of-k shares of every seed and mask key, one ciphertext per neighbour.

        Parameters
        ----------
        party : int
            Our party id (1-based, from the coordinator).
        threshold : int
            t.
        neighbours : dict[int, dict[str, bytes]]
            Neighbour party id -> its advert.
        """
        if party in neighbours or not 1 <= threshold <= len(neighbours) + 1:
            raise ProtocolError(f"bad share request: party {party}, t={threshold}, {len(neighbours)} neighbours")
        for q, adv in neighbours.items():
            _check_advert(adv, self.phases, q)
        self.party, self.threshold, self.neighbours = party, threshold, dict(neighbours)
        xs = sorted(neighbours) + [party]  # we hold a share of our own secrets too
        split = {}
        for p in self.phases:
            split[f"seed.{p}"] = shamir_split(self.seeds[p], threshold, xs)
            split[f"key.{p}"] = shamir_split(self.mask[p].private, threshold, xs)
        self.received = {party: {name: split[name][party] for name in self._share_names()}}
        out = {}
        for q in sorted(neighbours):
            plaintext = b"".join(split[name][q] for name in self._share_names())
            key = derive_key(agree(self.enc.private, neighbours[q]["enc"]), "share-key", self.context + _pair(party, q))
            out[q] = seal(key, plaintext, _share_ad(self.context, party, q))
        return out

    def _share_names(self) -> list[str]:
        return [f"{kind}.{p}" for p in self.phases for kind in ("seed", "key")]

    # ---------------------------------------------------------------- stage 3
    def accept_shares(self, u2: list[int], ciphertexts: dict[int, bytes]) -> None:
        """Open the shares neighbours in U2 sent us; keep them for the unmask stages.

        Raises
        ------
        ShareError
            A ciphertext is missing, altered, replayed from another round or run, or was
            made for another receiver.
        ProtocolError
            Fewer than t neighbours shared (our secrets could never be recovered).
        """
        mine = sorted(set(u2) & set(self.neighbours))
        if len(mine) + 1 < self.threshold:
            raise ProtocolError(f"only {len(mine)} neighbours shared, threshold {self.threshold}")
        extra = set(ciphertexts) - set(mine)
        if extra:
            raise ProtocolError(f"shares from parties that are not sharing neighbours: {sorted(extra)}")
        names = self._share_names()
        received = {self.party: self.received[self.party]}
        for q in mine:
            if q not in ciphertexts:
                raise ShareError(q, "missing")
            key = derive_key(agree(self.enc.private, self.neighbours[q]["enc"]), "share-key", self.context + _pair(self.party, q))
            try:
                plain = open_sealed(key, ciphertexts[q], _share_ad(self.context, q, self.party))
            except CryptoError as exc:
                raise ShareError(q, str(exc)) from exc
            if len(plain) != SHARE_BYTES * len(names):
                raise ShareError(q, "wrong plaintext length")
            received[q] = {n: plain[i * SHARE_BYTES : (i + 1) * SHARE_BYTES] for i, n in enumerate(names)}
        self.u2 = mine
        self.received = received

    def mask_vector(self, phase: str, vector: np.ndarray) -> np.ndarray:
        """``vector`` + self mask + pairwise masks with the neighbours in U2 (modular, same dtype)."""
        if phase not in self.phases:
            raise ProtocolError(f"phase {phase!r} not in this session")
        out = np.ascontiguousarray(vector).copy()
        keystream_add(self_key(self.seeds[phase], self.party, self.context, phase), out)
        for q in self.u2:
            key = pair_key(self.mask[phase].private, self.neighbours[q][f"mask.{phase}"], self.party, q, self.context, phase)
            keystream_add(key, out, subtract=self.party > q)  # + toward a larger id, - toward a smaller
        return out

    # ---------------------------------------------------------------- stage 4
    def unmask(self, phase: str, alive: list[int], dropped: list[int]) -> dict[str, bytes]:
        """Our shares for the coordinator: seeds of ``alive`` neighbours, mask keys of ``dropped``.

        Raises
        ------
        ProtocolError
            Overlapping lists, parties we hold no shares of, fewer than t alive (counting
            ourselves), or a request that would reveal both secrets of one neighbour.
        """
        alive_s, dropped_s = set(alive), set(dropped)
        if alive_s & dropped_s:
            raise ProtocolError(f"parties both alive and dropped: {sorted(alive_s & dropped_s)}")
        unknown = (alive_s | dropped_s) - set(self.received)
        if unknown:
            raise ProtocolError(f"no shares held for parties {sorted(unknown)}")
        if self.party in dropped_s:
            raise ProtocolError("asked for our own mask key: we are alive")
        if len(alive_s | {self.party}) < self.threshold:
            raise ProtocolError(f"only {len(alive_s | {self.party})} parties alive in the neighbourhood, threshold {self.threshold}")
        out = {}
        for q, kind in [(q, "seed") for q in sorted(alive_s)] + [(q, "key") for q in sorted(dropped_s)]:
            tag = f"{phase}:{q}"
            if self.revealed.get(tag, kind) != kind:
                raise ProtocolError(f"refusing to reveal both the seed and the mask key of party {q} in phase {phase}")
            self.revealed[tag] = kind
            out[f"{kind}.{q}"] = self.received[q][f"{kind}.{phase}"]
        return out

    # ---------------------------------------------------------------- persistence
    def to_json(self) -> str:
        """Serialise (private material included: store only in the organisation's own state)."""
        h = bytes.hex
        return json.dumps(
            {
                "context": h(self.context),
                "phases": self.phases,
                "enc": h(self.enc.private),
                "mask": {p: h(kp.private) for p, kp in self.mask.items()},
                "seeds": {p: h(s) for p, s in self.seeds.items()},
                "party": self.party,
                "threshold": self.threshold,
                "neighbours": {str(q): {k: h(v) for k, v in adv.items()} for q, adv in self.neighbours.items()},
                "received": {str(q): {k: h(v) for k, v in sh.items()} for q, sh in self.received.items()},
                "u2": self.u2,
                "revealed": self.revealed,
            }
        )

    @staticmethod
    def from_json(text: str) -> ClientSession:
        """Inverse of :meth:`to_json`."""
        d = json.loads(text)
        b = bytes.fromhex
        return ClientSession(
            context=b(d["context"]),
            phases=d["phases"],
            enc=KeyPair.from_private(b(d["enc"])),
            mask={p: KeyPair.from_private(b(v)) for p, v in d["mask"].items()},
            seeds={p: b(v) for p, v in d["seeds"].items()},
            party=d["party"],
            threshold=d["threshold"],
            neighbours={int(q): {k: b(v) for k, v in adv.items()} for q, adv in d["neighbours"].items()},
            received={int(q): {k: b(v) for k, v in sh.items()} for q, sh in d["received"].items()},
            u2=d["u2"],
            revealed=d["revealed"],
        )


def _check_advert(adv: dict[str, bytes], phases: list[str], who: object) -> None:
    try:
        check_public_key(adv["enc"])
        for p in phases:
            check_public_key(adv[f"mask.{p}"])
            if len(adv[f"commit.{p}"]) != 32:
                raise CryptoError("seed commitment must be 32 bytes")
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"advert of {who} is malformed: {exc}") from exc


# =========================================================================== server
class ServerSession:
    """The coordinator's side: numbering, graph, routing, sums and mask removal.

    Parameters
    ----------
    context : bytes
        :func:`session_context` of the run and round.
    phases : list[str]
        Phases of the session.
    adverts : dict[int, dict[str, bytes]]
        Advert per node id (malformed ones are dropped and listed in :attr:`faults`).
    neighbours : int
        k.
    threshold : int
        t.
    seed : int
        Seed of the neighbour graph.
    """

    def __init__(
        self,
        context: bytes,
        phases: list[str],
        adverts: dict[int, dict[str, bytes]],
        neighbours: int,
        threshold: int,
        seed: int,
    ) -> None:
        self.context = context
        self.phases = list(phases)
        self.faults: dict[int, str] = {}  # node -> reason
        good = {}
        for node, adv in adverts.items():
            try:
                _check_advert(adv, self.phases, f"node {node}")
                good[node] = adv
            except ProtocolError as exc:
                self.faults[node] = str(exc)
        self.node_of = {i + 1: node for i, node in enumerate(sorted(good))}
        self.party_of = {node: p for p, node in self.node_of.items()}
        self.adverts = {p: good[n] for p, n in self.node_of.items()}
        parties = sorted(self.node_of)
        k = min(neighbours, len(parties) - 1)
        self.graph = neighbour_graph(parties, k, seed) if len(parties) > 1 else {p: [] for p in parties}
        holders = min((len(v) for v in self.graph.values()), default=0) + 1  # neighbours and oneself
        self.threshold = max(1, min(threshold, holders))
        if self.threshold != threshold:
            log.warning("secure aggregation: threshold lowered from %d to %d (%d share holders)", threshold, self.threshold, holders)
        self.u2: set[int] = set()
        self.routed: dict[int, dict[int, bytes]] = {}
        self.delivered: dict[str, set[int]] = {p: set() for p in self.phases}
        self.sums: dict[str, np.ndarray] = {}

    @property
    def parties(self) -> list[int]:
        """Party ids in the session."""
        return sorted(self.node_of)

    def share_request(self, party: int) -> dict[int, dict[str, bytes]]:
        """The adverts of ``party``'s neighbours."""
        return {q: self.adverts[q] for q in self.graph[party]}

    def route_shares(self, shares: dict[int, dict[int, bytes]]) -> None:
        """Take each party's ciphertexts (dst -> ct); parties whose set of receivers is wrong are faulty."""
        for party, cts in shares.items():
            if set(cts) != set(self.graph[party]) or not all(isinstance(c, bytes) for c in cts.values()):
                self.faults[self.node_of[party]] = "shares not addressed to exactly its neighbours"
                continue
            self.u2.add(party)
            for dst, ct in cts.items():
                self.routed.setdefault(dst, {})[party] = ct
        for party in self.parties:
            if party in self.u2 and len(set(self.graph[party]) & self.u2) + 1 < self.threshold:
                log.warning("secure aggregation: party %d has fewer than t sharing neighbours", party)

    def masked_request(self, party: int) -> tuple[list[int], dict[int, bytes]]:
        """U2 and the ciphertexts addressed to ``party``."""
        return sorted(self.u2), {src: ct for src, ct in self.routed.get(party, {}).items() if src in self.u2}

    def add_masked(self, phase: str, party: int, vector: np.ndarray, length: int, dtype: type) -> None:
        """Add one masked vector to the phase's running sum (validated; raises ProtocolError)."""
        if party not in self.u2:
            raise ProtocolError(f"party {party} did not share; its vector cannot be unmasked")
        if party in self.delivered[phase]:
            raise ProtocolError(f"party {party} already delivered a vector in phase {phase}")
        if vector.dtype != np.dtype(dtype) or vector.shape != (length,):
            raise ProtocolError(f"masked vector is {vector.dtype}{vector.shape}, expected {np.dtype(dtype)}({length},)")
        if phase in self.sums:
            self.sums[phase] += vector
        else:  # the running sum: the one vector-sized buffer the coordinator keeps
            self.sums[phase] = vector.copy() if not vector.flags.writeable or not vector.flags.owndata else vector
        self.delivered[phase].add(party)

    def unmask_request(self, phase: str, party: int) -> tuple[list[int], list[int]]:
        """(alive, dropped) among ``party`` and its sharing neighbours in ``phase``."""
        mine = (set(self.graph[party]) | {party}) & self.u2
        alive = sorted(mine & self.delivered[phase])
        return alive, sorted(mine - self.delivered[phase])

    def finish(self, phase: str, responses: dict[int, dict[str, bytes]], length: int, dtype: type, minimum: int = 2) -> np.ndarray:
        """The exact modular sum of the delivered vectors of ``phase``.

        Parameters
        ----------
        responses : dict[int, dict[str, bytes]]
            Per responding party, its :meth:`ClientSession.unmask` output.
        minimum : int
            Fewest delivered vectors for a sum (2 at least: one vector alone is not a sum).

        Raises
        ------
        RoundAbandoned
            Too few vectors, too few shares for some party, or shares that do not
            reconstruct the committed secret.
        """
        delivered = self.delivered[phase]
        if len(delivered) < max(2, minimum):
            raise RoundAbandoned(f"phase {phase}: {len(delivered)} vectors delivered, {max(2, minimum)} needed")
        total = self.sums.pop(phase)  # unmasked in place: finish is the phase's last step
        if total.shape != (length,) or total.dtype != np.dtype(dtype):
            raise ProtocolError(f"phase {phase}: the sum is {total.dtype}{total.shape}, expected {np.dtype(dtype)}({length},)")
        for j in sorted(delivered):
            shares = {q: r[f"seed.{j}"] for q, r in responses.items() if self._holds(q, j) and f"seed.{j}" in r}
            commit = self.adverts[j][f"commit.{phase}"]
            seed = self._combine(shares, j, phase, "seed", lambda v: seed_commitment(self.context, phase, v) == commit)
            keystream_add(self_key(seed, j, self.context, phase), total, subtract=True)
        for j in sorted(self.u2 - delivered):
            shares = {q: r[f"key.{j}"] for q, r in responses.items() if self._holds(q, j) and f"key.{j}" in r}
            public = self.adverts[j][f"mask.{phase}"]
            private = self._combine(shares, j, phase, "key", lambda v: _public_of(v) == public)
            for i in sorted(set(self.graph[j]) & delivered):
                key = pair_key(private, self.adverts[i][f"mask.{phase}"], j, i, self.context, phase)
                keystream_add(key, total, subtract=i < j)  # i added +m toward a larger id j, -m toward a smaller
        return total

    def _holds(self, q: int, j: int) -> bool:
        """Whether party ``q`` holds shares of party ``j``'s secrets (j's neighbours and j itself)."""
        return q == j or q in self.graph[j]

    def _combine(self, shares: dict[int, bytes], j: int, phase: str, kind: str, valid: Callable[[bytes], bool]) -> bytes:
        """Rebuild a secret from ``t`` of the shares, checked by ``valid``.

        A bad share (a faulty or malicious holder) only fails its own subsets: other
        subsets of ``t`` are tried, up to :data:`MAX_SUBSETS`, before giving up.
        """
        if len(shares) < self.threshold:
            raise RoundAbandoned(
                f"phase {phase}: {len(shares)} shares of the {kind} of party {j}, {self.threshold} needed"
            )
        for n, subset in enumerate(itertools.combinations(sorted(shares), self.threshold)):
            if n >= MAX_SUBSETS:
                break
            try:
                secret = shamir_combine({q: shares[q] for q in subset}, self.threshold)
            except CryptoError:
                continue
            if valid(secret):
                bad = sorted(set(shares) - set(subset)) if n else []
                if n:
                    log.warning("phase %s: shares of party %d's %s from some of %s were bad", phase, j, kind, bad)
                return secret
        raise RoundAbandoned(f"phase {phase}: no {self.threshold} shares rebuild the committed {kind} of party {j}")


def _public_of(private: bytes) -> bytes | None:
    try:
        return KeyPair.from_private(private).public
    except (CryptoError, ValueError):
        return None
