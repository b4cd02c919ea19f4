-- Hardening of 0010 (usage tracking, audit log) and 0011 (export, erasure) after an
-- adversarial review:
-- 1. The tracking trigger runs no code the app controls: the quantity is an integer literal or
--    an integer column, and the column types are checked each time it fires (a user-defined
--    cast or operator would otherwise run with the owner's rights).
-- 2. meterd_admin and meterd lose TRIGGER, TRUNCATE and REFERENCES on meterd's tables (a
--    trigger of theirs would run with the owner's rights inside meterd's SECURITY DEFINER
--    functions), and write audit rows only through shared.audit().
-- 3. tracked_tables says whether the triggers are still there and enabled; partitioned tables
--    are refused (rows inserted into a partition directly would not fire them).
-- 4. Erasure refuses an org with a live subscription, also removes API keys, matches the org
--    id and its Stripe identity in any letter case, clears the details of the org's audit
--    rows, and leaves the old id in no free text; it locks the usage tables so no concurrent
--    write under the old id slips past it.
-- 5. Export includes API keys' metadata (never their hashes).

-- ---- 2. Privileges ----

REVOKE TRIGGER, TRUNCATE, REFERENCES ON ALL TABLES IN SCHEMA shared FROM meterd_admin, meterd;
REVOKE INSERT ON shared.audit_log FROM meterd_admin, meterd;

-- ---- 1. The tracking trigger ----

-- The quantity: an integer literal (1 per row, 5 per row) or the name of an integer column.
CREATE FUNCTION shared.tracked_quantity_sql(p_table regclass, p_quantity text)
RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_type oid;
BEGIN
  IF p_quantity ~ '^[0-9]{1,18}$' THEN
    RETURN p_quantity || '::bigint';
  END IF;
  SELECT a.atttypid INTO v_type FROM pg_attribute a
  WHERE a.attrelid = p_table AND a.attname = p_quantity AND a.attnum > 0 AND NOT a.attisdropped;
  IF v_type IS NULL OR v_type NOT IN ('int2'::regtype, 'int4'::regtype, 'int8'::regtype,
                                      'numeric'::regtype) THEN
    RAISE EXCEPTION 'usage tracking on %: quantity "%" must be an integer literal or a column '
                    'of type smallint, integer, bigint or numeric', p_table, p_quantity
      USING ERRCODE = '22023';
  END IF;
  RETURN format('r.%I::bigint', p_quantity);
END
$$;

-- The org column as uuid: only uuid, text and varchar columns (built-in casts).
CREATE FUNCTION shared.tracked_org_sql(p_table regclass, p_column name)
RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_type oid;
BEGIN
  SELECT a.atttypid INTO v_type FROM pg_attribute a
  WHERE a.attrelid = p_table AND a.attname = p_column AND a.attnum > 0 AND NOT a.attisdropped;
  IF v_type IS NULL THEN
    RAISE EXCEPTION 'usage tracking on %: no column %', p_table, p_column USING ERRCODE = '42703';
  END IF;
  IF v_type NOT IN ('uuid'::regtype, 'text'::regtype, 'varchar'::regtype) THEN
    RAISE EXCEPTION 'usage tracking on %: column % is %, not uuid or text', p_table, p_column,
      v_type::regtype USING ERRCODE = '42804';
  END IF;
  RETURN format('r.%I::text::uuid', p_column);
END
$$;

CREATE OR REPLACE FUNCTION shared.tracked_usage_trigger()
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
  -- Types are checked now, not only when tracking was attached: the table may have changed.
  EXECUTE format(
    'SELECT array_agg(org ORDER BY org) FILTER (WHERE org IS NOT NULL AND total > 0), '
    '       array_agg(total::bigint ORDER BY org) FILTER (WHERE org IS NOT NULL AND total > 0), '
    '       coalesce(sum(rows) FILTER (WHERE org IS NULL), 0), '
    '       coalesce(sum(bad), 0), max(largest) '
    'FROM (SELECT org, sum(q) AS total, count(*) AS rows, '
    '             count(*) FILTER (WHERE q IS NULL OR q < 0) AS bad, max(q) AS largest '
    '      FROM (SELECT %s AS org, %s AS q FROM %I r) per_row '
    '      GROUP BY org) per_org',
    shared.tracked_org_sql(TG_RELID, TG_ARGV[2]),
    shared.tracked_quantity_sql(TG_RELID, TG_ARGV[3]), v_rows)
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

