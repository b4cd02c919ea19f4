-- 1. shared.audit_log: the append-only trail of billing operations (who, what, which org,
--    before and after), written in the same transaction as the change it records.
-- 2. Usage tracked by database triggers on the apps' own tables (hs, rest, auto, ret, edu,
--    payroll): a statement-level trigger adds one aggregated increment per org to
--    shared.api_usage_meters in the app's own transaction.

-- ---- 1. Audit trail ----

CREATE TABLE shared.audit_log (
  audit_id bigserial PRIMARY KEY,
  at timestamptz NOT NULL DEFAULT clock_timestamp(),
  -- 'key:<api key id>' when an API request did it, otherwise 'role:<login>'.
  actor text NOT NULL,
  action text NOT NULL,
  org_id uuid,
  before jsonb,
  after jsonb
);
CREATE INDEX audit_log_org_idx ON shared.audit_log (org_id, at);
CREATE INDEX audit_log_action_idx ON shared.audit_log (action, at);

-- Who is acting: the API sets app.actor (SET LOCAL) to the key it authenticated; any other
-- session is its login role (session_user: SET ROLE cannot disguise it).
CREATE FUNCTION shared.audit_actor()
RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT CASE WHEN shared.session_is_trusted()
                   AND coalesce(current_setting('app.actor', true), '') <> ''
              THEN current_setting('app.actor', true)
              ELSE 'role:' || session_user END
$$;

-- Appends one row; callable only by the owner's functions and the trusted roles.
CREATE FUNCTION shared.audit(p_action text, p_org uuid, p_before jsonb, p_after jsonb)
RETURNS bigint
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  INSERT INTO shared.audit_log (actor, action, org_id, before, after)
  VALUES (shared.audit_actor(), p_action, p_org, p_before, p_after)
  RETURNING audit_id
$$;
REVOKE EXECUTE ON FUNCTION shared.audit(text, uuid, jsonb, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION shared.audit(text, uuid, jsonb, jsonb) TO meterd, meterd_admin;

-- Append-only for everyone but the table's owner (whose erase function redacts personal data
-- in old rows): privileges say so, and a trigger holds even for a role granted more later.
CREATE FUNCTION shared.audit_log_append_only()
RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF NOT pg_has_role(current_user,
                     (SELECT c.relowner FROM pg_class c WHERE c.oid = TG_RELID), 'USAGE') THEN
    RAISE EXCEPTION 'shared.audit_log is append-only: % refused for %', TG_OP, current_user
      USING ERRCODE = '42501';
  END IF;
  RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END
$$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON shared.audit_log
  FOR EACH ROW EXECUTE FUNCTION shared.audit_log_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON shared.audit_log
  FOR EACH STATEMENT EXECUTE FUNCTION shared.audit_log_append_only();

ALTER TABLE shared.audit_log ENABLE ROW LEVEL SECURITY;
CREATE POLICY org_read ON shared.audit_log FOR SELECT TO meterd_org
  USING (org_id = (SELECT shared.current_org_id()));
CREATE POLICY full_access ON shared.audit_log FOR ALL TO meterd_admin, meterd
  USING (true) WITH CHECK (true);
REVOKE ALL ON shared.audit_log FROM PUBLIC;
GRANT SELECT ON shared.audit_log TO meterd_org;
GRANT SELECT, INSERT ON shared.audit_log TO meterd, meterd_admin;
GRANT USAGE ON SEQUENCE shared.audit_log_audit_id_seq TO meterd, meterd_admin;

-- ---- 2. Usage tracked on the apps' tables ----

-- What is attached (shared.track_usage writes it; the view below lists what still exists).
CREATE TABLE shared.usage_tracking (
  table_id oid PRIMARY KEY,
  meter text NOT NULL REFERENCES shared.meters (name),
  industry text NOT NULL CHECK (industry IN ('hs', 'rest', 'auto', 'ret', 'edu', 'payroll')),
  org_column name NOT NULL,
  quantity_expr text NOT NULL,
  on_ops text[] NOT NULL,
  attached_at timestamptz NOT NULL DEFAULT now(),
  attached_by text NOT NULL
);

CREATE VIEW shared.tracked_tables AS
SELECT t.table_id::regclass AS table_name, t.meter, t.industry, t.org_column, t.quantity_expr,
       t.on_ops, t.attached_at, t.attached_by
FROM shared.usage_tracking t
JOIN pg_catalog.pg_class c ON c.oid = t.table_id;

