"""Runs the gateway's roles in one process until asked to stop."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime

from apscheduler.schedulers.background import BackgroundScheduler

from eldercare.gateway.ingest import metrics
from eldercare.gateway.settings import Settings

log = logging.getLogger(__name__)

MAINTENANCE_EVERY_MIN = 10


def _maintenance_job(settings: Settings) -> None:
    from eldercare.gateway.store.maintenance import run_maintenance

    try:
        report = run_maintenance(
            settings.database_url,
            now=datetime.now(UTC),
            retention_observations_days=settings.retention_observations_days,
            retention_dead_letters_days=settings.retention_dead_letters_days,
            buffer_horizon_days=settings.buffer_horizon_days,
        )
        log.info("maintenance done", extra={"report": str(report)})
    except Exception:  # a failed run must not kill the scheduler; the next run retries
        log.exception("maintenance failed")


def run_roles(settings: Settings, roles: set[str], stop: threading.Event, retire: bool = False) -> None:
    """Start the named roles ('ingest', 'maintenance'); return once ``stop`` is set."""
    metrics.serve_metrics(settings.metrics_port, settings.metrics_host)
    if settings.metrics_port:
        log.info("metrics at http://%s:%d/metrics", settings.metrics_host, settings.metrics_port)
    scheduler = None
    if "maintenance" in roles:
        scheduler = BackgroundScheduler(timezone="UTC")
        scheduler.add_job(
            _maintenance_job,
            "interval",
            minutes=MAINTENANCE_EVERY_MIN,
            args=[settings],
            next_run_time=datetime.now(UTC),
            max_instances=1,
            coalesce=True,
        )
        scheduler.start()
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
