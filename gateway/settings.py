"""The one settings object: every knob, read from ``ELDERCARE_*`` environment variables."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from eldercare.devices.connection import MqttTarget

#: Shown by ``eldercare --help``: each setting, its variable and its default.
SETTINGS_HELP = """\
Settings (environment variables, or a .env file in the working folder):
  ELDERCARE_DATABASE_URL        postgresql://... of the store (empty: embedded PostgreSQL
                                in ELDERCARE_DATA_DIR, for the demo)
  ELDERCARE_MQTT_URL            mqtt://user:pass@host:1883 or mqtts://... (empty: embedded
                                broker, for the demo)
  ELDERCARE_MQTT_PROTOCOL       5 (default) or 3.1.1; 3.1.1 for brokers without MQTT 5
  ELDERCARE_MQTT_SHARED_GROUP   empty (default): one plain subscription on one session,
                                consumed by the worker holding the ingest lease (others stand
                                by); a group name: $share/<group>/..., only on brokers that
                                keep shared subscriptions across a restart (not Mosquitto 2.0)
  ELDERCARE_MQTT_CLIENT_ID      worker client id (default: eldercare-ingest; with a shared
                                group eldercare-ingest-<host>-<n>)
  ELDERCARE_MQTT_KEEPALIVE      MQTT keepalive of the worker, seconds (default 30)
  ELDERCARE_MQTT_SESSION_EXPIRY seconds the broker keeps a worker's session (default 86400)
  ELDERCARE_BATCH_SIZE          messages per transaction at most (default 500)
  ELDERCARE_BATCH_MAX_DELAY_MS  longest a message waits for its batch (default 50)
  ELDERCARE_QUEUE_SIZE          in-memory bound of received, uncommitted messages (default 2000)
  ELDERCARE_QUEUE_BYTES         the same bound in payload bytes (default 8388608 = 8 MiB)
  ELDERCARE_METRICS_PORT        Prometheus /metrics port (default 9464; 0: off)
  ELDERCARE_METRICS_HOST        address /metrics listens on (default 127.0.0.1)
  ELDERCARE_LOG_LEVEL           DEBUG, INFO, WARNING, ERROR (default INFO)
  ELDERCARE_LOG_FORMAT          json (default) or console
  ELDERCARE_DEAD_LETTER_BUDGET_KIB  dead-letter bytes a device may store per hour (default 256);
                                beyond it rejections are only counted (dead_letter_budget)
  ELDERCARE_BUFFER_HORIZON_DAYS readings older than this are rejected too_old (default 30)
  ELDERCARE_STORE_FLAVOUR       auto (default: TimescaleDB when it can be created, else
                                plain), plain or timescale; decided at the first migrate
  ELDERCARE_RETENTION_OBSERVATIONS_DAYS   (default 730)
  ELDERCARE_RETENTION_DEAD_LETTERS_DAYS   (default 90)
  ELDERCARE_DATA_DIR            where embedded services keep their data (default ./.eldercare)
  ELDERCARE_RULES               default (the rules engine, decisions in each batch's
                                transaction), off (store only) or module:factory of a batch step
  ELDERCARE_RULES_FILE          a deployment's own rule file (TOML, the shape of
                                alerts/default_rules.toml; empty: the packaged default)
"""


class Settings(BaseSettings):
    """Everything configurable, validated once at start-up."""

    model_config = SettingsConfigDict(env_prefix="ELDERCARE_", env_file=".env", extra="ignore", frozen=True)

    database_url: str = ""
    mqtt_url: str = ""
    mqtt_protocol: Literal["5", "3.1.1"] = "5"
    mqtt_shared_group: str = ""
    mqtt_client_id: str = ""
    mqtt_session_expiry: int = Field(86_400, ge=0)
    mqtt_keepalive: int = Field(30, ge=5, le=300)
    batch_size: int = Field(500, ge=1, le=50_000)
    batch_max_delay_ms: int = Field(50, ge=0, le=60_000)
    queue_size: int = Field(2_000, ge=10)
    queue_bytes: int = Field(8 * 1024 * 1024, ge=64 * 1024)
    metrics_port: int = Field(9464, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "console"] = "json"
    buffer_horizon_days: int = Field(30, ge=1)
    dead_letter_budget_kib: int = Field(256, ge=64)
    store_flavour: Literal["auto", "plain", "timescale"] = "auto"
    retention_observations_days: int = Field(730, ge=1)
    retention_dead_letters_days: int = Field(90, ge=1)
    data_dir: str = ".eldercare"
    rules: str = "default"
    rules_file: Path | None = None
    #: The dispatch role's channels (alerts/dispatch/channels.py); unset: no dispatch role.
    channels_file: Path | None = None
    #: Where hotlines send acknowledgements: the ack_url in each request is built from it.
    ack_base_url: str = "http://127.0.0.1:8000"
    #: Where the API role listens.
    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, ge=1, le=65535)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: str) -> str:
        if value and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must start with postgresql://")
        return value

    @field_validator("mqtt_url")
    @classmethod
    def _mqtt_url(cls, value: str) -> str:
        if value:
            MqttTarget(value)
        return value

    @field_validator("rules_file", "channels_file", mode="before")
    @classmethod
    def _no_file(cls, value: object) -> object:
        return None if value == "" else value

    @cached_property
    def mqtt(self) -> MqttTarget:
        """The parsed broker address (``MQTT_URL`` must be set)."""
        return MqttTarget(self.mqtt_url)


class SettingsError(Exception):
    """Settings that do not validate, said in one line."""


def load_settings(**overrides: object) -> Settings:
    """Read the settings, turning a validation error into one clear line."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(
            f"ELDERCARE_{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}" for err in exc.errors()
        )
        raise SettingsError(f"invalid settings: {problems}") from None