-- The trigger: TG_ARGV = meter, industry, org column, quantity expression. One pass over the
-- statement's transition table groups rows by org; the checks run before anything is
-- written; then one upsert row per org, in org order (the flush writer's order: both lock
-- rows of one day in ascending org id), and the orgs' current charges and quota alerts are
-- refreshed as the direct path does. All in the app's transaction: a rollback bills nothing.
-- SECURITY DEFINER (the apps' roles cannot write usage themselves) with EXECUTE revoked from
-- everyone: only the owner, through shared.track_usage, can attach it to a table.
CREATE FUNCTION shared.tracked_usage_trigger()
RETURNS trigger
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET timezone = 'UTC' AS $$
DECLARE
  v_meter text := TG_ARGV[0];
  v_industry text := TG_ARGV[1];
  v_rows name := CASE WHEN TG_OP = 'DELETE' THEN 'meterd_old_rows' ELSE 'meterd_new_rows' END;
  v_orgs uuid[];
  v_quantities bigint[];
  v_null_orgs bigint;
  v_bad_quantities bigint;
  v_largest bigint;
  v_max bigint;
BEGIN
  EXECUTE format(
    'SELECT array_agg(org ORDER BY org) FILTER (WHERE org IS NOT NULL AND total > 0), '
    '       array_agg(total::bigint ORDER BY org) FILTER (WHERE org IS NOT NULL AND total > 0), '
    '       coalesce(sum(rows) FILTER (WHERE org IS NULL), 0), '
    '       coalesce(sum(bad), 0), max(largest) '
    'FROM (SELECT org, sum(q) AS total, count(*) AS rows, '
    '             count(*) FILTER (WHERE q IS NULL OR q < 0) AS bad, max(q) AS largest '
    '      FROM (SELECT (r.%I)::uuid AS org, (%s)::bigint AS q FROM %I r) per_row '
    '      GROUP BY org) per_org',
    TG_ARGV[2], TG_ARGV[3], v_rows)
  INTO v_orgs, v_quantities, v_null_orgs, v_bad_quantities, v_largest;
  IF v_null_orgs > 0 THEN
    RAISE EXCEPTION 'usage tracking on %: % row(s) without an org in column %',
      TG_RELID::regclass, v_null_orgs, TG_ARGV[2] USING ERRCODE = '23502';
  END IF;
  IF v_bad_quantities > 0 THEN
    RAISE EXCEPTION 'usage tracking on %: % row(s) whose quantity (%) is null or negative',
      TG_RELID::regclass, v_bad_quantities, TG_ARGV[3] USING ERRCODE = '22023';
  END IF;
  SELECT max_event_quantity INTO v_max FROM shared.meters WHERE name = v_meter;
  IF v_largest > v_max THEN
    RAISE EXCEPTION 'usage tracking on %: quantity_too_large: % above % for meter %',
      TG_RELID::regclass, v_largest, v_max, v_meter USING ERRCODE = '22003';
  END IF;
  IF v_orgs IS NULL THEN
    RETURN NULL;
  END IF;
  INSERT INTO shared.api_usage_meters AS m (org_id, meter, industry, usage_date, quantity)
  SELECT u.org, v_meter, v_industry, (now() AT TIME ZONE 'UTC')::date, u.quantity
  FROM unnest(v_orgs, v_quantities) AS u (org, quantity)
  ORDER BY u.org
  ON CONFLICT (org_id, meter, industry, usage_date) DO UPDATE
    SET quantity = m.quantity + EXCLUDED.quantity, updated_at = now();
  PERFORM shared.refresh_usage_charges(v_orgs);
  RETURN NULL;
END
$$;
REVOKE EXECUTE ON FUNCTION shared.tracked_usage_trigger() FROM PUBLIC;

-- Attaches tracking: every INSERT (and, if asked, UPDATE or DELETE) statement on `p_table`
-- adds sum(`p_quantity_expr`) over its rows to `p_meter` for each org in `p_org_column`, on
-- the statement's UTC day, under the industry named by the table's schema. Re-attaching
-- replaces the previous definition. Only the owner of the shared schema (the role that runs
-- `meterd migrate`) may call it, with TRIGGER privilege on the table: the expression runs with
-- the owner's rights.
CREATE FUNCTION shared.track_usage(p_table regclass, p_meter text, p_org_column name,
                                   p_quantity_expr text DEFAULT '1',
                                   p_on_ops text[] DEFAULT '{INSERT}')
RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_schema name;
  v_table name;
  v_kind "char";
  v_type regtype;
  v_op text;
  v_ops text[];
BEGIN
  SELECT n.nspname, c.relname, c.relkind INTO v_schema, v_table, v_kind
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = p_table;
  IF v_kind NOT IN ('r', 'p') THEN
    RAISE EXCEPTION 'track_usage: % is not a table', p_table USING ERRCODE = '22023';
  END IF;
  IF v_schema NOT IN ('hs', 'rest', 'auto', 'ret', 'edu', 'payroll') THEN
    RAISE EXCEPTION 'track_usage: % is in schema %, not an industry schema '
                    '(hs, rest, auto, ret, edu, payroll)', p_table, v_schema
      USING ERRCODE = '22023';
  END IF;
  IF NOT EXISTS (SELECT 1 FROM shared.meters WHERE name = p_meter) THEN
    RAISE EXCEPTION 'track_usage: unknown meter %', p_meter USING ERRCODE = '22023';
  END IF;
  SELECT a.atttypid::regtype INTO v_type FROM pg_attribute a
  WHERE a.attrelid = p_table AND a.attname = p_org_column AND a.attnum > 0
    AND NOT a.attisdropped;
  IF v_type IS NULL THEN
    RAISE EXCEPTION 'track_usage: % has no column %', p_table, p_org_column
      USING ERRCODE = '42703';
  END IF;
  IF v_type NOT IN ('uuid'::regtype, 'text'::regtype, 'character varying'::regtype) THEN
    RAISE EXCEPTION 'track_usage: column %.% is %, not uuid or text', p_table, p_org_column,
      v_type USING ERRCODE = '42804';
  END IF;
  SELECT array_agg(DISTINCT upper(o) ORDER BY upper(o)) INTO v_ops FROM unnest(p_on_ops) o;
  IF v_ops IS NULL OR NOT v_ops <@ ARRAY['DELETE', 'INSERT', 'UPDATE'] THEN
    RAISE EXCEPTION 'track_usage: on_ops must be a non-empty subset of {INSERT,UPDATE,DELETE}, '
                    'got %', p_on_ops USING ERRCODE = '22023';
  END IF;
  -- The expression must compile against the table's columns as a bigint.
  BEGIN
    EXECUTE format('SELECT (%s)::bigint FROM %s r WHERE false', p_quantity_expr, p_table);
  EXCEPTION WHEN OTHERS THEN
    RAISE EXCEPTION 'track_usage: quantity expression "%" is not a bigint over %: %',
      p_quantity_expr, p_table, SQLERRM USING ERRCODE = '22023';
  END;
  PERFORM shared.untrack_usage_triggers(p_table);
  -- One trigger per operation: Postgres allows transition tables on single-event triggers only.
  FOREACH v_op IN ARRAY v_ops LOOP
    EXECUTE format('CREATE TRIGGER %I AFTER %s ON %s REFERENCING %s TABLE AS %I '
                   'FOR EACH STATEMENT EXECUTE FUNCTION shared.tracked_usage_trigger(%L, %L, %L, %L)',
                   'meterd_usage_' || lower(v_op), v_op, p_table,
                   CASE WHEN v_op = 'DELETE' THEN 'OLD' ELSE 'NEW' END,
                   CASE WHEN v_op = 'DELETE' THEN 'meterd_old_rows' ELSE 'meterd_new_rows' END,
                   p_meter, v_schema, p_org_column, p_quantity_expr);
  END LOOP;
  PERFORM shared.audit('usage_tracking.attached', NULL,
    (SELECT to_jsonb(t) - 'table_id' || jsonb_build_object('table', p_table::text)
     FROM shared.usage_tracking t WHERE t.table_id = p_table),
    jsonb_build_object('table', p_table::text, 'meter', p_meter, 'industry', v_schema,
                       'org_column', p_org_column, 'quantity_expr', p_quantity_expr,
                       'on_ops', v_ops));
  INSERT INTO shared.usage_tracking AS t (table_id, meter, industry, org_column, quantity_expr,
                                          on_ops, attached_by)
  VALUES (p_table, p_meter, v_schema, p_org_column, p_quantity_expr, v_ops, session_user)
  ON CONFLICT (table_id) DO UPDATE SET meter = EXCLUDED.meter, industry = EXCLUDED.industry,
    org_column = EXCLUDED.org_column, quantity_expr = EXCLUDED.quantity_expr,
    on_ops = EXCLUDED.on_ops, attached_at = now(), attached_by = EXCLUDED.attached_by;
END
$$;

-- Drops meterd's usage triggers from a table (internal: no audit row, no bookkeeping).
CREATE FUNCTION shared.untrack_usage_triggers(p_table regclass)
RETURNS integer
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_trigger name;
  v_dropped integer := 0;
BEGIN
  FOR v_trigger IN SELECT tgname FROM pg_trigger
                   WHERE tgrelid = p_table AND tgname LIKE 'meterd\_usage\_%' LOOP
    EXECUTE format('DROP TRIGGER %I ON %s', v_trigger, p_table);
    v_dropped := v_dropped + 1;
  END LOOP;
  RETURN v_dropped;
END
$$;

-- Detaches tracking from a table; returns whether it was attached.
CREATE FUNCTION shared.untrack_usage(p_table regclass)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_before jsonb;
BEGIN
  SELECT to_jsonb(t) - 'table_id' INTO v_before FROM shared.usage_tracking t
  WHERE t.table_id = p_table;
  IF shared.untrack_usage_triggers(p_table) = 0 AND v_before IS NULL THEN
    RETURN false;
  END IF;
  DELETE FROM shared.usage_tracking WHERE table_id = p_table;
  PERFORM shared.audit('usage_tracking.detached', NULL,
                       v_before || jsonb_build_object('table', p_table::text), NULL);
  RETURN true;
END
$$;

REVOKE EXECUTE ON FUNCTION shared.track_usage(regclass, text, name, text, text[]),
  shared.untrack_usage(regclass), shared.untrack_usage_triggers(regclass) FROM PUBLIC;
REVOKE ALL ON shared.usage_tracking FROM PUBLIC;
GRANT SELECT ON shared.usage_tracking, shared.tracked_tables TO meterd, meterd_admin;
