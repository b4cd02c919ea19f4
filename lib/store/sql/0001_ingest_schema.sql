-- meterd ingestion schema: meters, daily usage buckets, offsets stored with the data, rejects.
CREATE SCHEMA IF NOT EXISTS shared;

CREATE TABLE shared.meters (
  meter_id smallint PRIMARY KEY,
  name text NOT NULL UNIQUE CHECK (name ~ '^[a-z][a-z0-9_]{0,62}$'),
  unit text NOT NULL,
  description text NOT NULL DEFAULT ''
);
INSERT INTO shared.meters (meter_id, name, unit, description) VALUES
  (1, 'api_calls', 'call', 'API requests served'),
  (2, 'data_exports', 'export', 'Data exports produced'),
  (3, 'ai_requests', 'request', 'AI requests answered');

-- One row per (org, meter, industry, UTC day). Counters only grow; billing periods are day
-- ranges, so a "monthly reset" never touches this table.
CREATE TABLE shared.api_usage_meters (
  org_id uuid NOT NULL,
  meter text NOT NULL REFERENCES shared.meters (name),
  industry text NOT NULL CHECK (industry IN ('hs', 'rest', 'auto', 'ret', 'edu', 'payroll')),
  usage_date date NOT NULL,
  quantity bigint NOT NULL CHECK (quantity >= 0),
  updated_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (org_id, meter, industry, usage_date)
) WITH (fillfactor = 70, autovacuum_vacuum_scale_factor = 0.02,
        autovacuum_analyze_scale_factor = 0.05);
CREATE INDEX api_usage_meters_date_idx ON shared.api_usage_meters (usage_date);

-- The source of truth for consumed offsets, advanced in the same transaction as the counters
-- with a compare-and-set on next_offset.
CREATE TABLE shared.ingest_offsets (
  consumer_group text NOT NULL,
  topic text NOT NULL,
  partition integer NOT NULL CHECK (partition >= 0),
  next_offset bigint NOT NULL CHECK (next_offset >= 0),
  updated_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (consumer_group, topic, partition)
);

CREATE TABLE shared.rejected_events (
  id bigserial PRIMARY KEY,
  rejected_at timestamptz NOT NULL DEFAULT now(),
  topic text NOT NULL,
  partition integer NOT NULL,
  kafka_offset bigint NOT NULL,
  reason text NOT NULL,
  detail text NOT NULL DEFAULT '',
  raw bytea NOT NULL,
  raw_truncated boolean NOT NULL DEFAULT false
);
CREATE INDEX rejected_events_reason_idx ON shared.rejected_events (reason, rejected_at);
