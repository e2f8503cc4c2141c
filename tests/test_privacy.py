"""What leaves an organisation: never its head, by name or by value.

A real Flower simulation runs with the audit mod around every ClientApp, which stores the
serialized bytes of every reply. The test then looks for every head parameter, by name
and by value (float32 and float16 encodings of its values), in those bytes. As a control
that the search can find things, the row deltas that were sent are found there.
"""

import json

import numpy as np
import pytest
import torch

from fedembed.config import RunConfig
from fedembed.simulation import simulate
from fedembed.task import TaskSpec, simulated_federation

pytestmark = pytest.mark.slow


def windows(values: np.ndarray, width: int = 4, count: int = 8):
    flat = values.ravel()
    if flat.size < width:
        return
    for start in np.linspace(0, flat.size - width, num=min(count, flat.size - width + 1)).astype(int):
        yield flat[start : start + width]


@pytest.fixture(scope="module")
def audited_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("privacy")
    tasks, names, federation = simulated_federation(TaskSpec("examples.my_task:ClicksTask", {"products": 2000}), 3)
    simulate(RunConfig(federation=federation, rounds=2), tasks, out, audit=True, names=names)
    return out


def test_no_reply_carries_a_head_parameter_by_name_or_value(audited_run):
    audit = audited_run / "state" / "audit"
    blobs = [p.read_bytes() for p in sorted(audit.glob("*.bin"))]
    indexes = [json.loads(p.read_text()) for p in sorted(audit.glob("*.json"))]
    assert len(blobs) == 3 * 3  # 3 orgs x (2 train rounds + closing evaluation)
    wire = b"".join(blobs)
    heads = sorted((audited_run / "state" / "orgs").glob("org-*/head.pt"))
    assert len(heads) == 3
    for path in heads:
        head = torch.load(path, weights_only=True)["head"]
        for name, tensor in head.items():
            assert name.encode() not in wire, f"head parameter name {name} found on the wire"
            values = tensor.numpy()
            for w in windows(values):
                for enc in (w.astype(np.float32).tobytes(), w.astype(np.float16).tobytes()):
                    assert enc not in wire, f"values of head parameter {name} ({path.parent.name}) found on the wire"
    for idx in indexes:
        # "want": the rows its working set asks for (row ids, or their digest), its own sync policy
        assert set(idx) - {"org"} <= {"info", "metrics", "train", "update", "want", "sig"}
        assert idx["sig"] == ["name", "signature"] and idx["org"] in ("shop-0", "shop-1", "shop-2")
        for arr in idx.get("update", {}):
            assert arr.split(".")[-1] in ("ids", "delta", "weight")
        for arr in idx.get("want", {}):
            assert arr == "digest" or arr.split(".")[-1] in ("ids", "new")


def test_the_search_does_find_values_that_were_sent(audited_run):
    """Control: the same by-value search finds the row deltas an organisation uploaded."""
    import io

    audit = audited_run / "state" / "audit"
    checked = 0
    for p in sorted(audit.glob("*.bin")):
        blob = p.read_bytes()
        for seg in blob.split(b"\x93NUMPY")[1:]:
            arr = np.load(io.BytesIO(b"\x93NUMPY" + seg), allow_pickle=False)
            if arr.dtype == np.float16 and arr.ndim == 2:  # an uploaded delta
                for w in windows(arr.astype(np.float32)):
                    assert w.astype(np.float16).tobytes() in blob
                checked += 1
    assert checked == 6  # 3 orgs x 2 rounds of uploads
