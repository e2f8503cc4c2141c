"""The minimal Flower App ``fedembed server`` submits: components and run config, no code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from fedembed.config import RunConfig


def write_app(app_dir: Path, cfg: RunConfig, state_dir: Path, wakeup_dir: Path | None = None) -> Path:
    """Write the Flower App that ``flwr run`` submits: components and run config, no code.

    Parameters
    ----------
    app_dir : Path
        Directory to (re)write; gets only ``pyproject.toml``.
    cfg : RunConfig
        The run, stored as JSON under run config key ``fedembed``.
    state_dir : Path
        The coordinator's state directory, run config key ``state-dir``.
    wakeup_dir : Path or None
        The directory of the ServerApp's and the Fleet gate's wake-up sockets
        (:mod:`fedembed.apps.wakeup`), run config key ``wakeup-dir``; None: the ServerApp polls.
    """
    import tomli_w

    from fedembed.apps.wakeup import RUN_CONFIG_KEY

    config = {"fedembed": json.dumps(cfg.to_dict()), "state-dir": str(Path(state_dir).resolve())}
    if wakeup_dir is not None:
        config[RUN_CONFIG_KEY] = str(Path(wakeup_dir).resolve())
    app_dir = Path(app_dir)
    if app_dir.exists():
        shutil.rmtree(app_dir)
    app_dir.mkdir(parents=True)
    doc = {
        "project": {
            "name": "fedembed-run",
            "version": "1.0.0",
            "description": "fedembed coordinator run (components come from the installed fedembed)",
            "license": "Apache-2.0",
            "dependencies": [],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "fedembed",
                    "components": {"serverapp": "fedembed.apps.server:app", "clientapp": "fedembed.apps.client:app"},
                    "config": config,
                }
            }
        },
    }
    (app_dir / "pyproject.toml").write_bytes(tomli_w.dumps(doc).encode())
    return app_dir