CREATE OR REPLACE FUNCTION shared.track_usage(p_table regclass, p_meter text, p_org_column name,
                                              p_quantity_expr text DEFAULT '1',
                                              p_on_ops text[] DEFAULT '{INSERT}')
RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_schema name;
  v_kind "char";
  v_op text;
  v_ops text[];
BEGIN
  SELECT n.nspname, c.relkind INTO v_schema, v_kind
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = p_table;
  IF v_kind = 'p' THEN
    RAISE EXCEPTION 'track_usage: % is partitioned; attach tracking to each partition (rows '
                    'written to a partition directly would not reach a trigger on the parent)',
      p_table USING ERRCODE = '22023';
  END IF;
  IF v_kind <> 'r' THEN
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
  PERFORM shared.tracked_org_sql(p_table, p_org_column);
  PERFORM shared.tracked_quantity_sql(p_table, p_quantity_expr);
  SELECT array_agg(DISTINCT upper(o) ORDER BY upper(o)) INTO v_ops FROM unnest(p_on_ops) o;
  IF v_ops IS NULL OR NOT v_ops <@ ARRAY['DELETE', 'INSERT', 'UPDATE'] THEN
    RAISE EXCEPTION 'track_usage: on_ops must be a non-empty subset of {INSERT,UPDATE,DELETE}, '
                    'got %', p_on_ops USING ERRCODE = '22023';
  END IF;
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
REVOKE EXECUTE ON FUNCTION shared.track_usage(regclass, text, name, text, text[]) FROM PUBLIC;

-- ---- 3. What is really attached ----

DROP VIEW shared.tracked_tables;
CREATE VIEW shared.tracked_tables AS
SELECT t.table_id::regclass AS table_name, t.meter, t.industry, t.org_column, t.quantity_expr,
       t.on_ops, t.attached_at, t.attached_by,
       -- False when a trigger was dropped or disabled since: that table's writes are not billed.
       (SELECT count(*) FROM pg_catalog.pg_trigger g
        WHERE g.tgrelid = t.table_id AND g.tgname LIKE 'meterd\_usage\_%' AND g.tgenabled <> 'D')
         = cardinality(t.on_ops) AS active
FROM shared.usage_tracking t
JOIN pg_catalog.pg_class c ON c.oid = t.table_id;
GRANT SELECT ON shared.tracked_tables TO meterd, meterd_admin;

-- ---- 4./5. Export and erasure ----

-- Rejected events whose raw bytes name the org, in any letter case.
CREATE OR REPLACE FUNCTION shared.rejected_events_naming(p_org uuid)
RETURNS SETOF bigint
LANGUAGE sql STABLE AS $$
  SELECT r.id FROM shared.rejected_events r
  WHERE lower(encode(r.raw, 'escape')) LIKE '%' || p_org::text || '%'
$$;

-- Webhook events about the org: its id, its Stripe customer's id or email appear anywhere in
-- the payload (any letter case).
CREATE OR REPLACE FUNCTION shared.webhook_events_naming(p_org uuid)
RETURNS SETOF text
LANGUAGE sql STABLE AS $$
  SELECT w.stripe_event_id FROM shared.stripe_webhook_events w
  WHERE lower(w.payload::text) LIKE '%' || p_org::text || '%'
     OR EXISTS (SELECT 1 FROM shared.stripe_customers c
                WHERE c.org_id = p_org
                  AND (lower(w.payload::text) LIKE '%' || lower(c.stripe_customer_id) || '%'
                       OR (c.email IS NOT NULL AND c.email <> ''
                           AND lower(w.payload::text) LIKE '%' || lower(c.email) || '%')))
$$;

-- Audit rows about the org: its own, or any naming its id (any letter case).
CREATE FUNCTION shared.audit_rows_naming(p_org uuid)
RETURNS SETOF bigint
LANGUAGE sql STABLE AS $$
  SELECT a.audit_id FROM shared.audit_log a
  WHERE a.org_id = p_org OR lower(a.before::text) LIKE '%' || p_org::text || '%'
     OR lower(a.after::text) LIKE '%' || p_org::text || '%'
$$;

