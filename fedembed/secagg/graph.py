"""The SecAgg+ neighbour graph and its default size and threshold.

Each organisation masks against, and shares its secrets with, its k neighbours only
(Bell et al. 2020), so cost grows with k, not with the number of organisations. The graph
is a ring over a pseudo-random permutation of the parties with ``k/2`` neighbours on each
side (a k-regular, symmetric graph); with ``k >= n - 1`` it is complete.

The permutation is the parties sorted by ``SHA-256(seed || party)``: a pure function of
the seed and the party ids (no library's random stream, whose output may change between
versions), so every organisation can derive the graph itself and check the neighbours the
coordinator names (:func:`fedembed.secagg.protocol.graph_seed` binds the seed to the
session and its parties: the coordinator cannot pick anyone's neighbours).
"""

from __future__ import annotations

import hashlib
import math
import struct


def default_neighbours(n: int) -> int:
    """k for ``n`` parties: everyone up to 10 parties, then ``2 * ceil(log2 n) + 2`` (even)."""
    if n <= 10:
        return max(n - 1, 1)
    return min(n - 1, 2 * math.ceil(math.log2(n)) + 2)


def default_threshold(k: int) -> int:
    """t for k neighbours: a strict majority of the k + 1 share holders, ``(k + 1) // 2 + 1``.

    Each organisation's secrets are shared among its k neighbours and itself. A majority
    is what keeps a coordinator that lies about who dropped from collecting both the
    self-mask seed and the mask key of one organisation; up to ``k + 1 - t`` holders may
    vanish (3 organisations: t = 2 of 3, one may drop).
    """
    return (k + 1) // 2 + 1


def neighbour_graph(parties: list[int], k: int, seed: bytes) -> dict[int, list[int]]:
    """Neighbours of every party (sorted, excluding the party itself).

    Parameters
    ----------
    parties : list[int]
        Party ids (non-negative, below 2^32).
    k : int
        Neighbours per party (rounded up to even on a ring; everyone when ``k >= n - 1``).
    seed : bytes
        Seed of the permutation (:func:`fedembed.secagg.protocol.graph_seed`).
    """
    parties = sorted(set(int(p) for p in parties))
    n = len(parties)
    if k >= n - 1:
        return {p: [q for q in parties if q != p] for p in parties}
    half = math.ceil(k / 2)
    order = sorted(parties, key=lambda p: hashlib.sha256(bytes(seed) + struct.pack(">I", p)).digest())
    out: dict[int, set[int]] = {p: set() for p in parties}
    for i, p in enumerate(order):
        for d in range(1, half + 1):
            q = order[(i + d) % n]
            out[p].add(q)
            out[q].add(p)
    return {p: sorted(v) for p, v in out.items()}
