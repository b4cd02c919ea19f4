-- The usage delta log: flushes append, a compactor folds, every reader sees both.
--
-- A flush used to upsert one row per distinct (org, meter, industry, day) into
-- shared.api_usage_meters: a primary-key probe, a row lock and a new row version each, ~7 µs a
-- key, inside the transaction that also advances the Kafka offsets. Now a flush COPYs its
-- deltas into shared.api_usage_deltas, a table with no index, no foreign key and no trigger
-- (~1.5 µs a row), in that same transaction: exactly-once is unchanged. The compactor
-- (`meterd run`, every --compact-interval) calls shared.fold_usage_deltas(), which moves a
-- batch of deltas into api_usage_meters in one statement (delete, sum per key, upsert in key
-- order), so a key flushed ten times between folds is upserted once.
--
-- api_usage_deltas INHERITS api_usage_meters: every query on shared.api_usage_meters (billing
-- functions, views, RLS policies, the API, `SELECT sum(quantity)`) also reads the pending
-- deltas, so usage is visible as soon as the flush commits, not when it is folded. A key may
-- therefore appear in several rows until folded: readers sum (all of meterd's do), and the
-- org export below returns one row per key. UPDATE, DELETE, TRUNCATE and LOCK TABLE on
-- api_usage_meters reach the deltas too (erase_org's re-keying and locking included). INSERT
-- goes to api_usage_meters itself, so direct writers (tracked writes, replay) are unchanged.
CREATE TABLE shared.api_usage_deltas () INHERITS (shared.api_usage_meters)
  WITH (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 10000,
        autovacuum_vacuum_insert_scale_factor = 0, autovacuum_vacuum_insert_threshold = 100000,
        autovacuum_analyze_scale_factor = 0.5, autovacuum_vacuum_cost_delay = 0);
-- CHECK and NOT NULL constraints are inherited; the meter foreign key is not (it would cost a
-- lookup per row): a fold moves only rows whose meter exists, and a meter cannot be renamed
-- or deleted while deltas name it (trigger below).
REVOKE ALL ON shared.api_usage_deltas FROM PUBLIC;
GRANT INSERT ON shared.api_usage_deltas TO meterd;
GRANT SELECT ON shared.api_usage_deltas TO meterd, meterd_admin;

-- Folds up to p_max_rows deltas into api_usage_meters, atomically: a reader sees a delta
-- either in the log or in its key's row, never both, never neither. One fold at a time
-- (others return 0 rows at once); deltas flushed while it runs stay for the next fold.
-- Returns the delta rows folded and the distinct keys they were summed into.
CREATE FUNCTION shared.fold_usage_deltas(p_max_rows integer DEFAULT 1000000,
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
REVOKE EXECUTE ON FUNCTION shared.fold_usage_deltas(integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION shared.fold_usage_deltas(integer) TO meterd, meterd_admin;

-- The meter foreign key of api_usage_meters, for the deltas: a meter named by a pending delta
-- keeps its name (a fold would otherwise find no meter for those rows).
CREATE FUNCTION shared.meters_guard_pending_deltas()
RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF (TG_OP = 'DELETE' OR NEW.name IS DISTINCT FROM OLD.name)
     AND EXISTS (SELECT 1 FROM ONLY shared.api_usage_deltas d WHERE d.meter = OLD.name) THEN
    RAISE EXCEPTION 'meter % has usage deltas not yet folded into shared.api_usage_meters',
      OLD.name
      USING ERRCODE = '23503',
            HINT = 'Stop meterd, run SELECT * FROM shared.fold_usage_deltas(), then retry.';
  END IF;
  RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END
$$;
CREATE TRIGGER meters_guard_pending_deltas BEFORE UPDATE OF name OR DELETE ON shared.meters
  FOR EACH ROW EXECUTE FUNCTION shared.meters_guard_pending_deltas();

-- The org export lists one usage row per key, whether or not its deltas are folded yet: the
-- export of 0013 is kept whole (renamed) and its "usage" array summed per key.
ALTER FUNCTION shared.export_org(uuid) RENAME TO export_org_unfolded;
CREATE FUNCTION shared.export_org(p_org uuid)
RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT CASE WHEN e ? 'usage' THEN jsonb_set(e, '{usage}', (
    SELECT coalesce(jsonb_agg(jsonb_build_object(
             'org_id', u.org_id, 'meter', u.meter, 'industry', u.industry,
             'usage_date', u.usage_date, 'quantity', u.quantity, 'updated_at', u.updated_at)
           ORDER BY u.usage_date, u.meter, u.industry), '[]')
    FROM (SELECT r->>'org_id' AS org_id, r->>'meter' AS meter, r->>'industry' AS industry,
                 r->>'usage_date' AS usage_date, sum((r->>'quantity')::bigint) AS quantity,
                 max(r->>'updated_at') AS updated_at
          FROM jsonb_array_elements(e->'usage') r
          GROUP BY 1, 2, 3, 4) u)) ELSE e END
  FROM shared.export_org_unfolded(p_org) e
$$;
REVOKE EXECUTE ON FUNCTION shared.export_org(uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION shared.export_org(uuid) TO meterd_admin, meterd, meterd_org;
