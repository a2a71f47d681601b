"""The typed error hierarchy of dkv, and its wire encoding.

Every error a user can see derives from :class:`DKVError`. Each class has a
stable ``code`` string; errors cross the wire as ``[code, message, data]``
(see :func:`to_wire` / :func:`from_wire`) so a client re-raises the same class
the server raised.

Write outcomes follow DESIGN G5: :class:`QuorumNotReached` and
:class:`InvalidArgument` are *definite* (the write was not applied and never
will be); :class:`WriteTimeout` is *indeterminate* (it may or may not be
applied). :class:`Unavailable` on a write is raised only when the request
provably never reached a node that could apply it.
"""

from __future__ import annotations

from typing import Any


class DKVError(Exception):
    """Base class of every dkv error."""

    code = "ERR"
    #: True when the failed operation certainly had no effect.
    definite = True

    def __init__(self, message: str = "", **data: Any) -> None:
        super().__init__(message or self.__class__.__doc__ or self.code)
        self.message = message or (self.__class__.__doc__ or self.code).strip()
        self.data = data

    def __str__(self) -> str:
        return self.message


class InvalidArgument(DKVError):
    """The request is malformed (bad key, value, type or option); nothing changed."""

    code = "INVALID"


class KeyIsEmpty(InvalidArgument):
    """The key is empty."""

    code = "KEY_EMPTY"


class NotFound(DKVError):
    """The key does not exist."""

    code = "NOT_FOUND"


#: RoseDB-style name for the storage layer.
KeyNotFound = NotFound


class Moved(DKVError):
    """The slot is owned by another node; retry there (``data['addr']``)."""

    code = "MOVED"


class TryAgain(DKVError):
    """The slot is briefly frozen (migration); retry shortly."""

    code = "TRYAGAIN"


class Deferred(DKVError):
    """The reply reached its size budget before this op was read; nothing was done: send it
    again in a later batch (the client does so by itself)."""

    code = "DEFERRED"


class Unavailable(DKVError):
    """No node able to serve the request answered."""

    code = "UNAVAILABLE"


class WriteTimeout(DKVError):
    """The write may or may not have been applied (indeterminate)."""

    code = "WRITE_TIMEOUT"
    definite = False


class QuorumNotReached(DKVError):
    """Too few replicas acknowledged; the write was not applied (definite)."""

    code = "QUORUM_NOT_REACHED"


class LockTimeout(DKVError):
    """The lock was not acquired within the timeout; nothing is held (definite)."""

    code = "LOCK_TIMEOUT"


class CorruptLog(DKVError):
    """The write-ahead log is damaged in a way recovery must not paper over."""

    code = "CORRUPT_LOG"


class AuthError(DKVError):
    """The caller is not authenticated, or its key may not call this RPC; nothing changed."""

    code = "AUTH"


class Internal(DKVError):
    """The node hit an unexpected error (details in its log); the outcome is unknown."""

    code = "INTERNAL"
    definite = False


class Compacted(DKVError):
    """The history a watch needs was compacted away: re-read the keys, then watch again
    with ``since`` at least ``revision`` (history is complete for revisions above it)."""

    code = "COMPACTED"

    def __init__(self, revision: "int | str" = 0, /, **data: Any) -> None:
        message = ""
        if isinstance(revision, str):  # rebuilt from the wire: (message, revision=...)
            message, revision = revision, data.pop("revision", 0)
        else:
            data.pop("revision", None)
        revision = revision if isinstance(revision, int) and not isinstance(revision, bool) else 0
        super().__init__(
            message
            or f"the history up to revision {revision} was compacted: re-read, "
            f"then watch again from revision {revision} or later",
            revision=revision,
            **data,
        )
        #: the oldest ``since`` a watch may start from now
        self.revision = revision


class StorageClosed(DKVError):
    """The storage engine or log is closed (node shutting down)."""

    code = "CLOSED"


def _all_subclasses(cls: type[DKVError]) -> list[type[DKVError]]:
    out: list[type[DKVError]] = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


def error_class(code: str) -> type[DKVError]:
    """The class registered for a wire ``code`` (``DKVError`` if unknown)."""
    for cls in _all_subclasses(DKVError):
        if cls.code == code:
            return cls
    return DKVError


def to_wire(err: DKVError) -> list[Any]:
    """Encode an error as ``[code, message, data]`` for msgpack."""
    return [err.code, err.message, err.data]


def from_wire(payload: list[Any]) -> DKVError:
    """Rebuild the error encoded by :func:`to_wire`."""
    code, message, data = payload[0], payload[1], (payload[2] if len(payload) > 2 else {})
    cls = error_class(code)
    err = cls(message, **(data or {}))
    return err


def from_remote(name: str, message: str) -> DKVError | None:
    """Rebuild a DKVError raised by a plain zerorpc method (matched by class name)."""
    classes: list[type[DKVError]] = [DKVError, *_all_subclasses(DKVError)]
    for cls in classes:
        if cls.__name__ == name:
            return cls(message)
    return None
