"""The catalogue, one store per responsibility (the MLflow tracking-store / registry-store split).

Each store is an abstract interface returning the frozen records of ``entities`` (never ORM rows), with one
SQLAlchemy implementation under ``sql/``; ``RegistryContext`` hands them out:

================  ==============================================================================
``catalogue``     backbones, embedders, tasks, experts, lineage of merged experts (``catalogue.py``)
``library``       library entries (COPY, vector search), library versions, routing decisions and votes
``jobs``          the work queue (leases), training runs, locks across processes
``evaluations``   evaluation results and benchmark runs
``audit``         the audit views and the catalogue's status
``keys``          the server's API keys (sha256 of each key, revocation)
================  ==============================================================================

All of elmreg's SQL lives in ``sql/`` (and the Alembic revisions in ``migrations/``); every database error passes
through ``session.ManagedSessions`` and leaves as an elmreg error a user can act on.
"""
