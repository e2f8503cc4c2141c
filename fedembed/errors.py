"""The one error base class of fedembed.

Every error fedembed raises on purpose derives from :class:`FedembedError`, so a caller
can catch everything fedembed refuses with one ``except``. Most are also ``ValueError``
(bad input) or ``RuntimeError`` (a run that cannot go on), for callers that catch those.
"""

from __future__ import annotations


class FedembedError(Exception):
    """Base class of every error fedembed raises on purpose."""
