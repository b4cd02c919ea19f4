-- Per-meter event limits, and replay of rejected events once their cause is fixed.
-- Independent of 0005 (it touches only shared.meters and shared.rejected_events), so it is
-- correct whichever of the two a database receives first.

-- The largest quantity ONE event of this meter may carry; above it the event is refused as
-- quantity_too_large instead of counted, so one outlier cannot poison a bill. The upper bound
-- keeps a day's int64 sum safe whatever the producers send (meterd never allows more).
ALTER TABLE shared.meters
  ADD COLUMN max_event_quantity bigint NOT NULL DEFAULT 1000000000
    CHECK (max_event_quantity BETWEEN 1 AND 1000000000);

-- Set in the same transaction that adds a replayed row's events to shared.api_usage_meters
-- (`meterd replay-rejected`); NULL while the row has never been counted.
ALTER TABLE shared.rejected_events ADD COLUMN replayed_at timestamptz;

-- The replay's scan: unreplayed rows of one reason since a time, in (rejected_at, id) order.
-- Partial, so rows already replayed cost the scan nothing.
CREATE INDEX rejected_events_unreplayed_idx ON shared.rejected_events (reason, rejected_at, id)
  WHERE replayed_at IS NULL;

-- 0004 granted meterd table-wide rights, which cover the new columns; stated here because the
-- daemon and the replay rely on exactly these.
GRANT SELECT ON shared.meters TO meterd;
GRANT SELECT, UPDATE (replayed_at) ON shared.rejected_events TO meterd;
