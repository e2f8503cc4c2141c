"""Record the bytes between organisations and the coordinator, and search them.

:class:`RecordingProxy` is a plain TCP relay: point a SuperNode at it instead of at the
SuperLink and it forwards every byte both ways while appending them to capture files.
On an ``--insecure`` run that capture is exactly what an observer of the network sees,
so :func:`find_in_capture` can check that no organisation's head ever crossed it
(``simulations/traffic_capture.py``, ``tests/test_deploy.py``). On a TLS run the capture
is ciphertext.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


class RecordingProxy:
    """TCP relay ``listen -> target`` that records both directions.

    Parameters
    ----------
    target : tuple of (str, int)
        The SuperLink's address.
    capture_dir : Path
        Receives ``up.bin`` (organisation -> coordinator) and ``down.bin``
        (coordinator -> organisation), all connections appended.
    host : str
        Address to listen on; the port is chosen free (see :attr:`port`).
    """

    def __init__(self, target: tuple[str, int], capture_dir: Path, host: str = "127.0.0.1") -> None:
        self.target = target
        self.dir = Path(capture_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._files = {"up": open(self.dir / "up.bin", "ab"), "down": open(self.dir / "down.bin", "ab")}  # noqa: SIM115
        self._server = socket.create_server((host, 0))
        self.port = int(self._server.getsockname()[1])
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="recording-proxy", daemon=True)

    def start(self) -> RecordingProxy:
        """Start relaying; returns self."""
        self._thread.start()
        return self

    def _accept(self) -> None:
        self._server.settimeout(0.5)
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            self.connections += 1
            for src, dst, name in ((client, upstream, "up"), (upstream, client, "down")):
                threading.Thread(target=self._pipe, args=(src, dst, name), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, name: str) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                with self._lock:
                    self._files[name].write(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        """Stop accepting, flush the capture files."""
        self._stop.set()
        self._server.close()
        with self._lock:
            for f in self._files.values():
                f.flush()
                f.close()

    def capture(self) -> dict[str, bytes]:
        """``{"up": bytes, "down": bytes}`` recorded so far."""
        with self._lock:
            for f in self._files.values():
                if not f.closed:
                    f.flush()
        return {k: (self.dir / f"{k}.bin").read_bytes() for k in ("up", "down")}


def value_windows(values: np.ndarray, width: int = 4, count: int | None = 16) -> Iterator[np.ndarray]:
    """Up to ``count`` runs of ``width`` consecutive values, spread over ``values``.

    ``count=None`` yields the run starting at every position (an exhaustive search).
    """
    flat = np.asarray(values).ravel()
    if flat.size < width:
        if flat.size:
            yield flat
        return
    starts = flat.size - width + 1
    positions = range(starts) if count is None else np.unique(np.linspace(0, starts - 1, num=min(count, starts)).astype(int))
    for start in positions:
        yield flat[start : start + width]


def encodings(window: np.ndarray) -> Iterable[bytes]:
    """The byte patterns a float window could travel as (float32, float16, float64)."""
    for dtype in (np.float32, np.float16, np.float64):
        yield np.asarray(window, dtype=dtype).tobytes()


MIN_PATTERN_BYTES = 8
"""Shorter byte patterns are not searched: in megabytes of traffic they occur by chance
(a single float16 value is 2 bytes). Parameters of one value are searched as float64 only."""


def find_in_capture(
    capture: bytes, arrays: dict[str, np.ndarray], names: bool = True, count: int | None = 16
) -> list[str]:
    """Which of ``arrays`` appear in ``capture``, by name or by any window of values.

    Parameters
    ----------
    capture : bytes
        Recorded traffic.
    arrays : dict
        Name -> values (e.g. an organisation's head parameters).
    names : bool
        Also search for each name as ASCII.
    count : int or None
        Windows searched per array (see :func:`value_windows`); None: all of them.

    Returns
    -------
    list of str
        One line per hit, e.g. ``"head.0.weight: value window 3 as float32"``. Windows are
        4 consecutive values; patterns under :data:`MIN_PATTERN_BYTES` are skipped.
    """
    hits = []
    for name, values in arrays.items():
        if names and name.encode() in capture:
            hits.append(f"{name}: name")
        for i, w in enumerate(value_windows(values, count=count)):
            if not np.any(w):  # all-zero windows match any padding
                continue
            for enc, dtype in zip(encodings(w), ("float32", "float16", "float64")):
                if len(enc) < MIN_PATTERN_BYTES:  # a 2- or 4-byte pattern matches somewhere by chance
                    continue
                if enc in capture:
                    hits.append(f"{name}: value window {i} as {dtype}")
    return hits
