"""Deployment: the coordinator and the organisations as real Flower processes.

``fedembed server`` = :func:`run_server`: starts a Flower SuperLink (TLS and SuperNode
authentication on by default) on 127.0.0.1 only, puts the Fleet gate
(:mod:`fedembed.deploy.fleetgate`: the Fleet API and nothing else) on the public host and port,
registers the organisations' public keys, submits the fedembed ServerApp as a Flower run
and follows it, printing progress per round; its own ``flwr`` calls (Control API) go to
the SuperLink's loopback address. The run
is submitted as a minimal Flower App (``state-dir/app/pyproject.toml``: the components
``fedembed.apps.server:app`` / ``fedembed.apps.client:app`` and the run config, no code) so the ServerApp and
the ClientApps import fedembed from the environment the user installed; Flower's run-time
dependency installation (``uv sync``) is switched off on both sides.

``fedembed client`` = :func:`run_client`: runs a Flower SuperNode with the node config
:func:`node_config` writes (state directory, identity key, roster; the organisation's
index ``org`` or its own task), restarting it if it exits while the coordinator is away,
and the organisation's long-lived worker (:mod:`fedembed.worker`), to which the
SuperNode hands every message in its own message loop (:mod:`fedembed.deploy.handoff`):
no process is started per message.

Files in the coordinator's state directory::

    coordinator/     checkpoints (resume from the last finished round)
    progress.jsonl   one line per finished round, written by the ServerApp
    metrics.json, embeddings.npz, report.png   when the run is done
    app/             the Flower App submitted
    flwr-home/       Flower's own files (FLWR_HOME of the SuperLink and of `flwr` calls)
    superlink.log    the SuperLink's log
    fleetgate.log    the Fleet gate's log (refused requests, with their peer)

Modules (each imports only modules listed above it)::

    processes   process plumbing: Flower's environment, process trees, ports, signals
    (fedembed.apps.latency: Flower's fixed waits shortened, a runtime piece the apps use
    too, so it lives one layer below)
    flowerapp   the minimal Flower App submitted (write_app)
    server      fedembed server: ServerOptions, CoordinatorProcess, run_outcome, run_server
    client      fedembed client: ClientOptions, node_config, WorkerProcess, supernode_command, run_client
    handoff     the SuperNode hands each message to the organisation worker, stores its reply

(the files a deployed run writes into the coordinator's state directory are the
ServerApp's: :mod:`fedembed.apps.runfiles`), and the two programs that server and client start, ``python -m fedembed.deploy.<name>``::

    supernode   Flower's SuperNode with its waits shortened (each organisation)
    fleetgate   the public port: Flower's Fleet API and nothing else (the coordinator)

The names in ``_EXPORTS`` are importable from ``fedembed.deploy`` itself; they load their
module on first use (as :mod:`fedembed` does), so the two programs, which import this
package first, do not import torch through :mod:`fedembed.config`. Patch a name in the
module that uses it, not here.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "fedembed.deploy.processes": ("descendants", "flower_env", "free_port", "kill_tree", "wait_for_port"),
    "fedembed.apps.runfiles": ("DeployedRunFiles", "resume_round", "tables_digest"),
    "fedembed.deploy.flowerapp": ("write_app",),
    "fedembed.deploy.server": ("CONNECTION", "CoordinatorProcess", "ServerOptions", "run_outcome", "run_server"),
    "fedembed.deploy.client": ("ClientOptions", "WorkerProcess", "node_config", "run_client", "supernode_command"),
}
"""Module -> the names ``from fedembed.deploy import NAME`` finds there."""

_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'fedembed.deploy' has no attribute {name!r}")
    return getattr(import_module(module), name)
