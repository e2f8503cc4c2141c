"""fedembed: federated learning of shared embedding tables with private heads, on Flower.

The pieces a user touches: :class:`SplitModel` (declare which embedding tables are
shared), :class:`Task` (their model, data, loss and metrics), and the ``fedembed`` command
(``simulate``, ``report``).
"""

from typing import TYPE_CHECKING, Any

__all__ = ["SplitModel", "Task", "TaskSpec"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from fedembed.model import SplitModel
    from fedembed.task import Task, TaskSpec


def __getattr__(name: str) -> Any:
    # Lazy, so that light modules (the secure stages, the wire format) never pull in torch.
    if name == "SplitModel":
        from fedembed.model import SplitModel

        return SplitModel
    if name in ("Task", "TaskSpec"):
        from fedembed import task

        return getattr(task, name)
    raise AttributeError(f"module 'fedembed' has no attribute {name!r}")
