"""Flower ClientApp: an organisation. Decodes a message, calls :mod:`fedembed.org`, replies.

Where the organisation's state lives: node config ``state-dir`` (deployment), or
``<state_root>/org-<partition-id>`` in simulation. Its index in the task: node config
``org`` or, in simulation, ``partition-id``. Its identity: node config ``identity-key``
(its private key, OpenSSH) and ``roster`` (the federation's public keys, a directory of
``<name>.pub`` or a JSON file), or in simulation ``<key_dir>/<index>.key`` and the
simulation's roster file. Node config ``secure-*`` keys set its secure-aggregation policy
(:meth:`fedembed.secagg.protocol.SecurePolicy.from_mapping`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedembed.audit import AuditMod
from fedembed.identity import Identity
from fedembed.secagg.client import SECURE_STAGES, SecureMember, handle_message
from fedembed.secagg.protocol import SecurePolicy

if TYPE_CHECKING:
    from fedembed.org import Organisation

log = logging.getLogger(__name__)


def where_from_context(context: Context, state_root: str | None) -> tuple[int, Path]:
    """This node's organisation index and private state directory, from its node config."""
    nc = context.node_config
    if "org" in nc:
        org = int(nc["org"])
    elif "partition-id" in nc:
        org = int(nc["partition-id"])
    else:
        raise ValueError("node config names no organisation: pass --node-config 'org=<index> state-dir=<dir>'")
    if "state-dir" in nc:
        state = Path(str(nc["state-dir"]))
    elif state_root is not None:
        state = Path(state_root) / f"org-{org}"
    else:
        raise ValueError("node config has no state-dir: pass --node-config 'org=<index> state-dir=<dir>'")
    return org, state


def member_from_context(context: Context, state_root: str | None, key_dir: str | None, roster: str | None) -> SecureMember:
    """This node's organisation, identity and policy (no task, no torch)."""
    nc = context.node_config
    org, state = where_from_context(context, state_root)
    if "identity-key" in nc:
        key = Path(str(nc["identity-key"]))
    elif key_dir is not None:
        key = Path(key_dir) / f"{org}.key"
    else:
        raise ValueError("node config has no identity-key: pass --node-config '... identity-key=<private key file>'")
    roster_path = str(nc["roster"]) if "roster" in nc else roster
    if roster_path is None:
        raise ValueError("node config has no roster: pass --node-config '... roster=<dir of .pub files or JSON>'")
    return SecureMember(org, state, Identity.load(key, roster_path), SecurePolicy.from_mapping(nc))


def make_client_app(
    state_root: str | None = None,
    audit_dir: str | None = None,
    key_dir: str | None = None,
    roster: str | None = None,
    mods: list | None = None,
) -> ClientApp:
    """A ClientApp; in simulation, organisations keep state under ``state_root`` and keys in ``key_dir``.

    With ``audit_dir``, every reply is also written there (:class:`fedembed.audit.AuditMod`);
    ``mods`` are further Flower mods (after the audit one).
    """
    app = ClientApp(mods=([AuditMod(audit_dir)] if audit_dir else []) + list(mods or []) or None)

    def organisation(context: Context) -> Organisation:
        from fedembed.org import Organisation

        m = member_from_context(context, state_root, key_dir, roster)
        return Organisation(m.org, m.state_dir, m.identity, m.policy)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        from fedembed.org import handle_content

        content = handle_content(organisation(context), msg.content, msg.metadata.message_type, context.node_id)
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        from fedembed.org import handle_content

        content = handle_content(organisation(context), msg.content, msg.metadata.message_type, context.node_id)
        return Message(content, reply_to=msg)

    def secure_stage(msg: Message, context: Context) -> Message:
        # no task, no torch: a secure stage only loads the session from the org's state dir
        member = member_from_context(context, state_root, key_dir, roster)
        stage = msg.metadata.message_type.partition(".")[2]
        return Message(handle_message(member, stage, msg.content, context.node_id), reply_to=msg)

    for stage in SECURE_STAGES:  # message types train.<stage> of secure aggregation
        app.train(stage)(secure_stage)

    return app


app = make_client_app()
