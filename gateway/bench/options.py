"""What ``eldercare bench ingest`` runs (BenchOptions) and what it measured (the results)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from eldercare.simulators.population import Population

if TYPE_CHECKING:
    from eldercare.simulators.publisher import Fleet

Protocol = Literal["5", "3.1.1"]
VARIANTS: tuple[str, ...] = ("telemetry", "hub")
DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
#: The Foundation issue's targets for 3-metric telemetry on the 2-core machine.
TARGET_DATAPOINTS_S = 60_000.0
TARGET_DRAIN_RATIO = 0.6


@dataclass(frozen=True)
class BenchOptions:
    """How ``eldercare bench ingest`` runs; the defaults are the documented benchmark."""

    #: PostgreSQL URL with the right to CREATE DATABASE; the bench database is made beside it.
    admin_url: str = DEFAULT_ADMIN_URL
    variants: tuple[str, ...] = VARIANTS
    #: Ingest worker processes (two share the load on a shared subscription).
    workers: int = 1
    #: MQTT protocol of the worker and of the bare subscriber.
    protocol: Protocol = "5"
    #: MQTT protocol of the publishers (5: 0x10 answers are sent again, as devices must).
    publisher_protocol: Protocol = "3.1.1"
    #: Paced steps, messages/s: 3-metric telemetry, and hub messages (each with
    #: ``samples_per_message`` samples of 3 metrics).
    rates: tuple[float, ...] = (4_000, 6_000, 8_000, 10_000, 12_000, 14_000, 16_000, 20_000)
    hub_rates: tuple[float, ...] = (50, 100, 150, 200, 250, 300, 400, 500, 600)
    step_s: float = 20.0
    #: Steps of the bare subscriber's ladder (a baseline: shorter is enough).
    bare_step_s: float = 10.0
    #: A step passes if everything published is stored within this many seconds of its end.
    settle_s: float = 2.0
    #: Backlogs for the drain measurements (bare and worker), in messages.
    drain_messages: int = 200_000
    hub_drain_messages: int = 5_000
    devices: int = 1_000
    hubs: int = 100
    subs_per_hub: int = 10
    samples_per_message: int = 100
    #: Publisher processes per step; 0: one per 15,000 msg/s of target rate.
    publishers: int = 0
    #: Run the bare subscriber phases (the baseline).
    bare: bool = True
    #: Stop a ladder at its first failed step.
    stop_at_failure: bool = True
    #: Extra ELDERCARE_* settings for the workers, e.g. (("ELDERCARE_BATCH_SIZE", "1000"),).
    worker_env: tuple[tuple[str, str], ...] = ()
    #: Keep the database, the broker's config and the workers' logs afterwards.
    keep: bool = False
    #: Write the results as JSON here too.
    json_path: str | None = None
    #: Record the (first) worker with py-spy during its backlog drain: files
    #: ``<profile_prefix>-<variant>.txt`` (collapsed stacks, one line per stack, with thread ids)
    #: and a summary printed at the end of the drain.
    profile_prefix: str | None = None
    #: ``--profile`` in wall-clock mode: every thread, waiting or not (see ``PySpy``).
    profile_wall: bool = False
    #: Telemetry from a population of elders with care plans whose vitals breach the rules
    #: (``simulators/population.py``); None: plausible values, no care plans.
    population: Population | None = None

    @classmethod
    def quick(cls, **changes: Any) -> BenchOptions:
        """A smoke-test run: short steps, small backlogs (about 30 s for both variants)."""
        base = cls(
            rates=(1_000, 2_000),
            hub_rates=(20, 40),
            step_s=1.5,
            settle_s=2.0,
            drain_messages=3_000,
            hub_drain_messages=60,
            devices=100,
            hubs=10,
        )
        return replace(base, **changes)

    def fleet(self, variant: str) -> Fleet:
        """The simulated fleet of one variant."""
        # Imported here: the CLI reads these options for its help, without paho and psycopg.
        from eldercare.simulators.publisher import Fleet

        if variant == "hub":
            return Fleet(
                variant="hub",
                size=self.hubs,
                subs_per_hub=self.subs_per_hub,
                samples_per_message=self.samples_per_message,
                # Close together: the worker's lag histogram measures from the oldest sample,
                # and the bench subtracts that sample's age (lag_offset_s); 1 ms apart keeps
                # it at 99 ms, inside the histogram's fine buckets.
                sample_spacing_ms=1,
                prefix="bench",
            )
        return Fleet(variant="telemetry", size=self.devices, prefix="bench", population=self.population)

    def ladder(self, variant: str) -> tuple[float, ...]:
        return self.hub_rates if variant == "hub" else self.rates

    def lag_offset_s(self, variant: str) -> float:
        """How old a message's oldest sample is when published (what the lag includes)."""
        fleet = self.fleet(variant)
        if variant != "hub":
            return 0.0
        return (fleet.samples_per_message - 1) * fleet.sample_spacing_ms / 1000

    def drain_size(self, variant: str) -> int:
        return self.hub_drain_messages if variant == "hub" else self.drain_messages


