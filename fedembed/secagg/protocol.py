"""SecAgg+ (Bell et al. 2020) against an active coordinator: two state machines, no transport.

One session sums one or more *phases* (vectors: ``values``, the row deltas over the agreed
row set U, and in ``union`` mode ``indicators``, per-row counters that give a row set U).
Each phase is an independent SecAgg+ instance (its own mask key pair and self-mask seed)
sharing the key advertisement and the share exchange. Phases run in **groups**: the
phases of one group are masked, checked and unmasked in the same three stages (one message
each way carries all of them). A session's groups are fixed when it starts:

- ``[[values]]`` (``dense``, ``revealed``);
- ``[[indicators], [values]]`` (``union``, a session started with its own round): the
  indicator sum gives U, then the values are summed over it;
- ``[[values, indicators]]`` (``union``, a session set up ahead, in the previous round):
  the values over a U agreed before the round and the indicators of the next round's
  rows, in one group (see :mod:`fedembed.secagg.server` for how rounds overlap).

Every organisation holds the federation's **roster** (name -> identity key,
:mod:`fedembed.identity`) and a local :class:`SecurePolicy`, and trusts nothing the
coordinator says that it can check itself:

1. **advertise**: :meth:`ClientSession.new` makes an X25519 pair for share encryption and,
   per phase, an X25519 mask pair and a 32-byte self-mask seed. :meth:`ClientSession.advert`
   returns the public keys and a hash commitment to each seed, **signed** with the
   organisation's identity key over the session context.
2. **share**: the coordinator lists the parties that advertised (U1; a party's id is its
   position in the roster), names k and the threshold and sends each its neighbours'
   adverts. :meth:`ClientSession.make_shares` checks every advert's signature against its
   *own* roster (no Sybil, no substituted key, no low-order or copied key), derives the
   neighbour graph itself from the session and U1 (:func:`graph_seed`: the coordinator
   cannot choose anyone's neighbours) and refuses other neighbours, checks the neighbour
   count and the threshold against its policy (t at least a strict majority of its k + 1
   share holders), fixes all of it for the session, splits every seed and mask private key
   t-of-(k+1) and encrypts each neighbour's shares (X25519 + HKDF + ChaCha20-Poly1305;
   associated data binds run, round, sender, receiver), **signing** each ciphertext.
3. **mask** (once per group): the coordinator sends U2 (who shared) and, with the first
   group, the ciphertexts for the party. :meth:`ClientSession.accept_shares` checks each
   ciphertext's signature and opens it; a bad one is a *complaint against its sender*
   (the receiver stays in the round). :meth:`ClientSession.mask_group` adds to each
   phase's vector the self mask and, per neighbour in U2, the pairwise mask. A mask is
   applied once: the stage is never answered twice.
4. **check** (once per group, the consistency check of Bonawitz et al. 2017): the
   coordinator sends U3 (whose vectors arrived). :meth:`ClientSession.sign_group_check`
   checks it against its policy (it is in U3, enough delivered, no more of its neighbours
   missing from U3 than it will help recover: a neighbour that never shared counts as
   missing too) and signs, per phase, the statement ``(session, phase, n, U1, U2, U3, row
   set digest)``.
5. **unmask** (once per group): the coordinator forwards the signatures.
   :meth:`ClientSession.unmask_group` requires, for every phase, valid roster signatures
   on *its own* statement from at least :meth:`SecurePolicy.min_signers` parties of U3,
   then reveals, for each neighbour, its seed share if the neighbour is in U3 and its
   mask-key share if not: derived from the signed statement, never from a list in the
   message. :meth:`ServerSession.finish` recombines, checks each secret against its
   commitment (seeds) or advertised public key (mask keys), strips the masks and returns
   the sum.

Every stage is answered at most once per session and only in this order
(:func:`stage_order`); anything else is refused with :class:`ProtocolError` before
anything is revealed. If fewer than t of some neighbourhood answer, or too few vectors
were delivered, :class:`RoundAbandoned` is raised and the caller leaves its state
unchanged.

**Who is covered.** Honest organisations each sign one statement per phase, and a
statement needs ``floor((N + c) / 2) + 1`` signatures of the N-organisation roster, so
two conflicting statements cannot both gather enough signatures unless more than ``c``
organisations sign both: a coordinator colluding with at most ``c`` organisations
(``SecurePolicy.colluders``, default 0) cannot show parties different lists. With one
agreed U3, no honest holder reveals a seed share and a mask-key share of the same party,
so recovering one organisation's vector needs ``t`` colluding share holders of it. Masks
cancel within connected groups of delivered parties: with k < n - 1 the coordinator
learns the sum of each connected component of the delivered parties in a graph it
cannot choose, and each honest party keeps at least ``t - 1`` delivered neighbours in its
component (it refuses more missing neighbours than ``k + 1 - t``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from fedembed.config import node_flag
from fedembed.errors import FedembedError
from fedembed.identity import Identity, IdentityError, Roster
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
    statement,
)

log = logging.getLogger(__name__)

PHASES = ("indicators", "values")
MASK_STAGE = {"indicators": "indicators", "values": "masked"}
CHECK_STAGE = {"indicators": "check_indicators", "values": "check"}
UNMASK_STAGE = {"indicators": "unmask_indicators", "values": "unmask"}
MAX_SUBSETS = 64
"""Subsets of t shares tried per secret before a round is abandoned (bad shares)."""


class RoundAbandoned(FedembedError, RuntimeError):
    """Too few parties remain to finish the round's secure sum; nothing was learned."""


class ProtocolError(FedembedError, ValueError):
    """A request that breaks the protocol or the organisation's policy; nothing was revealed."""


def blob(value: object, what: str) -> bytes:
    """``value`` as bytes if a message carried it as bytes; else a :class:`ProtocolError` naming ``what``.

    Keys, shares, ciphertexts and signatures travel as byte strings. ``bytes(value)`` of
    anything else is no check: an integer ``n`` gives ``n`` zero bytes (``2**62``: a
    ``MemoryError``), a list of small integers gives bytes.
    """
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    raise ProtocolError(f"{what} is a {type(value).__name__}, not bytes")


Groups = list[list[str]]
"""Phases of a session grouped by the stages that carry them (see the module docstring)."""


