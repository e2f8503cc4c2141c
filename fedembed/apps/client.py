"""Flower ClientApp: an organisation. Decodes a message, calls :mod:`fedembed.org`, replies.

Under ``fedembed client`` no ClientApp process is started at all: the SuperNode hands
each message to the organisation's long-lived worker (:mod:`fedembed.worker`,
:mod:`fedembed.deploy.handoff`), which runs the same handler
(:func:`fedembed.org.handle_content`). Under a SuperNode that starts a
ClientApp process per message (Flower 1.42's default, e.g. the stock ``flower-supernode``,
or ``fedembed client`` while its worker is down) with node config ``worker-socket``, the
message goes to the worker there, and this process imports neither torch nor the task;
when no worker answers, the message is handled here.

Where the organisation's state lives: node config ``state-dir`` (deployment), or
``<state_root>/org-<partition-id>`` in simulation. Its own task: node config ``task``,
``data``, ``task-options`` (JSON), ``device`` or ``task-config`` (a TOML file), or in
simulation the task of its ``partition-id``. Its identity: node config ``identity-key``
(its private key, OpenSSH) and ``roster`` (the federation's public keys, a directory of
``<name>.pub`` or a JSON file), or in simulation ``<key_dir>/<index>.key`` and the
simulation's roster file. Node config ``secure-*`` keys set its secure-aggregation policy
(:meth:`fedembed.secagg.protocol.SecurePolicy.from_mapping`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from flwr.app import Context, Error, Message
from flwr.common.constant import ErrorCode
from flwr.clientapp import ClientApp

from fedembed.apps.packing import PackingMod
from fedembed.audit import AuditMod
from fedembed.secagg.client import add_secure_stages
from fedembed.worker import WorkerError, WorkerUnavailable, forward

if TYPE_CHECKING:
    from fedembed.org import Organisation
    from fedembed.task import TaskSpec

log = logging.getLogger(__name__)


def via_worker(msg: Message, context: Context) -> Message | None:
    """The reply of the organisation's worker (node config ``worker-socket``), or None to handle in-process.

    None when the node config names no worker or no worker answers (nothing was sent).
    A worker that received the message and failed raises :class:`fedembed.worker.WorkerError`:
    the message is never handled twice.
    """
    path = context.node_config.get("worker-socket")
    if not path:
        return None
    try:
        content = forward(str(path), msg.metadata.message_type, context.node_id, msg.content)
    except WorkerUnavailable as exc:
        log.warning("%s; handling %s in this process", exc, msg.metadata.message_type)
        return None
    return Message(content, reply_to=msg)


def make_client_app(
    state_root: str | None = None,
    audit_dir: str | None = None,
    key_dir: str | None = None,
    roster: str | None = None,
    mods: list | None = None,
    tasks: list[TaskSpec] | None = None,
    node_defaults: dict[str, Any] | None = None,
) -> ClientApp:
    """A ClientApp; in simulation, organisations keep state under ``state_root`` and keys in ``key_dir``.

    A packed message (a deployed coordinator's) is unpacked before anything sees it and its
    reply packed (:class:`fedembed.apps.packing.PackingMod`). With ``audit_dir``, every
    reply is also written there (:class:`fedembed.audit.AuditMod`);
    ``mods`` are further Flower mods (after the audit one); ``tasks`` are the simulated
    organisations' own tasks, by partition id (a node config naming a task wins);
    ``node_defaults`` are node-config entries a node's own config may override
    (``device``, ``threads`` in simulation).
    """
    # packing outermost: the audit, the other mods and the handlers see the records as the coordinator
    # built them, and a reply is packed after it was signed
    app = ClientApp(mods=[PackingMod(), *([AuditMod(audit_dir)] if audit_dir else []), *(mods or [])])

    def organisation(context: Context) -> Organisation:
        from fedembed.org import Organisation

        nc = {**(node_defaults or {}), **context.node_config}
        return Organisation.from_node_config(nc, state_root, key_dir, roster, tasks)

    simulated = tasks is not None  # every simulated organisation is the user's own: its errors are theirs to read

    def train_or_evaluate(msg: Message, context: Context) -> Message:
        from fedembed.faults import SimulatedDropout
        from fedembed.org import handle_content, report_failure  # handle_content dispatches by the message type
        from fedembed.task import TaskError

        try:
            if (reply := via_worker(msg, context)) is not None:
                return reply
            content = handle_content(organisation(context), msg.content, msg.metadata.message_type, context.node_id,
                                     divergence_fails=simulated)
        except (SimulatedDropout, WorkerError):
            raise  # a worker's error is its own reply, already told only the kind of failure
        except Exception as exc:
            if simulated and not isinstance(exc, TaskError):
                raise  # a simulation's own failure: the engine reports it with its traceback
            # a deployed organisation's error text (its task's, its data's) stays in its own log
            reason = report_failure(exc, disclose=simulated)
            return Message(error=Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)
        return Message(content, reply_to=msg)

    app.train()(train_or_evaluate)
    app.evaluate()(train_or_evaluate)

    add_secure_stages(app, state_root, key_dir, roster, before=via_worker)  # message types train.<stage>

    return app


app = make_client_app()
