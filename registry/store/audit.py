"""The audit trail as stored: SQL views over routing decisions (migration 0002), and the catalogue's status."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from elmreg.registry.entities import CatalogueSummary


class AuditStore(ABC):
    """Read-only views of what elmreg did, as an auditor reads them in SQL."""

    @abstractmethod
    def summary(self) -> CatalogueSummary:
        """Schema revision, library version, server versions and the row count of every table. Works on an
        empty or out-of-date catalogue too (``elmreg status`` describes one)."""

    @abstractmethod
    def audit_rows(
        self,
        view: str,
        *,
        order_by: str | None,
        filters: dict[str, Any],
        limit: int | None,
        descending: bool = True,
    ) -> list[dict[str, Any]]:
        """Rows of one audit view (a name from ``registry.audit_views.AUDIT_VIEWS``) ordered by ``order_by``
        (newest first unless ``descending`` is False), restricted to rows whose columns equal ``filters``.

        Raises:
            UserError: A filter names a column the view does not have.
        """
