-- Core tables. Names and columns are part of the contract: analysts query them directly.

CREATE TABLE device_types (
    type        text PRIMARY KEY,
    description text NOT NULL DEFAULT '',
    -- Nominal reporting interval, used by the device_offline rule (3 x interval, min 10 min).
    report_interval_s integer NOT NULL DEFAULT 60
);

INSERT INTO device_types (type, description, report_interval_s) VALUES
    ('hub',           'home gateway relaying several sensors', 60),
    ('wristband',     'wearable: heart rate, SpO2, steps, fall detection, SOS', 60),
    ('bp_monitor',    'home blood-pressure monitor', 86400),
    ('glucometer',    'home blood-glucose meter', 86400),
    ('scale',         'body-weight scale', 86400),
    ('thermometer',   'body thermometer', 86400),
    ('bed_sensor',    'bed occupancy / vital-sign mat', 60),
    ('motion_sensor', 'PIR motion sensor', 300),
    ('door_sensor',   'door contact', 300),
    ('smoke_detector','smoke / gas detector', 3600),
    ('sos_button',    'emergency call button', 3600),
    ('room_sensor',   'room temperature', 300);

-- Elders are pseudonymous here; personal data lives in elder_profiles (separate access).
CREATE TABLE elders (
    elder_id   text PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE elder_profiles (
    elder_id   text PRIMARY KEY REFERENCES elders (elder_id) ON DELETE CASCADE,
    name       text,
    sex        text,
    birth_year integer,
    phone      text,
    address    text,
    id_number  text,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE devices (
    device_id     text PRIMARY KEY CHECK (device_id ~ '^[A-Za-z0-9._-]{3,64}$'),
    type          text NOT NULL REFERENCES device_types (type),
    elder_id      text REFERENCES elders (elder_id),
    hub_id        text REFERENCES devices (device_id),
    enabled       boolean NOT NULL DEFAULT true,
    -- Broker credential: a hash only (mosquitto_passwd PBKDF2-SHA512 format).
    password_hash text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_seen     timestamptz,
    online        boolean NOT NULL DEFAULT false,
    status_at     timestamptz,
    battery       real,
    firmware      text,
    signal_dbm    real
);
CREATE INDEX devices_elder_idx ON devices (elder_id);
CREATE INDEX devices_hub_idx ON devices (hub_id);

-- Ingest workers cache the registry and refresh on this notification (payload: device_id).
CREATE FUNCTION notify_device_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('eldercare_devices', COALESCE(NEW.device_id, OLD.device_id));
    RETURN NULL;
END $$;

CREATE TRIGGER devices_changed
    AFTER INSERT OR DELETE ON devices
    FOR EACH ROW EXECUTE FUNCTION notify_device_change();
CREATE TRIGGER devices_registry_changed
    AFTER UPDATE OF type, elder_id, hub_id, enabled ON devices
    FOR EACH ROW
    WHEN (OLD.type IS DISTINCT FROM NEW.type OR OLD.elder_id IS DISTINCT FROM NEW.elder_id
          OR OLD.hub_id IS DISTINCT FROM NEW.hub_id OR OLD.enabled IS DISTINCT FROM NEW.enabled)
    EXECUTE FUNCTION notify_device_change();

-- The metric catalog, mirrored from devices/catalog.toml at migrate time for analysts.
CREATE TABLE metrics (
    metric      text PRIMARY KEY,
    unit        text NOT NULL,
    loinc       text,
    range_low   double precision NOT NULL,
    range_high  double precision NOT NULL
);

-- Dedup: one row per accepted (publisher, msg_id). A hub's messages use the hub id.
CREATE TABLE message_receipts (
    device_id   text NOT NULL,
    msg_id      text NOT NULL,
    received_at timestamptz NOT NULL,
    PRIMARY KEY (device_id, msg_id)
);
CREATE INDEX message_receipts_received_brin ON message_receipts USING brin (received_at);

CREATE TABLE dead_letters (
    id                bigserial PRIMARY KEY,
    received_at       timestamptz NOT NULL,
    topic             text NOT NULL,
    device_id         text,
    msg_id            text,
    reason            text NOT NULL,
    detail            text NOT NULL,
    -- How many items (metrics, samples, sub-devices) of the message this row stands for.
    item_count        integer NOT NULL DEFAULT 1,
    payload           bytea,
    payload_size      integer NOT NULL,
    payload_truncated boolean NOT NULL DEFAULT false
);
CREATE INDEX dead_letters_received_idx ON dead_letters (received_at DESC);
CREATE INDEX dead_letters_device_idx ON dead_letters (device_id, received_at DESC);

-- Per-device, per-day counts of rejections and flags (duplicates and clock_skew included),
-- so "rejections per device" never needs a scan of dead_letters.
CREATE TABLE device_rejections (
    device_id text NOT NULL,
    day       date NOT NULL,
    reason    text NOT NULL,
    count     bigint NOT NULL,
    PRIMARY KEY (device_id, day, reason)
);
