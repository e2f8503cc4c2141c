"""Secure aggregation of row-sparse embedding updates (SecAgg+, Bell et al. 2020).

The coordinator learns only the sum of the organisations' updates, never one
organisation's, and the round survives organisations that vanish at any stage.

Modules, bottom up:

- :mod:`~fedembed.secagg.primitives`: X25519, HKDF-SHA256, ChaCha20-Poly1305, the ChaCha20
  mask keystream, Shamir over GF(2^521 - 1). The only module that touches a cipher.
- :mod:`~fedembed.secagg.quantize`: fixed-point encoding into Z_(2^32) with a scale that
  cannot wrap for n organisations, and its error bound ``n / (2 s)``.
- :mod:`~fedembed.secagg.vector`: what is masked: per-row indicator counters, and
  ``weight * delta`` plus ``weight`` over the agreed row set.
- :mod:`~fedembed.secagg.graph`: the k-neighbour graph and the default k and t.
- :mod:`~fedembed.secagg.protocol`: :class:`ClientSession` / :class:`ServerSession`, the two
  state machines, with no transport in them.
- :mod:`~fedembed.secagg.client` / :mod:`~fedembed.secagg.server`: the stages as Flower
  records and Message API round trips (``train``, ``train.share``, ``train.indicators``,
  ``train.unmask_indicators``, ``train.masked``, ``train.unmask``).

What each ``row_set`` reveals to the coordinator: ``dense`` nothing beyond the sum;
``union`` which rows anyone touched and how many organisations touched each; ``revealed``
each organisation's own row ids (never their values).

Threat model: an honest-but-curious coordinator, or one that lies about who dropped
(organisations never reveal both secrets of one neighbour), colluding with fewer than
``t`` organisations of any neighbourhood. Not covered: a coordinator that sends different
participants different key sets (SecAgg+'s consistency round with signatures, which
needs a PKI of organisation signing keys), and organisations that submit bounded but
wrong values (a masked vector cannot be range-checked without zero-knowledge proofs;
quantization bounds what one organisation can add).
"""

from fedembed.secagg.protocol import ClientSession, ProtocolError, RoundAbandoned, ServerSession, ShareError

__all__ = ["ClientSession", "ServerSession", "RoundAbandoned", "ProtocolError", "ShareError"]
