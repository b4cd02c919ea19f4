-- Monthly tables for shared.api_usage_meters: months no event can reach any more move out of
-- the hot table into one table per month, so the table that flushes, folds, upserts and
-- autovacuum work on holds only the months still open (the late window, ~3 months) instead of
-- all the history kept; a month table, written once, is frozen by autovacuum and then left
-- alone.
--
-- Why inheritance, not PARTITION BY RANGE: api_usage_meters already has an inheritance child,
-- the delta log (0025), which is what makes unfolded usage visible to every reader; Postgres
-- cannot turn a table with inheritance children into a partitioned table, nor attach an
-- inheritance child to one. So each archived month is one more inheritance child,
-- shared.api_usage_meters_YYYY_MM, with a CHECK constraint on its month: every query on
-- shared.api_usage_meters (billing functions, views, RLS, the API, exports, erase_org's LOCK and
-- re-keying UPDATE) reads and reaches it unchanged, and a query with a constant date range skips
-- the months outside it (constraint_exclusion = partition, the default). Not free: a query on
-- the parent still locks every month table and its primary key (two locks per month kept; see
-- lib/store/README.md for max_locks_per_transaction), and a query with parameters probes every
-- month's primary key. The delta log is not split by month: the compactor empties it every few
-- seconds.
--
-- A month is closed once its last day is older than the late window (late_usage_since): events
-- of it are refused from then on. Rows that still reach the hot table for it (a direct write,
-- a late window raised later) are summed into the month's table by the next archive run; until
-- then the key has one row in each, and readers sum, as they do for unfolded deltas.

-- The first day of p_month if the month is closed at p_ref: its last day is before the first
-- day the late window still accepts. p_ref is never later than now() (a NULL or future
-- reference cannot open the guard); raises 22023 otherwise.
CREATE FUNCTION shared.closed_usage_month(p_month date, p_ref timestamptz)
RETURNS date
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
SET timezone = 'UTC' AS $$
DECLARE
  v_open_since date := shared.late_usage_since(least(coalesce(p_ref, now()), now()));
BEGIN
  IF p_month IS NULL
     OR NOT ((date_trunc('month', p_month) + interval '1 month')::date <= v_open_since) THEN
    RAISE EXCEPTION 'usage month % is still open: the late window accepts events from % on; '
      'a month is archived once its last day is before that',
      date_trunc('month', p_month)::date, v_open_since
      USING ERRCODE = '22023';
  END IF;
  RETURN date_trunc('month', p_month)::date;
END
$$;

-- The month table's name, and whether it exists as a child of api_usage_meters with its month's
-- CHECK (a table of that name that was detached, or made by hand, is refused: rows moved into
-- it would vanish from every reader).
CREATE FUNCTION shared.usage_month_table(p_first date, OUT table_name text, OUT attached boolean)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT t.name,
         EXISTS (SELECT 1 FROM pg_inherits i
                 JOIN pg_constraint c ON c.conrelid = i.inhrelid
                                     AND c.conname = t.name || '_month' AND c.contype = 'c'
                 WHERE i.inhrelid = to_regclass(format('shared.%I', t.name))
                   AND i.inhparent = 'shared.api_usage_meters'::regclass)
  FROM (SELECT format('api_usage_meters_%s', to_char(p_first, 'YYYY_MM')) AS name) t
$$;
REVOKE EXECUTE ON FUNCTION shared.closed_usage_month(date, timestamptz) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION shared.usage_month_table(date) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION shared.closed_usage_month(date, timestamptz),
  shared.usage_month_table(date) TO meterd, meterd_admin;

-- Creates the month table of a closed month that has rows in the hot table, in its own
-- transaction (`meterd archive-usage` commits it before moving anything, so no reader plans a
-- query without the table and then sees the moved rows gone). Returns its name; NULL when the
-- hot table has no row of that month (nothing to archive, nothing created).
CREATE FUNCTION shared.create_usage_month_table(p_month date, p_ref timestamptz DEFAULT now())
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET timezone = 'UTC' AS $$
DECLARE
  v_first date := shared.closed_usage_month(p_month, p_ref);
  v_next date := (v_first + interval '1 month')::date;
  v_table text;
  v_attached boolean;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM ONLY shared.api_usage_meters
                 WHERE usage_date >= v_first AND usage_date < v_next) THEN
    RETURN NULL;
  END IF;
  SELECT table_name, attached INTO v_table, v_attached FROM shared.usage_month_table(v_first);
  IF v_attached THEN
    RETURN v_table;
  END IF;
  IF to_regclass(format('shared.%I', v_table)) IS NOT NULL THEN
    RAISE EXCEPTION 'shared.% exists but is not the month table of % under '
      'shared.api_usage_meters (detached?): rows moved into it would vanish from every reader',
      v_table, v_first
      USING ERRCODE = '55000',
            HINT = 'Re-attach it (ALTER TABLE ... INHERIT shared.api_usage_meters) or rename it.';
  END IF;
  EXECUTE format(
    'CREATE TABLE shared.%I ('
    '  PRIMARY KEY (org_id, meter, industry, usage_date),'
    '  FOREIGN KEY (meter) REFERENCES shared.meters (name),'
    '  CONSTRAINT %I CHECK (usage_date >= %L AND usage_date < %L)'
    ') INHERITS (shared.api_usage_meters) WITH (fillfactor = 100)',
    v_table, v_table || '_month', v_first, v_next);
  EXECUTE format('ALTER TABLE shared.%I SET (vacuum_truncate = false)', v_table);
  EXECUTE format('REVOKE ALL ON shared.%I FROM PUBLIC', v_table);
  EXECUTE format('GRANT SELECT ON shared.%I TO meterd, meterd_admin', v_table);
  RETURN v_table;
