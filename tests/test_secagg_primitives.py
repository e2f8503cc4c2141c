"""Test vectors and properties of the secure-aggregation primitives."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fedembed.secagg.primitives import (
    PRIME,
    CryptoError,
    KeyPair,
    agree,
    derive_key,
    keystream,
    open_sealed,
    seal,
    shamir_combine,
    shamir_split,
)
from fedembed.secagg.protocol import pair_mask

# RFC 8439 appendix A.1, test vector #1: ChaCha20 block, all-zero key, nonce and counter.
RFC8439_ZERO_BLOCK = bytes.fromhex(
    "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7"
    "da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586"
)
# RFC 7748 section 6.1: X25519 Diffie-Hellman.
ALICE_SK = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
ALICE_PK = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
BOB_SK = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
BOB_PK = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
SHARED = bytes.fromhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")


def test_keystream_matches_the_rfc8439_chacha20_test_vector():
    assert keystream(bytes(32), 16, np.uint32).tobytes() == RFC8439_ZERO_BLOCK


def test_keystream_is_deterministic_prefix_stable_and_key_dependent():
    key = derive_key(b"s" * 32, "mask/self/values", b"ctx")
    a = keystream(key, 100_000)
    assert np.array_equal(a, keystream(key, 100_000))
    assert np.array_equal(a[:777], keystream(key, 777))
    assert not np.array_equal(a, keystream(derive_key(b"s" * 32, "mask/self/indicators", b"ctx"), 100_000))
    assert keystream(key, 10, np.uint8).dtype == np.uint8


def test_x25519_matches_rfc7748_and_is_symmetric():
    assert KeyPair.from_private(ALICE_SK).public == ALICE_PK
    assert KeyPair.from_private(BOB_SK).public == BOB_PK
    assert agree(ALICE_SK, BOB_PK) == SHARED == agree(BOB_SK, ALICE_PK)


def test_x25519_refuses_malformed_and_low_order_keys():
    with pytest.raises(CryptoError):
        agree(ALICE_SK, b"\x01" * 31)
    with pytest.raises(CryptoError):
        agree(ALICE_SK, bytes(32))  # the identity point: all-zero shared secret


def test_derive_key_separates_domains():
    keys = {derive_key(SHARED, label, ctx) for label in ("share-key", "mask/pair/values") for ctx in (b"a", b"b")}
    assert len(keys) == 4


def test_aead_round_trip_and_rejection_of_tampering_and_replay():
    key = derive_key(SHARED, "share-key", b"run|round1")
    ad = b"share|run|round1|src=1|dst=2"
    ct = seal(key, b"secret shares", ad)
    assert open_sealed(key, ct, ad) == b"secret shares"
    for i in (0, 12, len(ct) - 1):  # nonce, body, tag
        bad = bytearray(ct)
        bad[i] ^= 1
        with pytest.raises(CryptoError):
            open_sealed(key, bytes(bad), ad)
    with pytest.raises(CryptoError):  # replayed into another round
        open_sealed(key, ct, b"share|run|round2|src=1|dst=2")
    with pytest.raises(CryptoError):  # misrouted (swapped sender and receiver)
        open_sealed(key, ct, b"share|run|round1|src=2|dst=1")
    assert seal(key, b"x", ad) != seal(key, b"x", ad)  # fresh nonce each time


def test_shamir_any_t_shares_recover_the_secret_and_fewer_do_not():
    secret = bytes(range(32))
    xs = [1, 2, 3, 4, 5]
    shares = shamir_split(secret, 3, xs)
    for subset in itertools.combinations(xs, 3):
        assert shamir_combine({x: shares[x] for x in subset}, 3) == secret
    with pytest.raises(CryptoError):
        shamir_combine({1: shares[1], 2: shares[2]}, 3)
    # two shares interpolated as if t were 2 give an unrelated value (the polynomial has degree 2)
    with pytest.raises(CryptoError):  # does not even fit 32 bytes, with overwhelming probability
        shamir_combine({1: shares[1], 2: shares[2]}, 2)


def test_shamir_known_polynomial():
    # secret 7, t=2, coefficient unknown but shares of a line: f(x) = 7 + a x -> f(1), f(2) determine 7
    shares = shamir_split((7).to_bytes(32, "big"), 2, [1, 2])
    a = (int.from_bytes(shares[1], "big") - 7) % PRIME
    assert int.from_bytes(shares[2], "big") == (7 + 2 * a) % PRIME
    assert shamir_combine(shares, 2) == (7).to_bytes(32, "big")


def test_pairwise_masks_cancel():
    a, b = KeyPair.generate(), KeyPair.generate()
    ma = pair_mask(a.private, b.public, 1, 2, b"ctx", "values", 10_000, np.uint32)
    mb = pair_mask(b.private, a.public, 2, 1, b"ctx", "values", 10_000, np.uint32)
    assert np.array_equal(ma, mb)
    x = np.arange(10_000, dtype=np.uint32)
    assert np.array_equal((x + ma) - mb, x)


def test_keystream_add_in_chunks_equals_adding_the_whole_keystream():
    from fedembed.secagg.primitives import keystream_add

    key = derive_key(b"k" * 32, "mask/self/values", b"ctx")
    for dtype in (np.uint8, np.uint32):
        x = np.arange(10_007, dtype=dtype)
        y = x.copy()
        keystream_add(key, y, chunk=1000)  # chunk boundaries inside the stream
        assert np.array_equal(y, x + keystream(key, x.size, dtype))
        keystream_add(key, y, subtract=True, chunk=333)
        assert np.array_equal(y, x)


def test_array_view_reads_without_copy_and_refuses_what_is_not_plain_numbers():
    from flwr.app import Array

    from fedembed.sparse import UpdateError
    from fedembed.wire import array_view

    a = np.arange(1000, dtype=np.uint32)
    v = array_view(Array(a))
    assert np.array_equal(v, a) and not v.flags.writeable and not v.flags.owndata
    with pytest.raises(UpdateError):
        array_view(Array(np.array(["x", "y"])))
    bad = Array(a)
    bad.data = b"\x93NUMPY garbage"
    with pytest.raises(UpdateError):
        array_view(bad)
