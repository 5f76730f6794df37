"""Runs the gateway's roles in one process until asked to stop."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import BaseScheduler

from eldercare.gateway.ingest import metrics
from eldercare.gateway.settings import Settings
from eldercare.gateway.store.store import Store

if TYPE_CHECKING:
    import psycopg

    from eldercare.alerts.dispatch.channels import Channels
    from eldercare.gateway.jobs import JobReport, ScheduledRules

log = logging.getLogger(__name__)

MAINTENANCE_EVERY_MIN = 10
#: How often each job of the maintenance role runs. Absence: the shortest limit is 10 min (a
#: silent wristband, a Last Will), so a minute adds at most a tenth to it, and an inactivity
#: alert (urgent) is raised within a minute of the 4 h. Trends: from hourly rollups, over
#: days; an hour more on a 7-day mean or a 3-day rise of daily weigh-ins changes nothing.
#: Follow-ups: due dates are days away; an overdue task escalates within the hour. Finished
#: timers are deleted daily, a week after they finished.
MAINTENANCE_EVERY = timedelta(minutes=MAINTENANCE_EVERY_MIN)
ABSENCE_EVERY = timedelta(minutes=1)
TRENDS_EVERY = timedelta(hours=1)
FOLLOW_UPS_EVERY = timedelta(hours=1)
TIMERS_CLEANUP_EVERY = timedelta(days=1)


def _utc_now() -> datetime:
    return datetime.now(UTC)


class MaintenanceRole:
    """The scheduled jobs of the maintenance role, on one ``Store`` opened at the first run.

    The store is opened lazily: the role may start before the database answers, and a run
    that finds it down logs and leaves it to the next run. Every job is safe on several
    instances at once (``store.maintenance``, ``gateway/jobs.py``).
    """

    def __init__(
        self, settings: Settings, open_timeout_s: float = 30.0, clock: Callable[[], datetime] = _utc_now
    ) -> None:
        self.settings = settings
        self.open_timeout_s = open_timeout_s
        self.clock = clock
        self.store: Store | None = None
        self._rules: ScheduledRules | None = None

    def _store(self) -> Store:
        if self.store is None:
            self.store = Store.open(
                self.settings.database_url,
                min_size=1,
                max_size=5,  # a connection per job: they may all run at once
                name="maintenance",
                timeout=self.open_timeout_s,
            )
        return self.store

    def jobs(self) -> list[tuple[Callable[[], None], timedelta]]:
        """The role's jobs and how often each runs."""
        return [
            (self.maintenance, MAINTENANCE_EVERY),
            (self.absence, ABSENCE_EVERY),
            (self.trends, TRENDS_EVERY),
            (self.followups, FOLLOW_UPS_EVERY),
            (self.timers_cleanup, TIMERS_CLEANUP_EVERY),
        ]

    def schedule(self, scheduler: BaseScheduler) -> None:
        """Add every job to ``scheduler``: first run now, then at its interval; a run late or
        still running when the next is due is not run twice (coalesce, one instance)."""
        for job, every in self.jobs():
            scheduler.add_job(
                job,
                "interval",
                seconds=every.total_seconds(),
                next_run_time=self.clock(),
                max_instances=1,
                coalesce=True,
                id=job.__name__,
            )

    def absence(self) -> None:
        """Inactivity, device offline, low battery, wearable removed (``gateway/jobs.py``)."""
        self._rule_job("absence", lambda rules, conn, now: rules.absence(conn, now))

    def trends(self) -> None:
        """Blood pressure, glucose and weight trends from the rollups (``gateway/jobs.py``)."""
        self._rule_job("trends", lambda rules, conn, now: rules.trends(conn, now))

    def followups(self) -> None:
        """Chronic follow-ups, and overdue tasks escalated (``gateway/jobs.py``)."""
        self._rule_job("follow_ups", lambda rules, conn, now: rules.followups(conn, now))

    def timers_cleanup(self) -> None:
        """Delete timers that finished a week ago."""
        from eldercare.gateway.jobs import timers_cleanup

        try:
            with self._store().connection() as conn:
                deleted = timers_cleanup(conn, self.clock())
            log.info("finished timers deleted", extra={"deleted": deleted})
        except Exception:  # a failed run must not kill the scheduler; the next run retries
            log.exception("timers cleanup failed")

    def _scheduled_rules(self) -> ScheduledRules | None:
        """The scheduled rules on the deployment's rule set; None when the rules are off."""
        if self.settings.rules == "off":
            return None
        if self._rules is None:
            from eldercare.alerts.rules import load_rule_set
            from eldercare.gateway.jobs import ScheduledRules

            self._rules = ScheduledRules(load_rule_set(self.settings.rules_file), self._store().flavour)
        return self._rules

    def _rule_job(
        self, name: str, run: Callable[[ScheduledRules, psycopg.Connection[Any], datetime], JobReport]
    ) -> None:
        try:
            rules = self._scheduled_rules()
            if rules is None:
                return
            with self._store().connection() as conn:
                report = run(rules, conn, self.clock())
        except Exception:  # a failed run must not kill the scheduler; the next run retries
            log.exception("scheduled rules failed", extra={"job": name})
            return
        for decision, n in report.counts.items():
            metrics.DECISIONS.labels(decision).inc(n)
        for alert_id, rule, severity in report.opened:
            log.info("alert raised", extra={"alert_id": str(alert_id), "rule": rule, "severity": severity})
        done = {"job": name, "judged": report.judged, "changed": report.changed, "skipped": report.skipped}
        log.log(
            logging.INFO if report.counts or report.skipped else logging.DEBUG,
            "scheduled rules run",
            extra=done,
        )

    def maintenance(self) -> None:
        """Partitions, retention, rollups and cleanup (``store.maintenance``)."""
        from eldercare.gateway.store.maintenance import run_maintenance

        s = self.settings
        try:
            with self._store().connection() as conn:
                report = run_maintenance(
                    conn,
                    now=self.clock(),
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


def _channels(settings: Settings, role: str) -> Channels:
    from eldercare.alerts.dispatch.channels import ChannelsError, load_channels

    if settings.channels_file is None:
        raise RuntimeError(f"the {role} role needs ELDERCARE_CHANNELS_FILE (the hotlines' channels)")
    try:
        return load_channels(settings.channels_file)
    except ChannelsError as exc:
        raise RuntimeError(str(exc)) from None


def start_api(settings: Settings) -> tuple[threading.Thread, Any]:
    """The API role: uvicorn serving ``api.app`` in a thread; (thread, server to stop)."""
    import uvicorn

    from eldercare.alerts.rules import load_rule_set
    from eldercare.api.app import create_app

    app = create_app(settings, _channels(settings, "api"), load_rule_set(settings.rules_file))
    config = uvicorn.Config(
        app, host=settings.api_host, port=settings.api_port, log_config=None, access_log=False, lifespan="on"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="api")
    thread.start()
    log.info(
        "API at http://%s:%d (acknowledgements: /api/v1/dispatches/<id>/ack)",
        settings.api_host,
        settings.api_port,
    )
    return thread, server


def start_dispatcher(settings: Settings, stop: threading.Event) -> threading.Thread:
    """The dispatch role: a dispatcher's asyncio loop in a thread of its own, until ``stop``."""
    from eldercare.alerts.dispatch.dispatcher import Dispatcher
    from eldercare.alerts.rules import load_rule_set

    dispatcher = Dispatcher(
        settings.database_url,
        _channels(settings, "dispatch"),
        load_rule_set(settings.rules_file),
        ack_base_url=settings.ack_base_url,
        name=f"dispatcher-{socket.gethostname()}-{os.getpid()}",
    )

    async def serve() -> None:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        threading.Thread(
            target=lambda: (stop.wait(), loop.call_soon_threadsafe(stopping.set)), daemon=True
        ).start()
        await dispatcher.run(stopping)

    thread = threading.Thread(target=asyncio.run, args=(serve(),), name="dispatcher")
    thread.start()
    return thread


def run_roles(settings: Settings, roles: set[str], stop: threading.Event, retire: bool = False) -> None:
    """Start the named roles ('ingest', 'maintenance', 'dispatch', 'api'); return once ``stop`` is set."""
    metrics.serve_metrics(settings.metrics_port, settings.metrics_host)
    if settings.metrics_port:
        log.info("metrics at http://%s:%d/metrics", settings.metrics_host, settings.metrics_port)
    scheduler = None
    jobs = MaintenanceRole(settings)
    if "maintenance" in roles:
        scheduler = BackgroundScheduler(timezone="UTC")
        jobs.schedule(scheduler)
        scheduler.start()
    dispatching = start_dispatcher(settings, stop) if "dispatch" in roles else None
    api = start_api(settings) if "api" in roles else None
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
        if dispatching is not None:
            stop.set()
            dispatching.join(60)
        if api is not None:
            api[1].should_exit = True
            api[0].join(30)
        jobs.close()