def as_groups(phases: list[str] | Groups) -> Groups:
    """``phases`` as groups: a flat list of phases is one group per phase, in order.

    Raises
    ------
    ProtocolError
        An unknown phase, a phase twice, an empty group or no phase at all.
    """
    groups = [list(g) if isinstance(g, (list, tuple)) else [g] for g in phases]
    flat = [p for g in groups for p in g]
    if not flat or any(not g for g in groups) or len(set(flat)) != len(flat) or set(flat) - set(PHASES):
        raise ProtocolError(f"phases must be distinct, non-empty groups of {PHASES}, got {phases}")
    return groups


def group_stage(group: list[str], kind: str) -> str:
    """The stage name of ``kind`` (``mask``, ``check``, ``unmask``) for ``group``: a group with the
    values phase is carried by ``masked``/``check``/``unmask``, the indicators alone by
    ``indicators``/``check_indicators``/``unmask_indicators``."""
    table = {"mask": MASK_STAGE, "check": CHECK_STAGE, "unmask": UNMASK_STAGE}[kind]
    return table["values" if "values" in group else group[0]]


def stage_order(phases: list[str] | Groups) -> list[str]:
    """The secure stages of a session after ``train``, in the only order they are answered."""
    out = ["share"]
    for g in as_groups(phases):
        out += [group_stage(g, "mask"), group_stage(g, "check"), group_stage(g, "unmask")]
    return out


def graph_seed(context: bytes, parties: list[int], k: int) -> bytes:
    """Seed of the session's neighbour graph: bound to the session, its parties U1 and k.

    Every organisation derives the graph from it and refuses neighbours the graph does not
    give it, so a coordinator cannot hand a target neighbours of its choosing (colluders,
    or parties it will claim dropped); it can only choose U1, which the organisation checks
    against its roster and policy.
    """
    return hashlib.sha256(DOMAIN + b"graph|" + context + _ids(parties) + struct.pack(">I", k)).digest()


@dataclass(frozen=True)
class SecurePolicy:
    """The rules an organisation holds locally and checks every session against.

    Parameters
    ----------
    min_neighbours : int
        Fewest neighbours (share holders besides itself) it accepts.
    min_delivered : int
        Fewest delivered vectors it unmasks a sum of.
    colluders : int
        Organisations that may collude with the coordinator and still not break the
        consistency check: a statement needs ``floor((N + colluders) / 2) + 1`` roster
        signatures, and the threshold must exceed ``colluders``.
    row_sets : tuple of str
        Row-set modes it takes part in (``revealed`` tells the coordinator its row ids).
    require_secure : bool
        Take part in secure rounds only: a plain round (its update, row ids and all, in the
        clear) is refused (:attr:`plain_allowed`). ``row_sets`` rules secure rounds only.
    """

    min_neighbours: int = 2
    min_delivered: int = 2
    colluders: int = 0
    row_sets: tuple[str, ...] = ("dense", "union", "revealed")
    require_secure: bool = False

    @property
    def plain_allowed(self) -> bool:
        """Whether it takes part in plain rounds (see ``require_secure``)."""
        return not self.require_secure

    def __post_init__(self) -> None:
        if self.min_neighbours < 1 or self.min_delivered < 2 or self.colluders < 0:
            raise ValueError("secure policy: min_neighbours >= 1, min_delivered >= 2, colluders >= 0")
        bad = set(self.row_sets) - {"dense", "union", "revealed"}
        if bad or not self.row_sets:
            raise ValueError(f"secure policy: row sets must be among dense, union, revealed, got {self.row_sets}")

    def min_threshold(self, k: int) -> int:
        """Smallest t accepted with k neighbours: a strict majority of the k + 1 holders, above ``colluders``."""
        return max((k + 1) // 2 + 1, self.colluders + 1)

    @staticmethod
    def max_dropouts(k: int, t: int) -> int:
        """Most neighbours it helps recover the mask keys of (the k + 1 - t the threshold tolerates)."""
        return k + 1 - t

    def min_signers(self, roster_size: int) -> int:
        """Consistency signatures needed: more than half of ``roster_size + colluders``."""
        return (roster_size + self.colluders) // 2 + 1

    @staticmethod
    def from_mapping(d: Mapping[str, object]) -> SecurePolicy:
        """From node-config style keys ``secure-min-neighbours``, ``secure-min-delivered``,
        ``secure-colluders``, ``secure-row-sets`` (comma-separated), ``secure-required``
        (true/false); absent keys keep defaults."""
        kw: dict = {}
        for key, name in (("secure-min-neighbours", "min_neighbours"), ("secure-min-delivered", "min_delivered"),
                          ("secure-colluders", "colluders")):
            if key in d:
                kw[name] = int(d[key])  # type: ignore[arg-type]
        if "secure-row-sets" in d:
            kw["row_sets"] = tuple(x.strip() for x in str(d["secure-row-sets"]).split(",") if x.strip())
        kw["require_secure"] = node_flag(d, "secure-required", False)
        return SecurePolicy(**kw)


def session_context(run_key: str, round_: int) -> bytes:
    """Bytes binding every key and ciphertext of a session to its run and round."""
    return hashlib.sha256(DOMAIN + run_key.encode()).digest()[:16] + struct.pack(">Q", round_)


def _pair(a: int, b: int) -> bytes:
    return struct.pack(">II", min(a, b), max(a, b))


def _ids(xs: list[int]) -> bytes:
    return b"".join(struct.pack(">I", x) for x in sorted(xs))


def _share_ad(context: bytes, src: int, dst: int) -> bytes:
    return DOMAIN + b"share|" + context + struct.pack(">II", src, dst)


def seed_commitment(context: bytes, phase: str, seed: bytes) -> bytes:
    """SHA-256 commitment to a self-mask seed (lets the coordinator verify its reconstruction)."""
    return hashlib.sha256(DOMAIN + b"seed|" + phase.encode() + b"|" + context + seed).digest()


def pair_key(private: bytes, peer_public: bytes, me: int, peer: int, context: bytes, phase: str,
             bound: bytes = b"") -> bytes:
    """Keystream key of the pairwise mask of ``me`` and ``peer`` for ``phase`` (equal on both sides).

    ``bound`` is what the two must agree on for their masks to cancel: the values phase's
    row set U (its :func:`rowset_digest`). A coordinator that shows one party another U
    than its neighbours (the same length, one row swapped, so that the party encodes a row
    where the others encode an untouched one) gets pairwise masks that do not cancel, and a
    sum that is noise, instead of that party's own value of the row.
    """
    return derive_key(agree(private, peer_public), f"mask/pair/{phase}", context + _pair(me, peer) + bound)


def self_key(seed: bytes, party: int, context: bytes, phase: str) -> bytes:
    """Keystream key of the self mask of ``party`` for ``phase``."""
    return derive_key(seed, f"mask/self/{phase}", context + struct.pack(">I", party))


def pair_mask(
    private: bytes, peer_public: bytes, me: int, peer: int, context: bytes, phase: str, n: int, dtype: type,
    bound: bytes = b"",
) -> np.ndarray:
    """The pairwise mask of ``me`` and ``peer`` for ``phase`` (the same array on both sides; see :func:`pair_key`)."""
    return keystream(pair_key(private, peer_public, me, peer, context, phase, bound), n, dtype)


def self_mask(seed: bytes, party: int, context: bytes, phase: str, n: int, dtype: type) -> np.ndarray:
    """The self mask of ``party`` for ``phase``."""
    return keystream(self_key(seed, party, context, phase), n, dtype)


def advert_fields(phases: list[str]) -> list[str]:
    """The key fields of an advertisement, in signing order."""
    return ["enc"] + [f"{kind}.{p}" for p in phases for kind in ("mask", "commit")]


def advert_statement(context: bytes, name: str, adv: Mapping[str, bytes], phases: list[str]) -> bytes:
    """What an organisation signs when it advertises its session keys."""
    return statement("advert", context, name, *[bytes(adv[f]) for f in advert_fields(phases)])


def share_statement(context: bytes, src: int, dst: int, ciphertext: bytes) -> bytes:
    """What the sender of a share ciphertext signs."""
    return statement("share", context, src, dst, hashlib.sha256(ciphertext).digest())


def check_statement(context: bytes, phase: str, n: int, u1: list[int], u2: list[int], u3: list[int], extra: bytes) -> bytes:
    """The consistency statement of a phase: every signer saw the same parties, sharers and deliverers."""
    return statement("check", context, phase, n, _ids(u1), _ids(u2), _ids(u3), extra)


def check_advert(adv: Mapping[str, object], phases: list[str], roster: Roster, context: bytes, name: str) -> dict[str, bytes]:
    """A verified advertisement of ``name`` (keys usable, commitments sized, roster signature valid).

    Raises
    ------
    ProtocolError
        Naming ``name`` and what is wrong.
    """
    try:
        out = {f: blob(adv[f], f"advert field {f!r}") for f in advert_fields(phases)}
        sig = blob(adv["sig"], "advert signature")
        got = adv.get("name")
        got = got.decode(errors="replace") if isinstance(got, bytes) else got
        if got != name:
            raise ProtocolError(f"advert names {got!r}, expected {name!r}")
        check_public_key(out["enc"])
        for p in phases:
            check_public_key(out[f"mask.{p}"])
            if len(out[f"commit.{p}"]) != 32:
                raise CryptoError("seed commitment must be 32 bytes")
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"advert of {name!r} is malformed: {exc}") from exc
    if not roster.verify(name, advert_statement(context, name, out, phases), sig):
        raise ProtocolError(f"advert of {name!r} is not signed by its roster key (forged or altered)")
    out["name"] = name.encode()
    out["sig"] = sig
    return out