CREATE OR REPLACE FUNCTION shared.export_org(p_org uuid)
RETURNS jsonb
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET timezone = 'UTC' AS $$
BEGIN
  PERFORM shared.assert_data_protection_admin('org export');
  RETURN jsonb_build_object(
    'format', 'meterd.org_export.v1',
    'org_id', p_org,
    'exported_at', now(),
    'organization', (SELECT to_jsonb(o) FROM shared.organizations o WHERE o.org_id = p_org),
    'stripe_customer', (SELECT to_jsonb(c) FROM shared.stripe_customers c
                        WHERE c.org_id = p_org),
    'org_logins', (SELECT coalesce(jsonb_agg(to_jsonb(l) ORDER BY l.login), '[]')
                   FROM shared.org_logins l WHERE l.org_id = p_org),
    'api_keys', (SELECT coalesce(jsonb_agg(to_jsonb(k) - 'salt' - 'secret_hash'
                                           ORDER BY k.created_at, k.key_id), '[]')
                 FROM shared.api_keys k WHERE k.org_id = p_org),
    'subscriptions', (SELECT coalesce(jsonb_agg(to_jsonb(s) ORDER BY s.subscription_id), '[]')
                      FROM shared.subscriptions s WHERE s.org_id = p_org),
    'usage', (SELECT coalesce(jsonb_agg(to_jsonb(m) ORDER BY m.usage_date, m.meter, m.industry),
                              '[]')
              FROM shared.api_usage_meters m WHERE m.org_id = p_org),
    'usage_charges', (SELECT coalesce(jsonb_agg(to_jsonb(u) ORDER BY u.period_start, u.meter),
                                      '[]')
                      FROM shared.usage_charges u WHERE u.org_id = p_org),
    'usage_alerts', (SELECT coalesce(jsonb_agg(to_jsonb(a) ORDER BY a.alert_id), '[]')
                     FROM shared.usage_alerts a WHERE a.org_id = p_org),
    'invoices', (SELECT coalesce(jsonb_agg(to_jsonb(i) || jsonb_build_object('lines',
                   (SELECT coalesce(jsonb_agg(to_jsonb(l) ORDER BY l.line_id), '[]')
                    FROM shared.invoice_lines l WHERE l.invoice_id = i.invoice_id))
                   ORDER BY i.invoice_id), '[]')
                 FROM shared.invoices i WHERE i.org_id = p_org),
    'payments', (SELECT coalesce(jsonb_agg(to_jsonb(p) ORDER BY p.payment_id), '[]')
                 FROM shared.payments p WHERE p.org_id = p_org),
    'payment_methods', (SELECT coalesce(jsonb_agg(to_jsonb(pm) ORDER BY pm.payment_method_id),
                                        '[]')
                        FROM shared.payment_methods pm WHERE pm.org_id = p_org),
    'request_logs', (SELECT coalesce(jsonb_agg(to_jsonb(l) ORDER BY l.log_id), '[]')
                     FROM shared.api_usage_logs l WHERE l.org_id = p_org),
    'billing_close_failures', (SELECT coalesce(jsonb_agg(to_jsonb(f) ORDER BY f.period_start),
                                               '[]')
                               FROM shared.billing_close_failures f WHERE f.org_id = p_org),
    'audit_log', (SELECT coalesce(jsonb_agg(to_jsonb(a) ORDER BY a.audit_id), '[]')
                  FROM shared.audit_log a
                  WHERE a.audit_id IN (SELECT shared.audit_rows_naming(p_org))),
    -- Raw bytes as text with non-printable bytes escaped (\ooo), so the document stays JSON.
    'rejected_events', (SELECT coalesce(jsonb_agg(jsonb_build_object(
                            'id', r.id, 'rejected_at', r.rejected_at, 'topic', r.topic,
                            'partition', r.partition, 'kafka_offset', r.kafka_offset,
                            'reason', r.reason, 'detail', r.detail,
                            'raw', encode(r.raw, 'escape'), 'raw_truncated', r.raw_truncated)
                            ORDER BY r.id), '[]')
                        FROM shared.rejected_events r
                        WHERE r.id IN (SELECT shared.rejected_events_naming(p_org))),
    'stripe_webhook_events', (SELECT coalesce(jsonb_agg(to_jsonb(w) ORDER BY w.received_at,
                                                                     w.stripe_event_id), '[]')
                              FROM shared.stripe_webhook_events w
                              WHERE w.stripe_event_id IN
                                    (SELECT shared.webhook_events_naming(p_org))));
