"""fedembed: federated learning of shared embedding tables with private heads, on Flower.

The pieces a user touches: :class:`SplitModel` (declare which embedding tables are
shared), :class:`Task` (their model, data, loss and metrics), and the ``fedembed`` command
(``simulate``, ``report``).
"""

from fedembed.model import SplitModel
from fedembed.task import Task, TaskSpec

__all__ = ["SplitModel", "Task", "TaskSpec"]
__version__ = "0.1.0"
