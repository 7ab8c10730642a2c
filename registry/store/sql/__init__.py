"""The SQLAlchemy implementations of the stores (PostgreSQL + pgvector): ``catalogue``, ``library``, ``jobs``,
``evaluations`` and ``audit``, one module each, sharing ``records`` (ORM rows -> entities). All of elmreg's SQL is
here and in ``migrations/``."""
