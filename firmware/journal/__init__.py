"""The board's durable state in SQLite (WAL): readings, orders, outbox, trades, deliveries.

One ``Journal`` object, assembled from parts of one responsibility each:
- ``core``: connection, transactions, meta values, nonces, schema (``schema``);
- ``readings``: stored meter readings;
- ``orders``: orders, the outbox of signed messages, trades;
- ``deliveries``: one delivery per trade, from scheduled to reported.
See core.py for why it is built the way it is (exactly-once effect, source of truth).
"""

from __future__ import annotations

from .core import JournalCore, JournalSchemaError, read_schema_version
from .deliveries import DeliveriesMixin, DeliveryRow
from .orders import OrderRow, OrdersMixin, OutboxEntry
from .readings import ReadingsMixin
from .schema import SCHEMA_VERSION

__all__ = ["Journal", "DeliveryRow", "OrderRow", "OutboxEntry", "SCHEMA_VERSION", "JournalSchemaError", "read_schema_version"]


class Journal(JournalCore, ReadingsMixin, OrdersMixin, DeliveriesMixin):
    """The board's journal (see the package docstring)."""
