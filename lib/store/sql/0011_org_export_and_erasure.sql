-- Data protection per organization (`meterd org export` / `meterd org erase`):
--   shared.export_org(org)  one JSON document of everything meterd holds about the org;
--   shared.erase_org(org)   removes or redacts its personal data and moves what financial
--                           records must keep (invoices, payments, usage quantities) to a new
--                           random pseudonymous org id, in one transaction, audited.
-- Both are for the back office only (meterd_admin or the schema's owner), never a tenant.

-- Raises 42501 unless this session may run data-protection operations.
CREATE FUNCTION shared.assert_data_protection_admin(p_what text)
RETURNS void
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF EXISTS (SELECT 1 FROM shared.org_logins l WHERE l.login = session_user)
     OR NOT (pg_has_role(session_user, 'meterd_admin', 'MEMBER')
             OR pg_has_role(session_user,
                            (SELECT n.nspowner FROM pg_namespace n WHERE n.nspname = 'shared'),
                            'MEMBER')) THEN
    RAISE EXCEPTION '%: login % lacks the meterd_admin role', p_what, session_user
      USING ERRCODE = '42501';
  END IF;
END
$$;

-- Keys whose values are personal data wherever they appear in stored JSON (audit rows,
-- webhook payloads).
CREATE FUNCTION shared.personal_json_keys()
RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
  SELECT ARRAY['name', 'email', 'phone', 'address', 'shipping', 'billing_details', 'last4',
               'brand', 'exp_month', 'exp_year', 'fingerprint', 'customer_email',
               'customer_name', 'customer_phone', 'customer_address', 'receipt_email',
               'description']
$$;

-- `p_doc` with every personal key's value nulled and `p_old` replaced by `p_new` in strings.
CREATE FUNCTION shared.redact_personal_json(p_doc jsonb, p_old text, p_new text)
RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
  SELECT CASE jsonb_typeof(p_doc)
    WHEN 'object' THEN
      (SELECT coalesce(jsonb_object_agg(e.key,
                 CASE WHEN e.key = ANY (shared.personal_json_keys()) THEN 'null'::jsonb
                      ELSE shared.redact_personal_json(e.value, p_old, p_new) END), '{}')
       FROM jsonb_each(p_doc) AS e)
    WHEN 'array' THEN
      (SELECT coalesce(jsonb_agg(shared.redact_personal_json(a.value, p_old, p_new)
                                 ORDER BY a.ordinality), '[]')
       FROM jsonb_array_elements(p_doc) WITH ORDINALITY AS a)
    WHEN 'string' THEN to_jsonb(replace(p_doc #>> '{}', p_old, p_new))
    ELSE p_doc END
$$;

-- Rejected events whose raw bytes name the org (its id, in any letter case).
CREATE FUNCTION shared.rejected_events_naming(p_org uuid)
RETURNS SETOF bigint
LANGUAGE sql STABLE AS $$
  SELECT r.id FROM shared.rejected_events r
  WHERE lower(encode(r.raw, 'escape')) LIKE '%' || p_org::text || '%'
$$;

-- Webhook events about the org: its id, or its Stripe customer's id, appears in the payload.
CREATE FUNCTION shared.webhook_events_naming(p_org uuid)
RETURNS SETOF text
LANGUAGE sql STABLE AS $$
  SELECT w.stripe_event_id FROM shared.stripe_webhook_events w
  WHERE w.payload::text LIKE '%' || p_org::text || '%'
     OR EXISTS (SELECT 1 FROM shared.stripe_customers c
                WHERE c.org_id = p_org AND w.payload::text LIKE '%' || c.stripe_customer_id || '%')
$$;

CREATE FUNCTION shared.export_org(p_org uuid)
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
                  WHERE a.org_id = p_org OR a.before::text LIKE '%' || p_org::text || '%'
                     OR a.after::text LIKE '%' || p_org::text || '%'),
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

-- Erases the org's personal data. Removed: its Stripe customer (email, customer id), payment
-- methods (brand, last4, expiry), request logs, tenant login bindings, the raw bytes and
-- detail of rejected events naming it, webhook payloads about it (replaced by a stub), and
-- personal keys in its audit rows. Kept under a new random org id (the pseudonym, recorded
-- nowhere next to the old id): the organization row (name replaced, industry and creation
-- time kept), subscriptions, invoices and their lines, payments (amount, status, Stripe
-- payment intent id), usage quantities, charges, alerts, close failures, audit rows.
-- Returns what it did; an org with nothing left under its id (never known, or erased
-- before) changes nothing and returns found = false.
CREATE FUNCTION shared.erase_org(p_org uuid)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET timezone = 'UTC' AS $$
DECLARE
  v_new uuid;
  v_old text := p_org::text;
  v_removed jsonb := '{}';
  v_kept jsonb := '{}';
  v_count bigint;
BEGIN
  PERFORM shared.assert_data_protection_admin('org erase');
  -- One eraser per org at a time; the org row (if any) locked against concurrent changes.
  PERFORM pg_advisory_xact_lock(hashtextextended('meterd.erase_org:' || v_old, 0));
  PERFORM 1 FROM shared.organizations WHERE org_id = p_org FOR UPDATE;

  -- Personal data that is not a financial record: removed (webhook payloads first: finding
  -- them needs the Stripe customer id).
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

  -- Nothing left under the old id (and nothing removed just now): never known or already
  -- erased. A no-op.
  IF NOT EXISTS (SELECT 1 FROM shared.organizations WHERE org_id = p_org)
     AND NOT EXISTS (SELECT 1 FROM shared.subscriptions WHERE org_id = p_org)
     AND NOT EXISTS (SELECT 1 FROM shared.invoices WHERE org_id = p_org)
     AND NOT EXISTS (SELECT 1 FROM shared.payments WHERE org_id = p_org)
     AND NOT EXISTS (SELECT 1 FROM shared.api_usage_meters WHERE org_id = p_org)
     AND NOT EXISTS (SELECT 1 FROM shared.usage_charges WHERE org_id = p_org)
     AND NOT EXISTS (SELECT 1 FROM shared.usage_alerts WHERE org_id = p_org)
     AND NOT EXISTS (SELECT 1 FROM shared.audit_log WHERE org_id = p_org)
     AND (SELECT bool_and(value::bigint = 0) FROM jsonb_each_text(v_removed)) THEN
    RETURN jsonb_build_object('found', false);
  END IF;

  -- Financial records: moved to the pseudonym. The new organization row first (the foreign
  -- keys of subscriptions point at it), the old one last.
  v_new := gen_random_uuid();
  INSERT INTO shared.organizations (org_id, name, industry, created_at)
  SELECT v_new, 'erased organization', o.industry, o.created_at
  FROM shared.organizations o WHERE o.org_id = p_org;
  IF NOT FOUND THEN
    -- Usage or invoices of an org never registered: keep them under a registered pseudonym.
    INSERT INTO shared.organizations (org_id, name, industry)
    SELECT v_new, 'erased organization',
           coalesce((SELECT m.industry FROM shared.api_usage_meters m
                     WHERE m.org_id = p_org LIMIT 1), 'hs');
  END IF;
  UPDATE shared.subscriptions SET org_id = v_new WHERE org_id = p_org;
  GET DIAGNOSTICS v_count = ROW_COUNT;
  v_kept := v_kept || jsonb_build_object('subscriptions', v_count);
  UPDATE shared.invoices SET org_id = v_new WHERE org_id = p_org;
  GET DIAGNOSTICS v_count = ROW_COUNT;
  v_kept := v_kept || jsonb_build_object('invoices', v_count);
  UPDATE shared.invoice_lines SET org_id = v_new WHERE org_id = p_org;
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
  UPDATE shared.billing_close_failures SET org_id = v_new WHERE org_id = p_org;
  GET DIAGNOSTICS v_count = ROW_COUNT;
  v_kept := v_kept || jsonb_build_object('billing_close_failures', v_count);
  UPDATE shared.audit_log a
  SET org_id = CASE WHEN a.org_id = p_org THEN v_new ELSE a.org_id END,
      before = shared.redact_personal_json(a.before, v_old, v_new::text),
      after = shared.redact_personal_json(a.after, v_old, v_new::text)
  WHERE a.org_id = p_org OR a.before::text LIKE '%' || v_old || '%'
     OR a.after::text LIKE '%' || v_old || '%';
  GET DIAGNOSTICS v_count = ROW_COUNT;
  v_kept := v_kept || jsonb_build_object('audit_rows', v_count);
  DELETE FROM shared.organizations WHERE org_id = p_org;

  PERFORM shared.audit('org.erased', v_new, NULL,
                       jsonb_build_object('removed', v_removed, 'kept', v_kept));
  -- The pseudonym is not returned: the caller's terminal or logs would link it to the old id.
  RETURN jsonb_build_object('found', true, 'removed', v_removed, 'kept', v_kept);
END
$$;

REVOKE EXECUTE ON FUNCTION shared.export_org(uuid), shared.erase_org(uuid),
  shared.assert_data_protection_admin(text) FROM PUBLIC;
-- Granted to meterd's roles so that a tenant or the daemon gets the function's own clear
-- refusal (assert_data_protection_admin) rather than a bare "permission denied".
GRANT EXECUTE ON FUNCTION shared.export_org(uuid), shared.erase_org(uuid)
  TO meterd_admin, meterd, meterd_org;
