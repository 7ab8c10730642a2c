"""One place where catalogue sessions commit, roll back, and turn database errors into elmreg's own."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.orm import Session, sessionmaker

from elmreg.registry.errors import (
    AlreadyExistsError,
    CatalogueError,
    NotFoundError,
    SchemaOutOfDateError,
    ServiceError,
    first_line,
)

# SQLSTATE codes (PostgreSQL appendix A) that have a message a user can act on.
_UNIQUE_VIOLATION = "23505"
_FOREIGN_KEY_VIOLATION = "23503"
_UNDEFINED_TABLE = "42P01"
_UNDEFINED_COLUMN = "42703"


def create_catalogue_engine(url: str) -> Engine:
    """An engine for the catalogue; connections are checked before use since servers restart under us."""
    engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)

    @event.listens_for(engine, "connect")
    def _identify(dbapi_connection, _record):  # shows up in pg_stat_activity, which helps operators
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SET application_name = 'elmreg'")
        dbapi_connection.commit()

    return engine


def _sqlstate(exc: DBAPIError) -> str | None:
    return getattr(exc.orig, "sqlstate", None)


def translate_error(exc: Exception, url_hint: str = "") -> Exception:
    """Map a SQLAlchemy/driver error to the elmreg exception a user can act on."""
    if isinstance(exc, IntegrityError):
        state, detail = _sqlstate(exc), getattr(getattr(exc.orig, "diag", None), "message_detail", None)
        if state == _UNIQUE_VIOLATION:
            return AlreadyExistsError(f"already exists: {detail or exc.orig}")
        if state == _FOREIGN_KEY_VIOLATION:
            return NotFoundError(f"refers to something that does not exist: {detail or exc.orig}")
        return CatalogueError(f"the catalogue rejected the change: {str(exc.orig).strip()}")
    if isinstance(exc, ProgrammingError) and _sqlstate(exc) in (_UNDEFINED_TABLE, _UNDEFINED_COLUMN):
        return SchemaOutOfDateError("the catalogue schema is missing or out of date: run 'elmreg db upgrade'")
    if isinstance(exc, OperationalError):
        reason = first_line(exc.orig if exc.orig else exc)
        return ServiceError(f"cannot reach the catalogue database {url_hint}: {reason}".replace("  ", " "))
    if isinstance(exc, DBAPIError):
        return CatalogueError(f"catalogue error: {first_line(exc.orig)}")
    return exc


class ManagedSessions:
    """The one way the stores reach the database: ``with sessions() as s:`` yields a session that commits on
    success and rolls back on error; every database error leaves as an elmreg error (see ``translate_error``)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._factory = sessionmaker(bind=engine, expire_on_commit=False)

    @property
    def url_hint(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    @contextmanager
    def translating(self) -> Iterator[None]:
        """Turn database errors raised in the block into elmreg's (for work outside a managed session)."""
        try:
            yield
        except DBAPIError as exc:
            raise translate_error(exc, self.url_hint) from exc

    @contextmanager
    def __call__(self) -> Iterator[Session]:
        with self.translating():
            session = self._factory()
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise
            finally:
                session.close()

    @contextmanager
    def connect(self, *, autocommit: bool = False) -> Iterator[Connection]:
        """A connection of its own for the block (advisory locks held across transactions need one)."""
        with self.translating(), self.engine.connect() as connection:
            if autocommit:
                connection = connection.execution_options(isolation_level="AUTOCOMMIT")
            yield connection

    def open_connection(self) -> Connection:
        """A connection the caller closes (a lock that outlives any one block); errors translated."""
        with self.translating():
            return self.engine.connect()
