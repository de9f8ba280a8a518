"""umemd: the post-copy page daemon for the umem device.

Public API; keep docs/architecture.md in step when a name here changes.
"""

import logging

from umemd.device import (
    Control,
    Fault,
    FillResult,
    InstanceInfo,
    NodeOwner,
    Server,
    Stats,
    node_path,
    read_counters,
)
from umemd.errors import (
    ApiMismatchError,
    DeviceError,
    InstanceExistsError,
    InstanceNotFoundError,
    ModuleNotLoadedError,
    ServerBusyError,
    UmemError,
)

__all__ = [
    "ApiMismatchError",
    "Control",
    "DeviceError",
    "Fault",
    "FillResult",
    "InstanceExistsError",
    "InstanceInfo",
    "InstanceNotFoundError",
    "ModuleNotLoadedError",
    "NodeOwner",
    "Server",
    "ServerBusyError",
    "Stats",
    "UmemError",
    "node_path",
    "read_counters",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