def _keys_of(adv: Mapping[str, bytes], phases: list[str]) -> list[bytes]:
    return [adv["enc"]] + [adv[f"mask.{p}"] for p in phases]


# =========================================================================== client
@dataclass
class ClientSession:
    """One organisation's side of a secure aggregation session (serialisable between stages).

    Parameters
    ----------
    context : bytes
        :func:`session_context` of the run and round.
    groups : list[list[str]]
        Vectors summed in this session (phases, :data:`PHASES`), grouped by the stages
        that carry them, in order (:func:`as_groups`).
    enc : KeyPair
        Share-encryption key pair.
    mask : dict[str, KeyPair]
        Mask key pair per phase.
    seeds : dict[str, bytes]
        Self-mask seed per phase.
    params : dict
        Session parameters fixed at the start from the organisation's own training
        (row-set mode, clip, weight cap, wire dtype, its table shapes); never re-read.
    """

    context: bytes
    groups: Groups
    enc: KeyPair = field(repr=False)
    mask: dict[str, KeyPair] = field(repr=False)
    seeds: dict[str, bytes] = field(repr=False)
    params: dict = field(default_factory=dict)
    name: str = ""
    step: int = 0
    party: int = 0
    n: int = 0
    u1: list[int] = field(default_factory=list)
    threshold: int = 0
    neighbours: dict[int, dict[str, bytes]] = field(default_factory=dict)
    received: dict[int, dict[str, bytes]] = field(default_factory=dict, repr=False)
    complaints: dict[int, str] = field(default_factory=dict)
    u2: list[int] = field(default_factory=list)
    checks: dict[str, dict] = field(default_factory=dict)
    revealed: dict[str, str] = field(default_factory=dict)
    k: int = 0

    @staticmethod
    def new(context: bytes, phases: list[str] | Groups, params: dict | None = None) -> ClientSession:
        """Fresh keys and seeds for a session (``phases``: a flat list, one group each, or groups)."""
        groups = as_groups(phases)
        flat = [p for g in groups for p in g]
        return ClientSession(
            context=context,
            groups=groups,
            enc=KeyPair.generate(),
            mask={p: KeyPair.generate() for p in flat},
            seeds={p: os.urandom(32) for p in flat},
            params=dict(params or {}),
        )

    # ---------------------------------------------------------------- order
    @property
    def phases(self) -> list[str]:
        """Every phase of the session, in stage order."""
        return [p for g in self.groups for p in g]

    @property
    def next_stage(self) -> str | None:
        """The one stage this session answers next (None when finished)."""
        order = stage_order(self.groups)
        return order[self.step] if self.step < len(order) else None

    @property
    def group(self) -> list[str]:
        """The group the next mask, check or unmask stage belongs to (the last one once finished)."""
        return self.groups[min(max(self.step - 1, 0) // 3, len(self.groups) - 1)]

    def _group_of(self, phase: str) -> list[str]:
        for g in self.groups:
            if phase in g:
                return g
        raise ProtocolError(f"phase {phase!r} is not part of this session ({self.phases})")

    def _expect(self, stage: str) -> None:
        order = stage_order(self.groups)
        if stage not in order:
            raise ProtocolError(f"stage {stage!r} is not part of this session ({', '.join(order)})")
        if self.next_stage != stage:
            what = "already answered" if order.index(stage) < self.step else "out of order"
            raise ProtocolError(f"stage {stage!r} refused: {what} (this session expects {self.next_stage!r} next)")

    def _mine(self) -> list[int]:
        return sorted(set(self.u2) & set(self.neighbours))

    def bound(self, phase: str) -> bytes:
        """What the pairwise masks of ``phase`` are bound to (:func:`pair_key`): the values phase's U, once known."""
        return bytes.fromhex(self.params.get("rowset_digest", "")) if phase == "values" else b""

    # ---------------------------------------------------------------- stage 1
    def advert(self, identity: Identity) -> dict[str, bytes | str]:
        """Signed public keys and seed commitments: ``name``, ``enc``, ``mask.<p>``, ``commit.<p>``, ``sig``."""
        self.name = identity.name
        out: dict[str, bytes | str] = {"enc": self.enc.public}
        for p in self.phases:
            out[f"mask.{p}"] = self.mask[p].public
            out[f"commit.{p}"] = seed_commitment(self.context, p, self.seeds[p])
        out["sig"] = identity.sign(advert_statement(self.context, identity.name, out, self.phases))  # type: ignore[arg-type]
        out["name"] = identity.name
        return out

    # ---------------------------------------------------------------- stage 2
    def make_shares(
        self,
        identity: Identity,
        policy: SecurePolicy,
        u1: list[int],
        threshold: int,
        neighbours: dict[int, Mapping[str, object]],
        k: int,
    ) -> dict[int, tuple[bytes, bytes]]:
        """Check the session's parties against the roster and policy, fix them, share the secrets.

        Parameters
        ----------
        identity : Identity
            Our identity (name, key, roster).
        policy : SecurePolicy
            Our local rules.
        u1 : list[int]
            Parties of the session (roster positions, 1-based).
        threshold : int
            t, as the coordinator proposes it.
        neighbours : dict[int, Mapping]
            Neighbour party id -> its signed advert.
        k : int
            The neighbour count the graph is drawn with; the neighbours must be exactly the
            ones :func:`fedembed.secagg.graph.neighbour_graph` gives this party for U1, k
            and :func:`graph_seed`.

        Returns
        -------
        dict[int, tuple[bytes, bytes]]
            Per neighbour: the share ciphertext and our signature of it.

        Raises
        ------
        ProtocolError
            Out of order, a party not in the roster, a forged, malformed, low-order or
            copied key, neighbours other than the session's graph gives, too few parties or
            neighbours, or a threshold below our rule.
        """
        self._expect("share")
        roster = identity.roster
        party = roster.party(identity.name)
        u1 = sorted(set(int(x) for x in u1))
        if party not in u1:
            raise ProtocolError(f"the party list does not hold us (party {party})")
        if any(not 1 <= x <= len(roster) for x in u1):
            raise ProtocolError("the party list names parties outside the roster")
        if len(u1) < policy.min_signers(len(roster)):
            raise ProtocolError(
                f"{len(u1)} parties in the session; the consistency check needs {policy.min_signers(len(roster))} "
                f"of the roster's {len(roster)} organisations"
            )
        if party in neighbours or not set(neighbours) <= set(u1):
            raise ProtocolError("neighbours must be other parties of the session")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ProtocolError(f"k must be a positive integer, got {k!r}")
        graph = neighbour_graph(u1, k, graph_seed(self.context, u1, k))
        if set(neighbours) != set(graph[party]):
            raise ProtocolError(
                f"neighbours {sorted(neighbours)} are not the ones the session's graph gives us ({graph[party]}): "
                "the coordinator chose them"
            )
        k_requested, k = k, len(neighbours)
        if k < policy.min_neighbours:
            raise ProtocolError(f"{k} neighbours; our policy needs at least {policy.min_neighbours}")
        if not policy.min_threshold(k) <= threshold <= k + 1:
            raise ProtocolError(
                f"threshold {threshold} refused: with {k} neighbours it must be in [{policy.min_threshold(k)}, {k + 1}]"
            )
        checked: dict[int, dict[str, bytes]] = {}
        seen = set(_keys_of({"enc": self.enc.public, **{f"mask.{p}": self.mask[p].public for p in self.phases}}, self.phases))
        for q in sorted(neighbours):
            try:
                adv = check_advert(neighbours[q], self.phases, roster, self.context, roster.name_of_party(q))
            except IdentityError as exc:
                raise ProtocolError(str(exc)) from exc
            keys = _keys_of(adv, self.phases)
            if seen & set(keys) or len(set(keys)) != len(keys):
                raise ProtocolError(f"party {q} ({roster.name_of_party(q)!r}) advertises a key already in use (copied)")
            seen |= set(keys)
            checked[q] = adv
        self.party, self.n, self.u1, self.threshold, self.neighbours = party, len(u1), u1, threshold, checked
        self.k = k_requested
        xs = sorted(checked) + [party]  # we hold a share of our own secrets too
        split = {}
        for p in self.phases:
            split[f"seed.{p}"] = shamir_split(self.seeds[p], threshold, xs)
            split[f"key.{p}"] = shamir_split(self.mask[p].private, threshold, xs)
        self.received = {party: {name: split[name][party] for name in self._share_names()}}
        out = {}
        for q in sorted(checked):
            plaintext = b"".join(split[name][q] for name in self._share_names())
            ct = seal(self._share_key(q), plaintext, _share_ad(self.context, party, q))
            out[q] = (ct, identity.sign(share_statement(self.context, party, q, ct)))
        self.step += 1
        return out

    def _share_names(self) -> list[str]:
        return [f"{kind}.{p}" for p in self.phases for kind in ("seed", "key")]

    def _share_key(self, q: int) -> bytes:
        return derive_key(agree(self.enc.private, self.neighbours[q]["enc"]), "share-key", self.context + _pair(self.party, q))

    # ---------------------------------------------------------------- stage 3
    def accept_shares(self, roster: Roster, u2: list[int], ciphertexts: Mapping[int, tuple[bytes, bytes]]) -> dict[int, str]:
        """Open the shares neighbours in U2 sent us; returns complaints against their senders.

        A missing ciphertext, one whose signature does not verify (altered on the way) or
        one that does not open (its sender's fault: it signed it) is a complaint, not an
        error: we stay in the round, we just cannot help recover that sender's secrets.

        Raises
        ------
        ProtocolError
            Out of order, U2 not within the session's parties or without us, ciphertexts
            from non-neighbours, or fewer than t sharing holders (our secrets could never
            be recovered).
        """
        self._expect(group_stage(self.groups[0], "mask"))
        if self.u2:
            raise ProtocolError("the shares were already accepted in this session (U2 is fixed)")
        u2 = sorted(set(int(x) for x in u2))
        if self.party not in u2 or not set(u2) <= set(self.u1):
            raise ProtocolError("U2 must hold us and only parties of the session")
        mine = sorted(set(u2) & set(self.neighbours))
        if len(mine) + 1 < self.threshold:
            raise ProtocolError(f"only {len(mine)} neighbours shared, threshold {self.threshold}")
        extra = set(ciphertexts) - set(mine)
        if extra:
            raise ProtocolError(f"shares from parties that are not sharing neighbours: {sorted(extra)}")
        names = self._share_names()
        received = {self.party: self.received[self.party]}
        complaints: dict[int, str] = {}
        for q in mine:
            if q not in ciphertexts:
                complaints[q] = "its share ciphertext for us is missing"
                continue
            ct, sig = (blob(x, f"party {q}'s share ciphertext") for x in ciphertexts[q])
            if not roster.verify(roster.name_of_party(q), share_statement(self.context, q, self.party, ct), sig):
                complaints[q] = "its share ciphertext does not carry its signature (altered on the way)"
                continue
            try:
                plain = open_sealed(self._share_key(q), ct, _share_ad(self.context, q, self.party))
                if len(plain) != SHARE_BYTES * len(names):
                    raise CryptoError("wrong plaintext length")
            except CryptoError as exc:
                complaints[q] = f"its signed share ciphertext does not open: {exc}"
                continue
            received[q] = {n: plain[i * SHARE_BYTES : (i + 1) * SHARE_BYTES] for i, n in enumerate(names)}
        for q, why in complaints.items():
            log.warning("secure aggregation: party %d: %s", q, why)
        self.u2, self.received, self.complaints = u2, received, complaints
        return complaints

    def mask_vector(self, phase: str, vector: np.ndarray) -> np.ndarray:
        """``vector`` + self mask + pairwise masks for a group of one phase (see :meth:`mask_group`)."""
        return self.mask_group({phase: vector})[phase]

    def mask_group(self, vectors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each phase's vector + its self mask + its pairwise masks with the neighbours in U2 (modular).

        Answers the group's mask stage once: a second call (a coordinator asking again,
        with any other parameters) is refused, so one mask never hides two plaintexts.

        Parameters
        ----------
        vectors : Mapping[str, np.ndarray]
            One vector per phase of the group the session is at, nothing else.

        Raises
        ------
        ProtocolError
            Out of order, shares not accepted yet, or not exactly the group's phases.
        """
        stage = group_stage(self._group_of(next(iter(vectors), "values")), "mask") if vectors else "masked"
        self._expect(stage)
        group = self.group
        if set(vectors) != set(group):
            raise ProtocolError(f"this mask stage masks {group}, got {sorted(vectors)}")
        if not self.u2:
            raise ProtocolError("the shares have not been accepted: U2 is unknown")
        out = {}
        for phase in group:
            v = np.ascontiguousarray(vectors[phase]).copy()
            keystream_add(self_key(self.seeds[phase], self.party, self.context, phase), v)
            bound = self.bound(phase)
            for q in self._mine():
                key = pair_key(self.mask[phase].private, self.neighbours[q][f"mask.{phase}"], self.party, q, self.context,
                               phase, bound)
                keystream_add(key, v, subtract=self.party > q)  # + toward a larger id, - toward a smaller
            out[phase] = v
        self.step += 1
        return out

    # ---------------------------------------------------------------- stage 4
    def sign_check(self, identity: Identity, policy: SecurePolicy, phase: str, u3: list[int], extra: bytes = b"") -> bytes:
        """Sign the consistency statement of a group of one phase (see :meth:`sign_group_check`)."""
        return self.sign_group_check(identity, policy, u3, {phase: extra})[phase]

    def sign_group_check(
        self, identity: Identity, policy: SecurePolicy, u3: list[int], extras: Mapping[str, bytes]
    ) -> dict[str, bytes]:
        """Sign each phase's consistency statement of the group after checking U3 against our policy.

        Parameters
        ----------
        u3 : list[int]
            Who delivered the group's vectors (one list: a party delivers all of a group's
            vectors in one reply, or none).
        extras : Mapping[str, bytes]
            Per phase of the group, what else its statement binds (the values phase: the
            digest of the row set U it was masked over).

        Raises
        ------
        ProtocolError
            Out of order, not exactly the group's phases, U3 without us (we delivered),
            outside U2, smaller than our minimum, or more of our neighbours missing from it
            (dropped, or never shared) than we help recover.
        """
        stage = group_stage(self._group_of(next(iter(extras), "values")), "check") if extras else "check"
        self._expect(stage)
        group = self.group
        if set(extras) != set(group):
            raise ProtocolError(f"this check stage covers {group}, got {sorted(extras)}")
        u3 = sorted(set(int(x) for x in u3))
        if self.party not in u3:
            raise ProtocolError("U3 leaves us out although we delivered our vector")
        if not set(u3) <= set(self.u2):
            raise ProtocolError("U3 names parties that did not share")
        index = self.groups.index(group)
        if index and not set(u3) <= set(self.checks[self.groups[index - 1][0]]["u3"]):
            raise ProtocolError("U3 names parties that did not deliver in the previous phase")
        if len(u3) < policy.min_delivered:
            raise ProtocolError(f"{len(u3)} vectors delivered; our policy unmasks sums of at least {policy.min_delivered}")
        missing = set(self.neighbours) - set(u3)  # a neighbour that never shared is as gone as one that dropped
        if len(missing) > policy.max_dropouts(len(self.neighbours), self.threshold):
            raise ProtocolError(
                f"{len(missing)} of our {len(self.neighbours)} neighbours missing from U3 (dropped or never shared); "
                f"we help recover at most {policy.max_dropouts(len(self.neighbours), self.threshold)}"
            )
        for phase in group:
            self.checks[phase] = {"u3": u3, "extra": bytes(extras[phase]).hex()}
        self.step += 1
        return {phase: identity.sign(self._check_statement(phase)) for phase in group}

    def _check_statement(self, phase: str) -> bytes:
        c = self.checks[phase]
        return check_statement(self.context, phase, self.n, self.u1, self.u2, c["u3"], bytes.fromhex(c["extra"]))

    # ---------------------------------------------------------------- stage 5
    def unmask(self, identity: Identity, policy: SecurePolicy, phase: str, signatures: Mapping[int, bytes]) -> dict[str, bytes]:
        """Our shares for a group of one phase (see :meth:`unmask_group`)."""
        return self.unmask_group(identity, policy, {phase: signatures})[phase]

    def unmask_group(
        self, identity: Identity, policy: SecurePolicy, signatures: Mapping[str, Mapping[int, bytes]]
    ) -> dict[str, dict[str, bytes]]:
        """Our shares for the coordinator, per phase of the group, as the signed statements say.

        For each neighbour in U2 (and ourselves): its seed share if it is in the agreed U3,
        its mask-key share if not; never both for one party and phase.

        Raises
        ------
        ProtocolError
            Out of order, not exactly the group's phases, or, for some phase, fewer valid
            roster signatures on our own statement than :meth:`SecurePolicy.min_signers`
            (the coordinator may be showing parties different lists). Nothing is revealed
            unless every phase of the group has its signatures.
        """
        stage = group_stage(self._group_of(next(iter(signatures), "values")), "unmask") if signatures else "unmask"
        self._expect(stage)
        group = self.group
        if set(signatures) != set(group):
            raise ProtocolError(f"this unmask stage covers {group}, got {sorted(signatures)}")
        roster = identity.roster
        need = policy.min_signers(len(roster))
        for phase in group:
            u3 = self.checks[phase]["u3"]
            stmt = self._check_statement(phase)
            valid = {self.party}
            for p, sig in signatures[phase].items():
                if p in u3 and p not in valid and roster.verify(roster.name_of_party(p), stmt, blob(sig, f"party {p}'s check signature")):
                    valid.add(p)
            if len(valid) < need:
                raise ProtocolError(
                    f"only {len(valid)} valid signatures on our view of phase {phase}, {need} needed: "
                    "the parties' lists of who shared and who delivered do not agree"
                )
        out: dict[str, dict[str, bytes]] = {}
        for phase in group:
            u3 = self.checks[phase]["u3"]
            shares = {}
            for q in sorted(set(self._mine()) | {self.party}):
                if q not in self.received:
                    continue  # its share never reached us (complaint sent)
                kind = "seed" if q in u3 else "key"
                tag = f"{phase}:{q}"
                if self.revealed.get(tag, kind) != kind:
                    raise ProtocolError(f"refusing to reveal both the seed and the mask key of party {q} in phase {phase}")
                self.revealed[tag] = kind
                shares[f"{kind}.{q}"] = self.received[q][f"{kind}.{phase}"]
            out[phase] = shares
        self.step += 1
        return out

    def unmask_fast(
        self, identity: Identity, policy: SecurePolicy, u3: list[int], extras: Mapping[str, bytes]
    ) -> dict[str, dict[str, bytes]]:
        """Our seed shares for the group without the consistency check, where it cannot matter.

        Allowed only when (checked here, from what the session fixed and our own roster and
        policy, never from the message): the session's parties are the **whole roster**, the
        graph is **complete** (every party holds a share of every party's secrets), the
        threshold is at least ``floor((N + colluders) / 2) + 1`` of the N holders, and U3
        is exactly U2 as we were told it (nobody who shared dropped). Only seed shares are
        revealed, never a mask-key share; the group's check stage is skipped and can never
        be answered afterwards.

        Why no signed statement is needed then: a mask key is only ever revealed behind a
        statement signed by ``floor((N + c) / 2) + 1`` organisations, and a seed share here
        only by organisations that skipped the check (and so signed nothing). To rebuild
        both secrets of one party the coordinator would need ``t - c`` honest holders of
        one kind and ``floor((N + c) / 2) + 1 - c`` honest signers of the other, disjoint,
        among the ``N - c`` honest organisations: more than there are. Without any mask
        key, masks cancel only in sums over sets closed under every member's U2, each of
        at least ``t`` parties (more than half the roster), so at most one such sum exists.

        Raises
        ------
        ProtocolError
            Out of order, or any condition above not met (the coordinator must run the check).
        """
        stage = group_stage(self._group_of(next(iter(extras), "values")), "check") if extras else "check"
        self._expect(stage)
        group = self.group
        if set(extras) != set(group):
            raise ProtocolError(f"this unmask covers {group}, got {sorted(extras)}")
        size = len(identity.roster)
        if self.u1 != list(range(1, size + 1)):
            raise ProtocolError("no consistency check refused: the session's parties are not the whole roster")
        if len(self.neighbours) != self.n - 1:
            raise ProtocolError("no consistency check refused: the neighbour graph is not complete")
        need = (size + policy.colluders) // 2 + 1
        if self.threshold < need:
            raise ProtocolError(
                f"no consistency check refused: threshold {self.threshold} below the {need} it needs with "
                f"{size} organisations and {policy.colluders} colluders"
            )
        u3 = sorted(set(int(x) for x in u3))
        if u3 != sorted(self.u2):
            raise ProtocolError("no consistency check refused: U3 is not every party that shared (someone dropped)")
        if len(u3) < policy.min_delivered:
            raise ProtocolError(f"{len(u3)} vectors delivered; our policy unmasks sums of at least {policy.min_delivered}")
        out: dict[str, dict[str, bytes]] = {}
        for phase in group:
            self.checks[phase] = {"u3": u3, "extra": bytes(extras[phase]).hex(), "fast": True}
            shares = {}
            for q in sorted(set(self._mine()) | {self.party}):
                if q not in self.received:
                    continue  # its share never reached us (complaint sent)
                tag = f"{phase}:{q}"
                if self.revealed.get(tag, "seed") != "seed":
                    raise ProtocolError(f"refusing to reveal both the seed and the mask key of party {q} in phase {phase}")
                self.revealed[tag] = "seed"
                shares[f"seed.{q}"] = self.received[q][f"seed.{phase}"]
            out[phase] = shares
        self.step += 2
        return out

    # ---------------------------------------------------------------- persistence
    def to_json(self) -> str:
        """Serialise (private material included: store only in the organisation's own state, 0600)."""
        h = bytes.hex
        return json.dumps(
            {
                "context": h(self.context),
                "groups": self.groups,
                "enc": h(self.enc.private),
                "mask": {p: h(kp.private) for p, kp in self.mask.items()},
                "seeds": {p: h(s) for p, s in self.seeds.items()},
                "params": self.params,
                "name": self.name,
                "step": self.step,
                "party": self.party,
                "n": self.n,
                "u1": self.u1,
                "threshold": self.threshold,
                "neighbours": {str(q): {k: h(v) for k, v in adv.items()} for q, adv in self.neighbours.items()},
                "received": {str(q): {k: h(v) for k, v in sh.items()} for q, sh in self.received.items()},
                "complaints": {str(q): v for q, v in self.complaints.items()},
                "u2": self.u2,
                "checks": self.checks,
                "revealed": self.revealed,
                "k": self.k,
            }
        )

    @staticmethod
    def from_json(text: str) -> ClientSession:
        """Inverse of :meth:`to_json`."""
        d = json.loads(text)
        b = bytes.fromhex
        return ClientSession(
            context=b(d["context"]),
            groups=as_groups(d["groups"]),
            enc=KeyPair.from_private(b(d["enc"])),
            mask={p: KeyPair.from_private(b(v)) for p, v in d["mask"].items()},
            seeds={p: b(v) for p, v in d["seeds"].items()},
            params=d["params"],
            name=d["name"],
            step=d["step"],
            party=d["party"],
            n=d["n"],
            u1=d["u1"],
            threshold=d["threshold"],
            neighbours={int(q): {k: b(v) for k, v in adv.items()} for q, adv in d["neighbours"].items()},
            received={int(q): {k: b(v) for k, v in sh.items()} for q, sh in d["received"].items()},
            complaints={int(q): v for q, v in d["complaints"].items()},
            u2=d["u2"],
            checks=d["checks"],
            revealed=d["revealed"],
            k=int(d.get("k", 0)),
        )


# =========================================================================== server
class ServerSession:
    """The coordinator's side: parties, graph, routing, consistency signatures, sums, mask removal.

    Parameters
    ----------
    context : bytes
        :func:`session_context` of the run and round.
    phases : list[str] or list[list[str]]
        Phases of the session, or its groups (:func:`as_groups`; the adverts sign the
        phases' keys in this order).
    adverts : dict[int, Mapping]
        Advert per node id; faulty ones (forged, malformed, low-order or copied keys) are
        dropped and listed by node in :attr:`faults`.
    names : dict[int, str]
        Roster name of each node (from its verified reply signature).
    roster : Roster
        The federation's roster.
    neighbours : int
        k (the graph is drawn from :func:`graph_seed`, as every organisation checks).
    threshold : int
        t (raised to a strict majority of the share holders if lower: organisations refuse less).
    """

    def __init__(
        self,
        context: bytes,
        phases: list[str] | Groups,
        adverts: Mapping[int, Mapping[str, object]],
        names: Mapping[int, str],
        roster: Roster,
        neighbours: int,
        threshold: int,
    ) -> None:
        self.context = context
        self.groups = as_groups(phases)
        self.phases = [p for g in self.groups for p in g]
        self.roster = roster
        self.faults: dict[int, str] = {}  # node -> reason
        good: dict[int, dict[str, bytes]] = {}
        for node, adv in adverts.items():
            try:
                good[node] = check_advert(adv, self.phases, roster, context, names[node])
            except Exception as exc:  # noqa: BLE001 - whatever one advert holds is its sender's fault, never the session's
                self.faults[node] = f"bad key advertisement: {type(exc).__name__}: {exc}"
        owners: dict[bytes, list[int]] = {}
        for node, adv in good.items():
            for key in set(_keys_of(adv, self.phases)):
                owners.setdefault(key, []).append(node)
        for nodes in (v for v in owners.values() if len(v) > 1):
            for node in nodes:  # nobody can tell the copier from the copied: both leave
                self.faults[node] = f"advertises a public key that {len(nodes) - 1} other organisation(s) also advertise"
                good.pop(node, None)
        self.node_of = {roster.party(names[node]): node for node in good}
        self.party_of = {node: p for p, node in self.node_of.items()}
        self.adverts = {p: good[n] for p, n in self.node_of.items()}
        parties = sorted(self.node_of)
        self.k = k = max(min(neighbours, len(parties) - 1), 1)
        self.graph = neighbour_graph(parties, k, graph_seed(context, parties, k)) if len(parties) > 1 else {p: [] for p in parties}
        degree = min((len(v) for v in self.graph.values()), default=0)
        floor = (degree + 1) // 2 + 1
        self.threshold = min(max(threshold, floor), degree + 1)
        if self.threshold != threshold:
            log.warning("secure aggregation: threshold %d -> %d (%d share holders)", threshold, self.threshold, degree + 1)
        self.u2: set[int] = set()
        self.routed: dict[int, dict[int, tuple[bytes, bytes]]] = {}
        self.delivered: dict[str, set[int]] = {p: set() for p in self.phases}
        self.sums: dict[str, np.ndarray] = {}
        self.statements: dict[str, bytes] = {}
        self.signatures: dict[str, dict[int, bytes]] = {p: {} for p in self.phases}
        self.bounds: dict[str, bytes] = {}  # phase -> what its pairwise masks are bound to (see bind)

    @property
    def parties(self) -> list[int]:
        """Party ids in the session (U1)."""
        return sorted(self.node_of)

    def share_request(self, party: int) -> dict[int, dict[str, bytes]]:
        """The signed adverts of ``party``'s neighbours."""
        return {q: self.adverts[q] for q in self.graph[party]}

    def route_shares(self, shares: Mapping[int, Mapping[int, tuple[bytes, bytes]]]) -> None:
        """Take each party's signed ciphertexts (dst -> (ct, sig)); a wrong set or signature is that party's fault."""
        for party, cts in shares.items():
            name = self.roster.name_of_party(party)
            if set(cts) != set(self.graph[party]):
                self.faults[self.node_of[party]] = "shares not addressed to exactly its neighbours"
                continue
            bad = [dst for dst, (ct, sig) in cts.items()
                   if not self.roster.verify(name, share_statement(self.context, party, dst, blob(ct, "a share ciphertext")),
                                             blob(sig, "a share signature"))]
            if bad:
                self.faults[self.node_of[party]] = f"share ciphertexts for parties {bad} are not signed by it"
                continue
            self.u2.add(party)
            for dst, (ct, sig) in cts.items():
                self.routed.setdefault(dst, {})[party] = (bytes(ct), bytes(sig))

    def masked_request(self, party: int) -> tuple[list[int], dict[int, tuple[bytes, bytes]]]:
        """U2 and the signed ciphertexts addressed to ``party``."""
        return sorted(self.u2), {src: ct for src, ct in self.routed.get(party, {}).items() if src in self.u2}

    def bind(self, phase: str, bound: bytes) -> None:
        """Fix what the pairwise masks of ``phase`` are bound to (:func:`pair_key`): the values phase's U digest.

        Only the masks of parties that dropped are removed with it; the others cancel in the
        sum if, and only if, every party masked over the same U.
        """
        self.bounds[phase] = bound

    def add_masked(self, phase: str, party: int, vector: np.ndarray, length: int, dtype: type) -> None:
        """Add one masked vector to the phase's running sum (validated; raises ProtocolError)."""
        if party not in self.u2:
            raise ProtocolError(f"party {party} did not share; its vector cannot be unmasked")
        if party in self.delivered[phase]:
            raise ProtocolError(f"party {party} already delivered a vector in phase {phase}")
        if phase in self.statements:
            raise ProtocolError(f"phase {phase} is closed: its consistency check has started")
        if vector.dtype != np.dtype(dtype) or vector.shape != (length,):
            raise ProtocolError(f"masked vector is {vector.dtype}{vector.shape}, expected {np.dtype(dtype)}({length},)")
        if phase in self.sums:
            self.sums[phase] += vector
        else:  # the running sum: the one vector-sized buffer the coordinator keeps
            self.sums[phase] = vector.copy() if not vector.flags.writeable or not vector.flags.owndata else vector
        self.delivered[phase].add(party)

    def check_request(self, phase: str, extra: bytes = b"") -> list[int]:
        """Close the phase: U3, the same for every party; fixes the statement signatures must cover."""
        u3 = sorted(self.delivered[phase])
        self.statements[phase] = check_statement(self.context, phase, len(self.parties), self.parties, sorted(self.u2), u3, extra)
        return u3

    def add_check(self, phase: str, party: int, signature: bytes) -> None:
        """Keep one party's consistency signature (raises ProtocolError unless it verifies)."""
        if party not in self.delivered[phase]:
            raise ProtocolError(f"party {party} did not deliver in phase {phase}")
        signature = blob(signature, "its consistency signature")
        if not self.roster.verify(self.roster.name_of_party(party), self.statements[phase], signature):
            raise ProtocolError("its consistency signature does not verify on the statement every party was sent")
        self.signatures[phase][party] = signature

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
            reconstruct the committed secret. The running sum is then left as it was
            (still masked): more shares may come.
        """
        secrets = self.recover(phase, responses, length, dtype, minimum)
        return self.strip(phase, secrets)

    def recover(
        self, phase: str, responses: dict[int, dict[str, bytes]], length: int, dtype: type, minimum: int = 2
    ) -> tuple[dict[int, bytes], dict[int, bytes]]:
        """The secrets :meth:`finish` needs: each delivered party's seed and each dropped sharer's mask key.

        Nothing is changed: a group's phases are all recovered before any is stripped.

        Raises
        ------
        RoundAbandoned, ProtocolError
            As :meth:`finish`.
        """
        delivered = self.delivered[phase]
        if len(delivered) < max(2, minimum):
            raise RoundAbandoned(f"phase {phase}: {len(delivered)} vectors delivered, {max(2, minimum)} needed")
        total = self.sums.get(phase)
        if total is None or total.shape != (length,) or total.dtype != np.dtype(dtype):
            got = "none" if total is None else f"{total.dtype}{total.shape}"
            raise ProtocolError(f"phase {phase}: the sum is {got}, expected {np.dtype(dtype)}({length},)")
        seeds = {}
        for j in sorted(delivered):
            shares = {q: r[f"seed.{j}"] for q, r in responses.items() if self._holds(q, j) and f"seed.{j}" in r}
            commit = self.adverts[j][f"commit.{phase}"]
            seeds[j] = self._combine(shares, j, phase, "seed", lambda v: seed_commitment(self.context, phase, v) == commit)
        keys = {}
        for j in sorted(self.u2 - delivered):
            shares = {q: r[f"key.{j}"] for q, r in responses.items() if self._holds(q, j) and f"key.{j}" in r}
            public = self.adverts[j][f"mask.{phase}"]
            keys[j] = self._combine(shares, j, phase, "key", lambda v: _public_of(v) == public)
        return seeds, keys

    def strip(self, phase: str, secrets: tuple[dict[int, bytes], dict[int, bytes]]) -> np.ndarray:
        """Remove the masks of ``phase`` from its running sum with :meth:`recover`'s secrets; the sum."""
        seeds, keys = secrets
        delivered = self.delivered[phase]
        total = self.sums.pop(phase)  # unmasked in place: this is the phase's last step
        for j, seed in seeds.items():
            keystream_add(self_key(seed, j, self.context, phase), total, subtract=True)
        bound = self.bounds.get(phase, b"")
        for j, private in keys.items():
            for i in sorted(set(self.graph[j]) & delivered):
                key = pair_key(private, self.adverts[i][f"mask.{phase}"], j, i, self.context, phase, bound)
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
                if n:
                    bad = sorted(set(shares) - set(subset))
                    log.warning("phase %s: shares of party %d's %s from some of %s were bad", phase, j, kind, bad)
                return secret
        raise RoundAbandoned(f"phase {phase}: no {self.threshold} shares rebuild the committed {kind} of party {j}")


def _public_of(private: bytes) -> bytes | None:
    try:
        return KeyPair.from_private(private).public
    except (CryptoError, ValueError):
        return None


def phases_for(row_set: str) -> list[str]:
    """Phases of a session in ``row_set`` mode."""
    return ["indicators", "values"] if row_set == "union" else ["values"]


def fresh_groups(row_set: str) -> Groups:
    """Groups of a session started with its own round: ``union`` sums the indicators (U) first."""
    return [["indicators"], ["values"]] if row_set == "union" else [["values"]]


def ahead_groups(row_set: str) -> Groups:
    """Groups of a session set up ahead: U is known before the round, so ``union`` masks the values
    and the next round's indicators together."""
    return [["values", "indicators"]] if row_set == "union" else [["values"]]


def rowset_digest(rowset: Mapping[str, np.ndarray]) -> bytes:
    """SHA-256 of a row set (signed in the values phase's consistency statement)."""
    h = hashlib.sha256()
    for name in sorted(rowset):
        ids = np.ascontiguousarray(rowset[name], dtype=np.int64)
        h.update(name.encode() + b"|" + len(ids).to_bytes(8, "big"))
        h.update(ids.tobytes())
    return h.digest()
