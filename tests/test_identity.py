"""The roster and an organisation's identity: loading, refusing, signing."""

from __future__ import annotations

import json
import stat

import pytest

from fedembed.identity import Identity, IdentityError, Roster, check_name, make_identities
from fedembed.secagg.primitives import SigningKey, statement


def test_roster_loads_from_a_directory_of_pub_files_and_from_json_with_the_same_digest(tmp_path):
    keys = {name: SigningKey.generate() for name in ("org-0", "org-1")}
    d = tmp_path / "roster"
    d.mkdir()
    for name, k in keys.items():
        (d / f"{name}.pub").write_text(k.public.openssh + " comment\n")
    from_dir = Roster.load(d)
    from_json = Roster.load(from_dir.write(tmp_path / "roster.json"))
    assert from_dir.names == ["org-0", "org-1"] and from_dir.digest == from_json.digest
    assert from_dir.party("org-1") == 2 and from_dir.name_of_party(2) == "org-1"


def test_a_roster_with_a_duplicate_key_or_a_bad_name_or_no_entry_is_refused(tmp_path):
    k = SigningKey.generate().public
    with pytest.raises(IdentityError, match="same key"):
        Roster({"a": k, "b": k})
    with pytest.raises(IdentityError, match="empty"):
        Roster({})
    (tmp_path / "bad.json").write_text(json.dumps({"x": "not a key"}))
    with pytest.raises(IdentityError, match="not an OpenSSH public key"):
        Roster.load(tmp_path / "bad.json")
    with pytest.raises(IdentityError, match="not found"):
        Roster.load(tmp_path / "missing")


@pytest.mark.parametrize("name", ["People's Republic of China", "Côte d’Ivoire", "United States-2014", "org-0"])
def test_real_organisation_names_are_accepted(name):
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["a\nb", "", " x", "x ", "a/b", "x" * 81, "a\x1bb", "a\tb"])
def test_names_that_could_forge_a_log_line_or_a_path_are_refused(name):
    with pytest.raises(IdentityError):
        check_name(name)


def test_an_identity_key_outside_the_roster_is_refused_and_keys_are_written_0600(tmp_path):
    roster = make_identities(["org-0", "org-1"], tmp_path / "keys")
    assert stat.S_IMODE((tmp_path / "keys" / "0.key").stat().st_mode) == 0o600
    me = Identity.load(tmp_path / "keys" / "1.key", roster)
    secret = me.key.private_openssh().decode().splitlines()[1]
    assert me.name == "org-1" and secret not in repr(me) + repr(me.key) and "private=<hidden>" in repr(me.key)
    other = make_identities(["stranger"], tmp_path / "other")
    with pytest.raises(IdentityError, match="not in the roster"):
        Identity.load(tmp_path / "other" / "0.key", roster)
    assert other.names == ["stranger"]


def test_signatures_do_not_cross_kinds_or_parts():
    k = SigningKey.generate()
    sig = k.sign(statement("reply", "run", 1, b"x"))
    assert k.public.verify(statement("reply", "run", 1, b"x"), sig)
    assert not k.public.verify(statement("advert", "run", 1, b"x"), sig)  # another purpose
    assert not k.public.verify(statement("reply", "run", 2, b"x"), sig)  # another round
    assert not k.public.verify(statement("reply", "run1", b""), sig)  # parts are length-prefixed
    assert statement("reply", "1") != statement("reply", 1)  # str and int parts are typed
    assert statement("x", 2**64 - 1) != statement("x", 2**63)  # 64-bit unsigned node ids fit
