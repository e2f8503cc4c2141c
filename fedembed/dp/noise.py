"""The randomness DP releases: a ChaCha20 keystream, and exact samplers over it.

Every random choice whose outcome leaves an organisation inside a DP release -- which
examples a DP-SGD step samples, the noisy row counts that select rows, the Gaussian noise
on the released rows, the discrete noise share added before secure masking -- is drawn
from :class:`SecureRandom`: a ChaCha20 keystream (:class:`fedembed.secagg.primitives.KeyStream`)
under a 256-bit key that only the organisation holds. numpy's generators are not used
for them: their state is recoverable from outputs, and seeded from the run's seed (which
the coordinator chose) they let the coordinator regenerate the noise and subtract it, or
know which examples a step sampled (which voids the amplification by subsampling the
accountant counts on).

**The key** (:func:`noise_secret`): a 32-byte secret created once in the organisation's
state directory (``dp/noise.key``, 0600) and mixed, per release, with a label naming the
release and its run and round (:meth:`SecureRandom.derive`). A repeated round (a restart)
thus repeats its noise rather than releasing the same data under fresh noise. For tests
and simulations that must repeat exactly, an organisation may instead be given a seed
(node config ``dp-noise-seed``): then whoever knows the seed can regenerate its noise,
which is fine in a simulation and wrong in a deployment.

**Samplers.**

- :meth:`SecureRandom.discrete_gaussian`: the discrete Gaussian ``N_Z(0, S)`` of an
  integer variance ``S``, exactly (Canonne, Kamath, Steinke 2020, Algorithms 1-3: a
  discrete Laplace proposal accepted with probability ``exp(-(|y| - S/t)^2 / (2S))``, every
  Bernoulli drawn with integer arithmetic from uniform integers, no floating point), vectorised
  over numpy int64 with a Python-integer path for the (astronomically rare) proposals whose
  squares would overflow. The Laplace scale ``t = floor(sqrt(S)) + 1`` must divide ``S``
  (:func:`discrete_gaussian_variance` rounds a variance up to such a value) so that every
  integer stays below 2^63.
- :meth:`SecureRandom.normal`: floating-point Gaussians (Box-Muller over 53-bit uniforms)
  for the record-level mode, whose noise is added to float gradients anyway; its
  floating-point caveats (Mironov 2012) are those of every float Gaussian mechanism.
- uniform floats, exact uniform integers (rejection), binomial (inversion), uniform subsets.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedembed.dp import DPError
from fedembed.secagg.primitives import KEY_BYTES, KeyStream, derive_key

log = logging.getLogger(__name__)

NOISE_KEY_FILE = Path("dp") / "noise.key"
"""Where an organisation keeps its noise secret, under its state directory."""

_TWO63 = np.uint64(2**63)
_SQUARE_SAFE = 3_037_000_499
"""Largest |d| whose square fits int64 (floor(sqrt(2^63 - 1)))."""
MAX_VARIANCE = 2**60
"""Largest discrete Gaussian variance sampled (every intermediate integer stays below 2^63)."""


def _context(parts: Sequence[object]) -> bytes:
    """An unambiguous byte encoding of ``parts`` (length-prefixed ``str`` of each)."""
    out = bytearray()
    for p in parts:
        b = str(p).encode()
        out += len(b).to_bytes(4, "big") + b
    return bytes(out)


def noise_secret(state_dir: Path | None, seed: str | int | None = None) -> bytes:
    """An organisation's noise secret: from ``seed`` if given, else its own random key file.

    Parameters
    ----------
    state_dir : Path or None
        The organisation's private state directory; its ``dp/noise.key`` is created (32
        random bytes, 0600) on first use and read afterwards.
    seed : str or int, optional
        A seed instead (tests, reproducible simulations): whoever knows it can regenerate
        the noise.

    Returns
    -------
    bytes
        32 bytes.

    Raises
    ------
    DPError
        Neither a seed nor a state directory, or a key file of the wrong size.
    """
    if seed is not None and str(seed) != "":
        return derive_key(str(seed).encode(), "dp/noise-seed")
    if state_dir is None:
        raise DPError("DP noise needs the organisation's state directory (for its noise key) or a dp-noise-seed")
    path = Path(state_dir) / NOISE_KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_bytes(KEY_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # atomic, and never replaces a key another process made first
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    key = path.read_bytes()
    if len(key) != KEY_BYTES:
        raise DPError(f"{path} holds {len(key)} bytes, not a {KEY_BYTES}-byte noise key; remove it to make a new one")
    return key


def discrete_gaussian_variance(variance: float) -> tuple[int, int]:
    """The smallest integer variance ``S >= variance`` that :meth:`SecureRandom.discrete_gaussian` samples.

    Returns
    -------
    S : int
        A multiple of ``t``, at least ``variance`` (rounding up only adds noise).
    t : int
        Its discrete Laplace scale, ``floor(sqrt(S)) + 1``.

    Raises
    ------
    DPError
        A variance that is not positive or above :data:`MAX_VARIANCE`.
    """
    if not 0 < variance <= MAX_VARIANCE:
        raise DPError(f"a discrete Gaussian variance must be in (0, 2^60], got {variance}")
    s = max(1, math.ceil(variance))
    while True:
        t = math.isqrt(s) + 1
        s2 = -(-s // t) * t
        if math.isqrt(s2) + 1 == t:
            return s2, t
        s = s2  # rounding up crossed a square: t grew, round again


class SecureRandom:
    """Random numbers from a ChaCha20 keystream, with the numpy ``Generator`` methods the DP code uses.

    Parameters
    ----------
    key : bytes
        32 bytes; this generator's stream is ChaCha20 under it (use it for nothing else).

    Examples
    --------
    >>> r = SecureRandom.derive(b"\\x00" * 32, "example", 1)
    >>> x = r.discrete_gaussian(100, size=5)   # exact N_Z(0, 100), int64
    """

    def __init__(self, key: bytes) -> None:
        self._stream = KeyStream(key)

    def __repr__(self) -> str:
        return "SecureRandom(<key>)"

    @classmethod
    def derive(cls, secret: bytes, purpose: str, *context: object) -> SecureRandom:
        """The generator of one release: a key derived (HKDF) from ``secret``, ``purpose`` and ``context``."""
        return cls(derive_key(bytes(secret), f"dp/{purpose}", _context(context)))

    @classmethod
    def fresh(cls) -> SecureRandom:
        """A generator under a fresh random key (nobody can repeat it)."""
        return cls(secrets.token_bytes(KEY_BYTES))

    # ------------------------------------------------------------------ uniform
    def words(self, n: int) -> np.ndarray:
        """``n`` uniform uint64."""
        return self._stream.words(n)

    def random(self, size: int | tuple[int, ...] | None = None) -> np.ndarray | float:
        """Uniform floats in ``[0, 1)`` with 53 random bits each."""
        n = 1 if size is None else int(np.prod(size))
        out = (self.words(n) >> np.uint64(11)).astype(np.float64) * 2.0**-53
        return float(out[0]) if size is None else out.reshape(size)

    def below(self, bounds: np.ndarray | int, size: int | None = None) -> np.ndarray:
        """Exactly uniform integers in ``[0, bounds)`` (per element), by rejection.

        Parameters
        ----------
        bounds : array of int or int
            Upper bounds, each in ``[1, 2^63]``.
        size : int, optional
            With a scalar bound: how many.

        Returns
        -------
        np.ndarray
            uint64, the shape of ``bounds`` (or ``size``).
        """
        b = np.asarray(bounds, dtype=np.uint64)
        if size is not None:
            b = np.broadcast_to(b, (int(size),))
        b = np.ascontiguousarray(b).reshape(-1)
        if b.size and (b.min() < 1 or b.max() > _TWO63):
            raise DPError("uniform integer bounds must be in [1, 2^63]")
        rem = ((_TWO63 % b) * np.uint64(2)) % b  # 2^64 mod b: draws below it would favour small values
        out = np.empty(b.size, dtype=np.uint64)
        todo = np.arange(b.size)
        while todo.size:
            w = self.words(todo.size)
            ok = w >= rem[todo]
            out[todo[ok]] = w[ok] % b[todo[ok]]
            todo = todo[~ok]
        return out

    def integers(self, low: int, high: int | None = None, size: int | None = None) -> np.ndarray | int:
        """Uniform integers in ``[low, high)`` (``[0, low)`` with one argument), like numpy's."""
        if high is None:
            low, high = 0, low
        if high <= low:
            raise DPError(f"integers needs low < high, got [{low}, {high})")
        draws = self.below(int(high) - int(low), size=1 if size is None else int(size)).astype(np.int64) + int(low)
        return int(draws[0]) if size is None else draws

    def bernoulli(self, numerator: np.ndarray | int, denominator: np.ndarray | int, size: int | None = None) -> np.ndarray:
        """Exact ``Bernoulli(numerator / denominator)`` per element (integers, ``0 <= num <= den``)."""
        den = np.asarray(denominator, dtype=np.uint64)
        num = np.asarray(numerator, dtype=np.uint64)
        shape = np.broadcast_shapes(num.shape, den.shape, () if size is None else (int(size),))
        return self.below(np.broadcast_to(den, shape)).reshape(shape) < np.broadcast_to(num, shape)

    # ------------------------------------------------------------------ numpy Generator look-alikes
    def normal(self, loc: float = 0.0, scale: float = 1.0, size: int | tuple[int, ...] | None = None) -> np.ndarray | float:
        """Gaussian floats (Box-Muller over 53-bit uniforms)."""
        n = 1 if size is None else int(np.prod(size))
        half = (n + 1) // 2
        u1 = 1.0 - self.random(half)  # (0, 1]: the log is finite
        u2 = self.random(half)
        r = np.sqrt(-2.0 * np.log(u1))
        z = np.concatenate([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)])[:n]
        out = loc + scale * z
        return float(out[0]) if size is None else out.reshape(size)

    def binomial(self, n: int, p: float) -> int:
        """One ``Binomial(n, p)`` draw, by inversion of its CDF at a uniform in (0, 1)."""
        if n <= 0 or p <= 0:
            return 0
        from scipy.stats import binom  # here: scipy.stats costs 0.3 s to import, and the secure stages import this module

        u = (float(self.words(1)[0] >> np.uint64(11)) + 0.5) * 2.0**-53
        return int(binom.ppf(u, int(n), float(p)))

    def choice(self, a: np.ndarray, size: int, replace: bool = False) -> np.ndarray:
        """``size`` distinct elements of ``a`` drawn uniformly (without replacement only)."""
        if replace:
            raise DPError("SecureRandom.choice draws without replacement only")
        a = np.asarray(a)
        if size > a.shape[0]:
            raise DPError(f"cannot choose {size} of {a.shape[0]} without replacement")
        keys = self.words(a.shape[0])  # a uniform random order; ties (p ~ n^2 / 2^65) broken by position
        return a[np.argsort(keys, kind="stable")[: int(size)]]

    # ------------------------------------------------------------------ exact discrete noise
    def _bernoulli_exp_frac(self, r: np.ndarray, b: int) -> np.ndarray:
        """``Bernoulli(exp(-r/b))`` for ``0 <= r < b`` (CKS 2020, Algorithm 1, gamma in [0, 1])."""
        out = np.zeros(r.size, dtype=bool)
        k = np.ones(r.size, dtype=np.uint64)
        todo = np.arange(r.size)
        while todo.size:  # A_k ~ Bernoulli(gamma / k) = Bernoulli(r / b) and Bernoulli(1 / k)
            a = self.bernoulli(r[todo], b) & (self.below(k[todo]) == 0)
            stop = todo[~a]
            out[stop] = (k[stop] % np.uint64(2)) == 1  # the first failure at an odd k: success
            k[todo[a]] += np.uint64(1)
            todo = todo[a]
        return out

    def _bernoulli_exp1(self, n: int) -> np.ndarray:
        """``n`` draws of ``Bernoulli(exp(-1))``."""
        return self._bernoulli_exp_frac(np.ones(n, dtype=np.uint64), 1) if n else np.zeros(0, dtype=bool)

    def _bernoulli_exp(self, a: np.ndarray, b: int) -> np.ndarray:
        """``Bernoulli(exp(-a/b))`` for int64 ``a >= 0``, ``b >= 1``: ``floor(a/b)`` draws of exp(-1), then the rest."""
        a = a.astype(np.int64)
        whole, frac = a // b, (a % b).astype(np.uint64)
        out = np.ones(a.size, dtype=bool)
        left = whole.copy()
        todo = np.flatnonzero(left > 0)
        while todo.size:
            ok = self._bernoulli_exp1(todo.size)
            out[todo[~ok]] = False
            left[todo] -= 1
            todo = todo[ok & (left[todo] > 0)]
        live = np.flatnonzero(out)
        out[live] = self._bernoulli_exp_frac(frac[live], b)
        return out

    def _bernoulli_exp_big(self, a: int, b: int) -> bool:
        """``Bernoulli(exp(-a/b))`` for Python integers of any size (the rare overflow path)."""
        for _ in range(a // b):
            if not self._bernoulli_exp1(1)[0]:
                return False
        r, k = a % b, 1
        while True:  # Bernoulli(r / (b k)) from uniform integers below b k, split to stay under 2^63
            hit = self._below_big(b * k) < r
            if not hit:
                return k % 2 == 1
            k += 1

    def _below_big(self, bound: int) -> int:
        """A uniform integer in ``[0, bound)`` for any positive Python integer (rejection on whole words)."""
        words = max(1, (bound.bit_length() + 63) // 64)
        top = 1 << (64 * words)
        limit = top - top % bound
        while True:
            x = int.from_bytes(self._stream.read(8 * words), "little")
            if x < limit:
                return x % bound

    def discrete_laplace(self, t: int, size: int) -> np.ndarray:
        """``size`` draws of the discrete Laplace ``P(y) ~ exp(-|y| / t)`` (CKS 2020, Algorithm 2), int64."""
        out = np.empty(size, dtype=np.int64)
        todo = np.arange(size)
        while todo.size:
            m = todo.size
            u = self.below(t, size=m).astype(np.int64)
            keep = self._bernoulli_exp(u, t)
            v = np.zeros(m, dtype=np.int64)  # geometric: successes of Bernoulli(exp(-1)) before the first failure
            run = np.flatnonzero(keep)
            while run.size:
                ok = self._bernoulli_exp1(run.size)
                v[run[ok]] += 1
                run = run[ok]
            x = u + t * v
            neg = (self.words(m) & np.uint64(1)).astype(bool)
            keep &= ~(neg & (x == 0))  # -0 is redrawn: 0 is not counted twice
            done = np.flatnonzero(keep)
            out[todo[done]] = np.where(neg[done], -x[done], x[done])
            todo = todo[~keep]
        return out

    def discrete_gaussian(self, variance: int, size: int) -> np.ndarray:
        """``size`` exact draws of the discrete Gaussian ``N_Z(0, variance)`` (CKS 2020, Algorithm 3), int64.

        Parameters
        ----------
        variance : int
            ``S``, the ``sigma^2`` of ``P(y) ~ exp(-y^2 / (2 S))``: an integer multiple of
            ``t = floor(sqrt(S)) + 1``, at most 2^60 (:func:`discrete_gaussian_variance`).
        size : int
            How many.

        Raises
        ------
        DPError
            A variance that is not such an integer.
        """
        s = int(variance)
        t = math.isqrt(s) + 1
        if s != variance or not 0 < s <= MAX_VARIANCE or s % t:
            raise DPError(f"discrete_gaussian needs an integer variance in (0, 2^60] divisible by floor(sqrt)+1, "
                          f"got {variance}; round it with discrete_gaussian_variance()")
        k = s // t  # sigma^2 / t, an integer: the acceptance exponent is (|y| - k)^2 / (2 S)
        out = np.empty(int(size), dtype=np.int64)
        todo = np.arange(int(size))
        while todo.size:
            y = self.discrete_laplace(t, todo.size)
            d = np.abs(y) - k
            small = np.abs(d) <= _SQUARE_SAFE
            accept = np.zeros(todo.size, dtype=bool)
            idx = np.flatnonzero(small)
            accept[idx] = self._bernoulli_exp(d[idx] * d[idx], 2 * s)
            for i in np.flatnonzero(~small):  # |y| beyond 3e9: exact in Python integers
                accept[i] = self._bernoulli_exp_big(int(d[i]) ** 2, 2 * s)
            out[todo[accept]] = y[accept]
            todo = todo[~accept]
        return out


DPRandom = SecureRandom | np.random.Generator
"""What the DP code draws from: a :class:`SecureRandom` (a numpy ``Generator`` in tests of the mechanism only)."""