END
$$;
REVOKE EXECUTE ON FUNCTION shared.create_usage_month_table(date, timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION shared.create_usage_month_table(date, timestamptz)
  TO meterd, meterd_admin;

-- Moves up to p_max_rows rows of a closed p_month (any day of it) from the hot table into the
-- month's table (create_usage_month_table first). One statement in the caller's transaction, so
-- a reader sees every row in exactly one of the two; `meterd archive-usage` calls it, one
-- committed batch at a time, until it returns 0, so a big month never becomes one huge
-- transaction. Rows are locked in key order, as the fold and the replay upsert them (no
-- deadlock with either). Returns the rows moved.
CREATE FUNCTION shared.archive_usage_month(p_month date, p_max_rows integer DEFAULT 100000,
                                           p_ref timestamptz DEFAULT now())
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET timezone = 'UTC' AS $$
DECLARE
  v_first date := shared.closed_usage_month(p_month, p_ref);
  v_next date := (v_first + interval '1 month')::date;
  v_table text;
  v_attached boolean;
  v_moved bigint;
BEGIN
  IF p_max_rows IS NULL OR p_max_rows < 1 THEN
    RAISE EXCEPTION 'archive_usage_month: p_max_rows must be at least 1, not %', p_max_rows
      USING ERRCODE = '22023';
  END IF;
  -- One archive run at a time; parent before child, as fold_usage_deltas and erase_org lock.
  PERFORM pg_advisory_xact_lock(hashtextextended('meterd.archive_usage_month', 0));
  LOCK TABLE shared.api_usage_meters IN ROW EXCLUSIVE MODE;
  SELECT table_name, attached INTO v_table, v_attached FROM shared.usage_month_table(v_first);
  IF NOT v_attached THEN
    RAISE EXCEPTION 'archive_usage_month: no month table shared.% under '
      'shared.api_usage_meters', v_table
      USING ERRCODE = '55000',
            HINT = format('SELECT shared.create_usage_month_table(%L) first, and commit it.',
                          v_first);
  END IF;
  EXECUTE format(
    'WITH moved AS ('
    '  DELETE FROM ONLY shared.api_usage_meters'
    '  WHERE ctid = ANY (ARRAY(SELECT ctid FROM ONLY shared.api_usage_meters'
    '                         WHERE usage_date >= %1$L AND usage_date < %2$L'
    '                         ORDER BY org_id, meter, industry, usage_date'
    '                         LIMIT %4$s FOR UPDATE))'
    '  RETURNING org_id, meter, industry, usage_date, quantity, updated_at),'
    ' merged AS ('
    '  INSERT INTO shared.%3$I AS a (org_id, meter, industry, usage_date, quantity, updated_at)'
    '  SELECT org_id, meter, industry, usage_date, quantity, updated_at FROM moved'
    '  ORDER BY org_id, meter, industry, usage_date'
    '  ON CONFLICT (org_id, meter, industry, usage_date) DO UPDATE'
    '    SET quantity = a.quantity + EXCLUDED.quantity,'
    '        updated_at = greatest(a.updated_at, EXCLUDED.updated_at)'
    '  RETURNING 1)'
    ' SELECT count(*) FROM moved', v_first, v_next, v_table, p_max_rows) INTO v_moved;
  IF v_moved > 0 THEN
    PERFORM shared.audit('usage.archived', NULL, NULL,
                         jsonb_build_object('month', v_first, 'table', 'shared.' || v_table,
                                            'rows', v_moved));
  END IF;
  RETURN v_moved;
END
$$;
REVOKE EXECUTE ON FUNCTION shared.archive_usage_month(date, integer, timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION shared.archive_usage_month(date, integer, timestamptz)
  TO meterd, meterd_admin;

-- The closed months (wholly before the late window) that still have rows in the hot table,
-- oldest first: what `meterd archive-usage` archives, one month per transaction.
CREATE FUNCTION shared.usage_months_to_archive(p_ref timestamptz DEFAULT now())
RETURNS SETOF date
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET timezone = 'UTC' AS $$
  SELECT DISTINCT date_trunc('month', m.usage_date)::date
  FROM ONLY shared.api_usage_meters m
  WHERE m.usage_date < date_trunc('month', shared.late_usage_since(
                           least(coalesce(p_ref, now()), now())))::date
  ORDER BY 1
$$;
REVOKE EXECUTE ON FUNCTION shared.usage_months_to_archive(timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION shared.usage_months_to_archive(timestamptz) TO meterd, meterd_admin;

-- The month tables with their row estimate, oldest first (for operators and `meterd
-- archive-usage`'s summary).
CREATE VIEW shared.usage_archive_months AS
SELECT c.relname::text AS table_name,
       to_date(right(c.relname, 7), 'YYYY_MM') AS month,
       greatest(c.reltuples, 0)::bigint AS estimated_rows,
       pg_total_relation_size(c.oid) AS total_bytes
FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = 'shared.api_usage_meters'::regclass
  AND c.relname ~ '^api_usage_meters_[0-9]{4}_[0-9]{2}$'
ORDER BY 2;
REVOKE ALL ON shared.usage_archive_months FROM PUBLIC;
GRANT SELECT ON shared.usage_archive_months TO meterd, meterd_admin;
