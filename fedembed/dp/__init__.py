"""Differential privacy for the shared tables: record-level and row-sparse, or distributed over secure aggregation.

Two modes, one privacy unit each. **Record-level** (``dp_noise_multiplier``): an
organisation that trains with DP releases, every round, a table update that is a
post-processing of noisy, clipped, per-example gradients (DP-SGD, Abadi et al. 2016), with
the row sparsity kept the DP-AdaFEST way (Ghazi et al., NeurIPS 2023): each step, noisy
per-row contribution counts pick the rows whose gradient is released, Gaussian noise is
added to those rows only, and every other row's gradient is dropped (it never leaves).
**Organisation-level** (``dp_sum_noise_multiplier``, :mod:`fedembed.dp.distributed`):
with secure aggregation over the dense row set, each organisation clips its whole round
update and adds a discrete Gaussian share before masking; only the sum, carrying the full
noise, is ever unmasked. Every noise either mode releases is drawn from the organisation's
secret ChaCha20 stream (:mod:`fedembed.dp.noise`).

Layout (one-way, see ``tests/test_layers.py``):

- :mod:`fedembed.dp.accounting` (numpy + Google's ``dp-accounting``, no torch): the
  privacy ledger of one organisation, composed over rounds, with a budget;
- :mod:`fedembed.dp.noise` (numpy): the secret ChaCha20 random source of every released
  noise, with exact discrete Gaussian sampling;
- :mod:`fedembed.dp.distributed` (numpy): organisation-level distributed noise over
  secure aggregation (each organisation a discrete Gaussian share before masking);
- :mod:`fedembed.dp.selection` (numpy): the noisy row selection, without a dense noise
  vector over the table;
- :mod:`fedembed.dp.clipping` (torch): per-example gradient norms and clipped sums for
  embedding lookups and a head of linear layers, without a dense per-example gradient;
- :mod:`fedembed.dp.local` (torch): one DP-SGD step and the Poisson-sampled local epochs.

This package's ``__init__`` imports nothing heavy, so a torch-free side may import it.
"""

from __future__ import annotations

from fedembed.errors import FedembedError


class DPError(FedembedError, ValueError):
    """A DP configuration or model that the DP path cannot make private (it says why)."""


class BudgetExhausted(FedembedError, RuntimeError):
    """The next round would take an organisation's privacy spend past its budget."""
