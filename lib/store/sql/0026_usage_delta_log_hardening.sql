-- The usage delta log (0025), after measurement and review.

-- Per-org readers (charges after each flush, get_billing_status, the close's per-subscription
-- sums, /v1 usage) would otherwise scan the whole log per lookup. Measured: COPY of 100k rows
-- sorted by org 103 ms without it, 180 ms with it; the flush still writes several times faster
-- than the upsert it replaced (bench/README.md).
CREATE INDEX IF NOT EXISTS api_usage_deltas_org_idx
  ON shared.api_usage_deltas (org_id);
-- Autovacuum must not truncate the log: that takes an ACCESS EXCLUSIVE lock, which every
-- flush and every reader of api_usage_meters would queue behind. Freed space is reused by the
-- next COPYs. A publication that replicates deletes needs a replica identity (no key here).
ALTER TABLE shared.api_usage_deltas SET (vacuum_truncate = false);
ALTER TABLE shared.api_usage_deltas REPLICA IDENTITY FULL;

-- As 0025, plus: the parent is locked first (LOCK TABLE takes parent then child, as erase_org's
-- LOCK TABLE does; the fold's DELETE alone took the child first and could deadlock with it).
CREATE OR REPLACE FUNCTION shared.fold_usage_deltas(p_max_rows integer DEFAULT 1000000,
                                                    OUT delta_rows bigint, OUT keys bigint)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  delta_rows := 0;
  keys := 0;
  IF p_max_rows IS NULL OR p_max_rows < 1 THEN
    RAISE EXCEPTION 'fold_usage_deltas: p_max_rows must be at least 1, not %', p_max_rows
      USING ERRCODE = '22023';
  END IF;
  IF NOT pg_try_advisory_xact_lock(hashtextextended('meterd.fold_usage_deltas', 0)) THEN
    RETURN;
  END IF;
  LOCK TABLE shared.api_usage_meters IN ROW EXCLUSIVE MODE;
  WITH moved AS (
    DELETE FROM ONLY shared.api_usage_deltas d
    WHERE d.ctid = ANY (ARRAY(SELECT x.ctid FROM ONLY shared.api_usage_deltas x
                              WHERE EXISTS (SELECT 1 FROM shared.meters mt
                                            WHERE mt.name = x.meter)
                              LIMIT p_max_rows))
    RETURNING d.org_id, d.meter, d.industry, d.usage_date, d.quantity),
  folded AS (
    SELECT org_id, meter, industry, usage_date, sum(quantity)::bigint AS quantity,
           count(*) AS n
    FROM moved GROUP BY org_id, meter, industry, usage_date),
  upserted AS (
    INSERT INTO shared.api_usage_meters AS m (org_id, meter, industry, usage_date, quantity)
    SELECT org_id, meter, industry, usage_date, quantity FROM folded
    ORDER BY org_id, meter, industry, usage_date
    ON CONFLICT (org_id, meter, industry, usage_date)
      DO UPDATE SET quantity = m.quantity + EXCLUDED.quantity, updated_at = now()
    RETURNING 1)
  -- (A data-modifying WITH runs to completion whether or not it is read.)
  SELECT coalesce(sum(n), 0)::bigint, count(*) INTO delta_rows, keys FROM folded;
END
$$;

-- For the compactor's gauges: the log's rows (the planner's live-row estimate, no scan) and
-- the rows no fold can move because their meter is not in shared.meters (a scan of the log,
-- which the compactor keeps small).
CREATE FUNCTION shared.usage_delta_log_status(OUT estimated_rows bigint,
                                              OUT unfoldable_rows bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  SELECT (SELECT coalesce(n_live_tup, 0) FROM pg_stat_all_tables
          WHERE relid = 'shared.api_usage_deltas'::regclass),
         (SELECT count(*) FROM ONLY shared.api_usage_deltas d
          WHERE NOT EXISTS (SELECT 1 FROM shared.meters m WHERE m.name = d.meter))
$$;
REVOKE EXECUTE ON FUNCTION shared.usage_delta_log_status() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION shared.usage_delta_log_status() TO meterd, meterd_admin;

-- A day's peak is the day's sum: until folded, a day may be split over several rows.
CREATE OR REPLACE VIEW shared.api_usage_analytics WITH (security_invoker = true) AS
SELECT d.org_id, d.industry, d.meter,
       date_trunc('month', d.usage_date)::date AS usage_month,
       sum(d.quantity)::bigint AS quantity,
       count(*) AS active_days,
       round(sum(d.quantity)::numeric / count(*), 2) AS avg_per_active_day,
       max(d.quantity) AS peak_day_quantity,
       max(d.updated_at) AS last_updated_at
FROM (SELECT m.org_id, m.industry, m.meter, m.usage_date, sum(m.quantity)::bigint AS quantity,
             max(m.updated_at) AS updated_at
      FROM shared.api_usage_meters m
      GROUP BY m.org_id, m.industry, m.meter, m.usage_date) d
GROUP BY d.org_id, d.industry, d.meter, date_trunc('month', d.usage_date);

-- As 0007, but the day's total returned includes the key's deltas not yet folded (the row
-- this function upserts holds only what was folded or written directly).
CREATE OR REPLACE FUNCTION shared.increment_api_usage(p_org uuid, p_meter text,
                                                      p_quantity bigint DEFAULT 1,
                                                      p_industry text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET timezone = 'UTC' AS $$
DECLARE
  v_industry text;
  v_max bigint;
  v_total bigint;
  v_day date := (now() AT TIME ZONE 'UTC')::date;
BEGIN
  PERFORM shared.assert_may_act_for(p_org);
  v_industry := coalesce(p_industry,
                         (SELECT industry FROM shared.organizations WHERE org_id = p_org));
  IF p_quantity IS NULL OR p_quantity < 0 THEN
    RAISE EXCEPTION 'increment_api_usage: quantity must be a non-negative integer, got %', p_quantity
      USING ERRCODE = '22023';
  END IF;
  SELECT max_event_quantity INTO v_max FROM shared.meters WHERE name = p_meter;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'increment_api_usage: unknown meter %', p_meter USING ERRCODE = '22023';
  END IF;
  IF p_quantity > v_max THEN
    RAISE EXCEPTION 'increment_api_usage: quantity_too_large: % above % for meter %',
      p_quantity, v_max, p_meter USING ERRCODE = '22003';
  END IF;
  IF v_industry IS NULL THEN
    RAISE EXCEPTION 'increment_api_usage: industry not given and org % has none', p_org
      USING ERRCODE = '22023';
  END IF;
  INSERT INTO shared.api_usage_meters AS m (org_id, meter, industry, usage_date, quantity)
  VALUES (p_org, p_meter, v_industry, v_day, p_quantity)
  ON CONFLICT (org_id, meter, industry, usage_date) DO UPDATE
    SET quantity = m.quantity + EXCLUDED.quantity, updated_at = now()
  RETURNING quantity INTO v_total;
  v_total := v_total + coalesce((SELECT sum(d.quantity) FROM ONLY shared.api_usage_deltas d
                                 WHERE d.org_id = p_org AND d.meter = p_meter
                                   AND d.industry = v_industry AND d.usage_date = v_day), 0);
  PERFORM shared.refresh_usage_charges(ARRAY[p_org]);
  RETURN v_total;
END
$$;