END
$$;

CREATE OR REPLACE FUNCTION shared.erase_org(p_org uuid)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET timezone = 'UTC' AS $$
DECLARE
  v_new uuid;
  v_old text := p_org::text;
  v_removed jsonb := '{}';
  v_kept jsonb := '{}';
  v_count bigint;
  v_live text;
BEGIN
  PERFORM shared.assert_data_protection_admin('org erase');
  -- One eraser per org at a time; flushes, tracked writes and charge refreshes wait for the
  -- erase (a short transaction), so none of them writes under the old id meanwhile.
  PERFORM pg_advisory_xact_lock(hashtextextended('meterd.erase_org:' || v_old, 0));
  LOCK TABLE shared.api_usage_meters, shared.usage_charges, shared.usage_alerts
    IN SHARE ROW EXCLUSIVE MODE;
  PERFORM 1 FROM shared.organizations WHERE org_id = p_org FOR UPDATE;

  -- A customer still being billed is not erased: end the subscription first (cancel it, and
  -- let close-period bill its last period and end it).
  SELECT string_agg(DISTINCT status, ', ') INTO v_live FROM shared.subscriptions
  WHERE org_id = p_org AND status <> 'ended';
  IF v_live IS NOT NULL THEN
    RAISE EXCEPTION 'org erase: org % has a subscription still %; cancel it and let '
                    'close-period end it first', p_org, v_live USING ERRCODE = '55000';
  END IF;

  -- Personal data that is not a financial record: removed (webhook payloads first: finding
  -- them needs the Stripe customer).
  UPDATE shared.stripe_webhook_events w
  SET payload = jsonb_build_object('id', w.stripe_event_id, 'type', w.event_type,
                                   'erased', true)
  WHERE w.stripe_event_id IN (SELECT shared.webhook_events_naming(p_org));
  GET DIAGNOSTICS v_count = ROW_COUNT;
  v_removed := v_removed || jsonb_build_object('stripe_webhook_payloads', v_count);
  UPDATE shared.rejected_events r SET raw = '\x'::bytea, detail = '', raw_truncated = true
  WHERE r.id IN (SELECT shared.rejected_events_naming(p_org));
  GET DIAGNOSTICS v_count = ROW_COUNT;
  v_removed := v_removed || jsonb_build_object('rejected_event_bodies', v_count);
  DELETE FROM shared.payment_methods WHERE org_id = p_org;
  GET DIAGNOSTICS v_count = ROW_COUNT;
  v_removed := v_removed || jsonb_build_object('payment_methods', v_count);
  DELETE FROM shared.stripe_customers WHERE org_id = p_org;
  GET DIAGNOSTICS v_count = ROW_COUNT;
  v_removed := v_removed || jsonb_build_object('stripe_customers', v_count);
  DELETE FROM shared.api_usage_logs WHERE org_id = p_org;
  GET DIAGNOSTICS v_count = ROW_COUNT;
  v_removed := v_removed || jsonb_build_object('request_logs', v_count);
  DELETE FROM shared.org_logins WHERE org_id = p_org;
  GET DIAGNOSTICS v_count = ROW_COUNT;
  v_removed := v_removed || jsonb_build_object('org_logins', v_count);
  DELETE FROM shared.api_keys WHERE org_id = p_org;
  GET DIAGNOSTICS v_count = ROW_COUNT;
  v_removed := v_removed || jsonb_build_object('api_keys', v_count);
  -- Audit rows about the org keep when, who and what; their details (which may hold personal
  -- values under any key) are cleared.
  UPDATE shared.audit_log a
  SET org_id = CASE WHEN a.org_id = p_org THEN NULL ELSE a.org_id END,
      before = CASE WHEN a.before IS NULL THEN NULL ELSE '{"erased": true}'::jsonb END,
      after = CASE WHEN a.after IS NULL THEN NULL ELSE '{"erased": true}'::jsonb END
  WHERE a.audit_id IN (SELECT shared.audit_rows_naming(p_org));
  GET DIAGNOSTICS v_count = ROW_COUNT;
  v_removed := v_removed || jsonb_build_object('audit_row_details', v_count);

  -- Nothing left under the old id (and nothing removed just now): never known or already
  -- erased. A no-op.
  IF NOT EXISTS (SELECT 1 FROM shared.organizations WHERE org_id = p_org)
     AND NOT EXISTS (SELECT 1 FROM shared.subscriptions WHERE org_id = p_org)
     AND NOT EXISTS (SELECT 1 FROM shared.invoices WHERE org_id = p_org)
     AND NOT EXISTS (SELECT 1 FROM shared.payments WHERE org_id = p_org)
     AND NOT EXISTS (SELECT 1 FROM shared.api_usage_meters WHERE org_id = p_org)
     AND NOT EXISTS (SELECT 1 FROM shared.usage_charges WHERE org_id = p_org)
     AND NOT EXISTS (SELECT 1 FROM shared.usage_alerts WHERE org_id = p_org)
     AND NOT EXISTS (SELECT 1 FROM shared.billing_close_failures WHERE org_id = p_org)
     AND (SELECT bool_and(value::bigint = 0) FROM jsonb_each_text(v_removed)) THEN
    RETURN jsonb_build_object('found', false);
  END IF;

  -- Financial records: moved to the pseudonym. The new organization row first (the foreign
  -- keys of subscriptions point at it), the old one last.
  v_new := gen_random_uuid();
  INSERT INTO shared.organizations (org_id, name, industry, created_at)
  SELECT v_new, 'erased organization', o.industry, date_trunc('month', o.created_at)
  FROM shared.organizations o WHERE o.org_id = p_org;
  IF NOT FOUND THEN
    -- Usage or invoices of an org never registered: kept under a registered pseudonym.
    INSERT INTO shared.organizations (org_id, name, industry)
    SELECT v_new, 'erased organization',
           coalesce((SELECT m.industry FROM shared.api_usage_meters m
                     WHERE m.org_id = p_org LIMIT 1), 'hs');
  END IF;
  -- Ended subscriptions: their Stripe subscription id would lead back to the customer.
  UPDATE shared.subscriptions SET org_id = v_new, stripe_subscription_id = NULL
  WHERE org_id = p_org;
  GET DIAGNOSTICS v_count = ROW_COUNT;
  v_kept := v_kept || jsonb_build_object('subscriptions', v_count);
  UPDATE shared.invoices SET org_id = v_new WHERE org_id = p_org;
  GET DIAGNOSTICS v_count = ROW_COUNT;
  v_kept := v_kept || jsonb_build_object('invoices', v_count);
  UPDATE shared.invoice_lines SET org_id = v_new,
    description = replace(description, v_old, v_new::text)
  WHERE org_id = p_org;
  GET DIAGNOSTICS v_count = ROW_COUNT;
  v_kept := v_kept || jsonb_build_object('invoice_lines', v_count);
  UPDATE shared.payments SET org_id = v_new WHERE org_id = p_org;
  GET DIAGNOSTICS v_count = ROW_COUNT;
  v_kept := v_kept || jsonb_build_object('payments', v_count);
  UPDATE shared.api_usage_meters SET org_id = v_new WHERE org_id = p_org;
  GET DIAGNOSTICS v_count = ROW_COUNT;
  v_kept := v_kept || jsonb_build_object('usage_rows', v_count);
  UPDATE shared.usage_charges SET org_id = v_new WHERE org_id = p_org;
  GET DIAGNOSTICS v_count = ROW_COUNT;
  v_kept := v_kept || jsonb_build_object('usage_charges', v_count);
  UPDATE shared.usage_alerts SET org_id = v_new WHERE org_id = p_org;
  GET DIAGNOSTICS v_count = ROW_COUNT;
  v_kept := v_kept || jsonb_build_object('usage_alerts', v_count);
  -- Their reason texts name the org (checked_micros): the old id goes there too.
  UPDATE shared.billing_close_failures
  SET org_id = v_new, reason = replace(reason, v_old, v_new::text)
  WHERE org_id = p_org;
  GET DIAGNOSTICS v_count = ROW_COUNT;
  v_kept := v_kept || jsonb_build_object('billing_close_failures', v_count);
  DELETE FROM shared.organizations WHERE org_id = p_org;

  PERFORM shared.audit('org.erased', v_new, NULL,
                       jsonb_build_object('removed', v_removed, 'kept', v_kept));
  -- The pseudonym is not returned: the caller's terminal or logs would link it to the old id.
  RETURN jsonb_build_object('found', true, 'removed', v_removed, 'kept', v_kept);
END
$$;
