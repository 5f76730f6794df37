"""The store as one object: where it is, which flavour it is (read once), its connections.

Code that works with the store takes a ``Store`` instead of a URL plus a flavour string:

    with Store.open(settings.database_url) as store:
        with store.connection() as conn:
            ...
        store.series("e-1001", "heart_rate", start, end, "1h")
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Self

import psycopg
from psycopg_pool import ConnectionPool

from eldercare.gateway.store.flavour import Flavour, StoreNotMigrated, recorded_flavour
from eldercare.gateway.store.series import Bucket, BucketName, bucketed_series


class Store:
    """A migrated store: its connection pool and its flavour."""

    def __init__(self, conninfo: str, flavour: Flavour, pool: ConnectionPool) -> None:
        self.conninfo = conninfo
        self.flavour: Flavour = flavour
        self.pool = pool

    @classmethod
    def open(
        cls,
        conninfo: str,
        *,
        min_size: int = 1,
        max_size: int = 4,
        name: str = "store",
        timeout: float = 30.0,
    ) -> Store:
        """Open a pool and read the flavour; raise StoreNotMigrated on a database not migrated."""
        pool = ConnectionPool(conninfo, min_size=min_size, max_size=max_size, open=False, name=name)
        pool.open(wait=True, timeout=timeout)
        try:
            with pool.connection() as conn:
                flavour = recorded_flavour(conn)
            if flavour is None:
                raise StoreNotMigrated("the store is not migrated: run `eldercare migrate` first")
        except BaseException:
            pool.close()
            raise
        return cls(conninfo, flavour, pool)

    @classmethod
    def known(
        cls, conninfo: str, flavour: Flavour, *, min_size: int = 1, max_size: int = 4, name: str = "store"
    ) -> Store:
        """A store whose flavour the caller has read already; the pool connects in the background.

        For long-running roles that start before the database answers: ``connection`` then
        waits (up to its timeout) instead of ``open`` failing.
        """
        pool = ConnectionPool(conninfo, min_size=min_size, max_size=max_size, open=False, name=name)
        pool.open(wait=False)
        return cls(conninfo, flavour, pool)

    @contextmanager
    def connection(self, timeout: float | None = None) -> Iterator[psycopg.Connection]:
        """A pooled connection (a transaction is committed when the block ends without error)."""
        with self.pool.connection(timeout=timeout) as conn:
            yield conn

    def series(
        self, elder_id: str, metric: str, start: datetime, end: datetime, bucket: BucketName | timedelta
    ) -> list[Bucket]:
        """One elder's buckets of one metric over ``[start, end)`` (see ``series.bucketed_series``)."""
        with self.connection() as conn:
            return bucketed_series(conn, elder_id, metric, start, end, bucket, flavour=self.flavour)

    def close(self) -> None:
        """Close the pool."""
        self.pool.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