@dataclass(frozen=True)
class StepResult:
    """One paced step: what was published, what was stored, and the verdict."""

    target_rate: float
    published: int
    publish_rate: float
    stored: int
    stored_rate: float
    #: Seconds after the last publish until everything was stored (None: never).
    catch_up_s: float | None
    lag_p50_s: float | None
    lag_p99_s: float | None
    lag_p99_first_half_s: float | None
    lag_p99_second_half_s: float | None
    rss_mib: float
    cpu: dict[str, float]
    verdict: str
    passed: bool
    #: Workers only: mean messages per committed batch, write+commit time p50 / p99.
    batch_mean: float | None = None
    commit_p50_s: float | None = None
    commit_p99_s: float | None = None


@dataclass(frozen=True)
class DrainResult:
    """A backlog drained by a subscriber that was offline while it was published."""

    messages: int
    drained: int
    seconds: float
    rate: float
    rss_mib: float
    #: Including the worker's start-up (process start to last commit); None for bare.
    seconds_from_start: float | None = None
    #: CPU during the drain, % of one core per process group (see CpuMeter).
    cpu: dict[str, float] = field(default_factory=dict)
    #: Workers only: mean messages per committed batch, write+commit time p50 / p99.
    batch_mean: float | None = None
    commit_p50_s: float | None = None
    commit_p99_s: float | None = None


@dataclass(frozen=True)
class VariantResult:
    """Everything measured for one payload variant."""

    variant: str
    datapoints_per_message: int
    bare_drain: DrainResult | None
    bare_steps: tuple[StepResult, ...]
    worker_steps: tuple[StepResult, ...]
    worker_drain: DrainResult | None
    #: Rows counted in the database for the worker phases vs what was published to them.
    receipts_expected: int
    receipts_found: int
    observations_expected: int
    observations_found: int
    dead_letters: dict[str, int]
    notes: tuple[str, ...]

    @property
    def sustained(self) -> StepResult | None:
        """The fastest passing worker step."""
        ok = [s for s in self.worker_steps if s.passed]
        return max(ok, key=lambda s: s.publish_rate) if ok else None

    @property
    def bare_sustained(self) -> StepResult | None:
        ok = [s for s in self.bare_steps if s.passed]
        return max(ok, key=lambda s: s.publish_rate) if ok else None

    @property
    def drain_ratio(self) -> float | None:
        """Worker drain rate / bare drain rate (the apples-to-apples ratio)."""
        if self.worker_drain and self.bare_drain and self.bare_drain.rate:
            return self.worker_drain.rate / self.bare_drain.rate
        return None

    @property
    def lossless(self) -> bool:
        return (
            self.receipts_found == self.receipts_expected
            and self.observations_found == self.observations_expected
        )


@dataclass(frozen=True)
class BenchResult:
    """What ``run_ingest_bench`` measured, with the machine it ran on."""

    options: BenchOptions
    machine: dict[str, str]
    variants: tuple[VariantResult, ...]
    notes: tuple[str, ...]
    started_at: float
    seconds: float
    database: str | None = None

    def to_json(self) -> str:
        """The whole result as JSON (derived figures included)."""
        data = asdict(self)
        for v, out in zip(self.variants, data["variants"], strict=True):
            out["sustained_rate"] = v.sustained.publish_rate if v.sustained else None
            out["drain_ratio"] = v.drain_ratio
        return json.dumps(data, indent=2, default=str)


def parse_rates(text: str) -> tuple[float, ...]:
    """Rates from ``4000,8000,12_000`` (ValueError when one is not a number)."""
    return tuple(float(x.replace("_", "")) for x in text.split(",") if x.strip())
