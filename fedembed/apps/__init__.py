"""The Flower apps of fedembed: ``fedembed.apps.server:app`` (the coordinator's ServerApp)
and ``fedembed.apps.client:app`` (an organisation's ClientApp).

They only move messages between Flower and the Flower-free sides of a round
(:mod:`fedembed.coordinator`, :mod:`fedembed.org`).
"""
