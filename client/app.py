"""Flower ClientApp: an organisation. Decodes a message, calls :mod:`fedembed.org`, replies.

Where the organisation's state lives: node config ``state-dir`` (deployment), or
``<state_root>/org-<partition-id>`` in simulation. Its index in the task: node config
``org`` or, in simulation, ``partition-id``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedembed.audit import AuditMod
from fedembed.secagg.client import SECURE_STAGES, handle_message

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


def organisation_from_context(context: Context, state_root: str | None) -> Organisation:
    """The organisation this node is, from its node config."""
    from fedembed.org import Organisation

    return Organisation(*where_from_context(context, state_root))


def make_client_app(state_root: str | None = None, audit_dir: str | None = None) -> ClientApp:
    """A ClientApp whose organisations keep their state under ``state_root`` (simulation).

    With ``audit_dir``, every reply is also written there (:class:`fedembed.audit.AuditMod`).
    """
    app = ClientApp(mods=[AuditMod(audit_dir)] if audit_dir else None)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        from fedembed.org import handle_content

        return Message(handle_content(organisation_from_context(context, state_root), msg.content), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        from fedembed.org import handle_content

        return Message(handle_content(organisation_from_context(context, state_root), msg.content), reply_to=msg)

    def secure_stage(msg: Message, context: Context) -> Message:
        # no task, no torch: a secure stage only loads the session from the org's state dir
        org, state_dir = where_from_context(context, state_root)
        return Message(handle_message(state_dir, org, msg.content), reply_to=msg)

    for stage in SECURE_STAGES:  # message types train.<stage> of secure aggregation
        app.train(stage)(secure_stage)

    return app


app = make_client_app()
