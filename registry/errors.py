"""The exceptions elmreg raises.

Every error a user can fix derives from :class:`UserError`; the CLI prints its message on one line and exits
with code 2. Other :class:`ElmregError` s (an outage, a corrupted object) are also printed on one line, with
exit code 1. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class ElmregError(Exception):
    """Base class of all elmreg errors."""


class UserError(ElmregError):
    """Bad input or configuration: the message says what is wrong and how to fix it."""


class ConfigurationError(UserError):
    """A setting is missing or invalid."""


class NotFoundError(UserError):
    """A named task, expert, job or object does not exist."""


class AlreadyExistsError(UserError):
    """A unique name is already taken."""


class InvalidStateError(UserError):
    """The named object exists but its state does not allow the operation (retiring a retired expert)."""


class TaskSpecError(UserError):
    """A task's dataset, split, columns or prompt template cannot be used."""


class ServiceError(ElmregError):
    """An embedded or configured service (PostgreSQL, S3) cannot be reached or started."""


class CatalogueError(ElmregError):
    """The catalogue database rejected an operation."""


class SchemaOutOfDateError(UserError):
    """The catalogue schema is older than this version of elmreg expects."""


class ArtifactError(ElmregError):
    """The artifact store failed."""


class ArtifactIntegrityError(ArtifactError):
    """A downloaded artifact does not match the sha256 or size recorded in the catalogue."""


class ArtifactNotFoundError(ArtifactError):
    """The catalogue references an object that is not in the artifact store."""


class CredentialsError(ArtifactError, ConfigurationError):
    """The S3 server rejected the configured credentials."""
