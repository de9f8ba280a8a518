"""Errors raised by umemd.

Every error umemd raises derives from :class:`UmemError`. The tree::

    UmemError
     +-- DeviceError             an operation on a umem device failed (errno kept)
     |    +-- ModuleNotLoadedError   /dev/umem/control is missing
     |    +-- InstanceExistsError    CREATE of a name in use
     |    +-- InstanceNotFoundError  ATTACH/DESTROY of an unknown name
     |    +-- ServerBusyError        ATTACH while another server fd is open
     +-- ApiMismatchError        the module speaks another ABI version
     +-- ProtocolError           the wire protocol was broken
     |    +-- LocalProtocolError     by us (a bug in umemd)
     |    +-- RemoteProtocolError    by the peer: that connection is closed
     |         +-- MigrationMismatchError  the peer belongs to another migration
     |         +-- AuthenticationError     the peer does not hold our key
     +-- ConnectError            a connection could not be made (OSError kept as cause)
     +-- MigrationAbortedError   the migration was aborted: no page may be served or used
     +-- SourceLostError         no page server for longer than --source-timeout
     +-- SizeMismatchError       the source's RAM and the instance differ in size
     +-- MigrationError          umemd migrate: the migration could not start or did not finish

Messages name the thing that failed and, where there is one, the fix.
"""

from __future__ import annotations

import errno
import os


class UmemError(Exception):
    """Root of every umemd error."""


class DeviceError(UmemError, OSError):
    """A umem device operation failed; ``errno`` holds the kernel's error."""

    def __init__(self, err: int, message: str) -> None:
        OSError.__init__(self, err, message)
        self.message = message
        self.err = err

    def __str__(self) -> str:
        return f"{self.message}: {os.strerror(self.err)} ({errno.errorcode.get(self.err, self.err)})"


class ModuleNotLoadedError(DeviceError):
    """The control node does not exist: the module is not loaded."""


class InstanceExistsError(DeviceError):
    """An instance of that name exists already."""


class InstanceNotFoundError(DeviceError):
    """No instance has that name."""


class ServerBusyError(DeviceError):
    """Another server fd is open on the instance."""


class ApiMismatchError(UmemError):
    """The loaded module does not speak the API this package was built for."""


class ProtocolError(UmemError):
    """The wire protocol was broken."""


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol does not allow here: a bug."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something malformed or out of place."""


class MigrationMismatchError(RemoteProtocolError):
    """The peer (or the instance) belongs to another migration: a stale daemon."""


class AuthenticationError(RemoteProtocolError):
    """The two sides hold different keys (or one uses TLS and the other not)."""


class MigrationAbortedError(UmemError):
    """The migration is off (the source guest ran again, it was cancelled or
    failed, or the source's QMP was lost before the release)."""


class ConnectError(UmemError):
    """A connection to the peer failed; ``__cause__`` is the OSError."""


class SourceLostError(UmemError):
    """The pull had no page server for longer than its --source-timeout; the
    instance stays, for a restarted pull to attach to."""


class SizeMismatchError(UmemError):
    """The source's RAM and the instance differ in size."""


class MigrationError(UmemError):
    """The migration could not start or did not finish."""
