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
- :mod:`~fedembed.secagg.graph`: the k-neighbour graph (a pure function of a seed every
  organisation derives itself) and the default k and t.
- :mod:`~fedembed.secagg.protocol`: :class:`ClientSession` / :class:`ServerSession`, the two
  state machines, with no transport in them.
- :mod:`~fedembed.secagg.client` / :mod:`~fedembed.secagg.server`: the stages as Flower
  records and Message API round trips. A round's session is set up during the previous
  round (its advert and share exchange ride on that round's ``train`` and ``train.check``
  messages), so a round is ``train`` (with the masked update), ``train.check``,
  ``train.unmask``; the first round, and one whose organisations changed, starts its own
  (``train``, ``train.share``, [``train.indicators``, ``train.check_indicators``,
  ``train.unmask_indicators``], ``train.masked``, ``train.check``, ``train.unmask``).

What each ``row_set`` reveals to the coordinator: ``dense`` nothing beyond the sum;
``union`` which rows anyone's training data looks up and how many organisations' data
look each up; ``revealed`` each organisation's own row ids (never their values).

Threat model: an actively malicious coordinator (it may re-ask stages, change parameters
mid-session, lie about who shared or delivered, show parties different lists, add keys of
its own), alone or colluding with organisations within the bounds of
:class:`~fedembed.secagg.protocol.SecurePolicy`; organisations that skip clipping or send
garbage are caught by the bounds of the decoded sum (:mod:`~fedembed.secagg.vector`), and
those that can be identified (forged or copied keys, unsigned shares, refused stages) are
named. See :mod:`~fedembed.secagg.protocol` and the README's "Secure aggregation" section
for exactly what is and is not covered.
"""

__all__ = ["ClientSession", "ServerSession", "RoundAbandoned", "ProtocolError", "SecurePolicy"]


def __getattr__(name: str) -> object:  # lazy: fedembed.identity imports primitives from this package
    if name in __all__:
        from fedembed.secagg import protocol

        return getattr(protocol, name)
    raise AttributeError(name)
