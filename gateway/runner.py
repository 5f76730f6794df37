"""Runs the gateway's roles in one process until asked to stop."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime

from apscheduler.schedulers.background import BackgroundScheduler

from eldercare.gateway.ingest import metrics
from eldercare.gateway.settings import Settings
from eldercare.gateway.store.store import Store

log = logging.getLogger(__name__)

MAINTENANCE_EVERY_MIN = 10


class MaintenanceRole:
    """The scheduled jobs of the maintenance role, on one ``Store`` opened at the first run.

    The store is opened lazily: the role may start before the database answers, and a run
    that finds it down logs and leaves it to the next run.
    """

    def __init__(self, settings: Settings, open_timeout_s: float = 30.0) -> None:
        self.settings = settings
        self.open_timeout_s = open_timeout_s
        self.store: Store | None = None

    def _store(self) -> Store:
        if self.store is None:
            self.store = Store.open(
                self.settings.database_url,
                min_size=1,
                max_size=2,
                name="maintenance",
                timeout=self.open_timeout_s,
            )
        return self.store

    def maintenance(self) -> None:
        """Partitions, retention, rollups and cleanup (``store.maintenance``)."""
        from eldercare.gateway.store.maintenance import run_maintenance

        s = self.settings
        try:
            with self._store().connection() as conn:
                report = run_maintenance(
                    conn,
                    now=datetime.now(UTC),
                    retention_observations_days=s.retention_observations_days,
                    retention_dead_letters_days=s.retention_dead_letters_days,
                    buffer_horizon_days=s.buffer_horizon_days,
                )
            log.info("maintenance done", extra={"report": str(report)})
        except Exception:  # a failed run must not kill the scheduler; the next run retries
            log.exception("maintenance failed")

    def close(self) -> None:
        """Close the store's pool, if it was opened."""
        if self.store is not None:
            self.store.close()


def run_roles(settings: Settings, roles: set[str], stop: threading.Event, retire: bool = False) -> None:
    """Start the named roles ('ingest', 'maintenance'); return once ``stop`` is set."""
    metrics.serve_metrics(settings.metrics_port, settings.metrics_host)
    if settings.metrics_port:
        log.info("metrics at http://%s:%d/metrics", settings.metrics_host, settings.metrics_port)
    scheduler = None
    jobs = MaintenanceRole(settings)
    if "maintenance" in roles:
        scheduler = BackgroundScheduler(timezone="UTC")
        scheduler.add_job(
            jobs.maintenance,
            "interval",
            minutes=MAINTENANCE_EVERY_MIN,
            next_run_time=datetime.now(UTC),
            max_instances=1,
            coalesce=True,
        )
        scheduler.start()
    timers = None
    if "ingest" in roles:
        from eldercare.gateway.ingest.alerting import start_rule_timers

        timers = start_rule_timers(settings)
    try:
        if "ingest" in roles:
            from eldercare.gateway.ingest.worker import IngestWorker

            worker = IngestWorker(settings, retire=retire)

            def stop_worker_on_signal() -> None:
                stop.wait()
                worker.stop()

            threading.Thread(target=stop_worker_on_signal, daemon=True).start()
            worker.run()
        else:
            stop.wait()
    finally:
        if scheduler is not None:
            scheduler.shutdown(wait=False)
        if timers is not None:
            timers.stop()
        jobs.close()
