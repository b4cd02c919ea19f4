-- Subscriptions managed through functions (the HTTP API's and the back office's), each change
-- audited in its own transaction:
--   shared.create_subscription(org, plan, anchor, name, industry)   one live per org
--   shared.change_subscription_plan(org, plan)                      prices the whole period
--   shared.cancel_subscription(org, at_period_end)                  billed per the close rules
-- Each returns the subscription as JSON. Who may call: a trusted session for any org (the
-- daemon, acting for an API key it checked, names the key in app.actor), a tenant login for
-- its own org. Errors raise with a SQLSTATE the API maps to an HTTP status:
--   22023 (invalid_parameter_value) 400, message "<field>: <what is wrong>"
--   P0002 (no_data_found)           404, no live subscription
--   55000 (object_not_in_prerequisite_state) 409, a live one exists / it is canceled
-- Also: an org key may carry the admin scope (it manages its own org's subscription); an
-- admin key without an org still has exactly the admin scope.

ALTER TABLE shared.api_keys DROP CONSTRAINT api_keys_admin_shape;
ALTER TABLE shared.api_keys ADD CONSTRAINT api_keys_admin_shape CHECK (
  org_id IS NOT NULL OR scopes = ARRAY['admin']);

CREATE OR REPLACE FUNCTION shared.create_api_key(p_key_id text, p_org uuid, p_scopes text[],
                                                 p_label text, p_salt bytea, p_hash bytea)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_scopes text[];
BEGIN
  PERFORM shared.assert_data_protection_admin('create_api_key');
  IF p_key_id IS NULL OR p_key_id !~ '^[0-9a-f]{12}$' THEN
    RAISE EXCEPTION 'create_api_key: key id must be 12 lowercase hex characters, got %', p_key_id
      USING ERRCODE = '22023';
  END IF;
  IF p_scopes IS NULL OR cardinality(p_scopes) = 0
     OR NOT p_scopes <@ ARRAY['ingest', 'read', 'admin'] THEN
    RAISE EXCEPTION 'create_api_key: scopes must be a non-empty subset of {ingest,read,admin}, '
      'got %', p_scopes USING ERRCODE = '22023';
  END IF;
  v_scopes := ARRAY(SELECT s FROM unnest(ARRAY['ingest', 'read', 'admin']) WITH ORDINALITY
                      AS t (s, n)
                    WHERE s = ANY (p_scopes) ORDER BY n);
  IF p_org IS NULL AND v_scopes <> ARRAY['admin'] THEN
    RAISE EXCEPTION 'create_api_key: a key without an org is an admin key and has exactly the '
      'admin scope, got %', v_scopes USING ERRCODE = '22023';
  END IF;
  IF octet_length(p_salt) IS DISTINCT FROM 16 OR octet_length(p_hash) IS DISTINCT FROM 32 THEN
    RAISE EXCEPTION 'create_api_key: salt must be 16 bytes and hash 32 bytes'
      USING ERRCODE = '22023';
  END IF;
  INSERT INTO shared.api_keys (key_id, org_id, scopes, label, salt, secret_hash, created_by)
  VALUES (p_key_id, p_org, v_scopes, coalesce(p_label, ''), p_salt, p_hash,
          shared.audit_actor());
  PERFORM shared.audit('api_key.created', p_org, NULL,
                       jsonb_build_object('key_id', p_key_id, 'org_id', p_org,
                                          'scopes', to_jsonb(v_scopes),
                                          'label', coalesce(p_label, '')));
END
$$;

-- The subscription as the API shows it.
CREATE FUNCTION shared.subscription_json(p_sub shared.subscriptions)
RETURNS jsonb
LANGUAGE sql STABLE SET timezone = 'UTC' AS $$
  SELECT jsonb_build_object(
    'subscription_id', p_sub.subscription_id, 'org_id', p_sub.org_id, 'plan', p_sub.plan_id,
    'status', p_sub.status, 'billing_anchor', p_sub.billing_anchor,
    'current_period_start', p_sub.current_period_start,
    'current_period_end', p_sub.current_period_end, 'canceled_at', p_sub.canceled_at,
    'created_at', p_sub.created_at, 'updated_at', p_sub.updated_at)
$$;

-- The org's subscription that is not ended, locked; NULL if none.
CREATE FUNCTION shared.live_subscription_for_update(p_org uuid)
RETURNS shared.subscriptions
LANGUAGE sql VOLATILE AS $$
  SELECT s FROM shared.subscriptions s WHERE s.org_id = p_org AND s.status <> 'ended'
  FOR UPDATE
$$;

-- Starts a subscription on `p_plan` whose periods are anchored on `p_anchor` (a UTC day;
-- default today; at most 31 days back, at most a year ahead). An org not yet registered is
-- registered with `p_name` and `p_industry` (both required then).
CREATE FUNCTION shared.create_subscription(p_org uuid, p_plan text, p_anchor date DEFAULT NULL,
                                           p_name text DEFAULT NULL,
                                           p_industry text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET timezone = 'UTC' AS $$
DECLARE
  v_interval interval;
  v_anchor date := coalesce(p_anchor, current_date);
  v_sub shared.subscriptions;
  v_doc jsonb;
BEGIN
  PERFORM shared.assert_may_act_for(p_org);
  SELECT billing_interval INTO v_interval FROM shared.subscription_plans WHERE plan_id = p_plan;
  IF v_interval IS NULL THEN
    RAISE EXCEPTION 'plan: unknown plan %; one of: %', coalesce(p_plan, 'null'),
      (SELECT string_agg(plan_id, ', ' ORDER BY base_price_micros) FROM shared.subscription_plans)
      USING ERRCODE = '22023';
  END IF;
  IF v_anchor < current_date - 31 OR v_anchor > current_date + 366 THEN
    RAISE EXCEPTION 'billing_anchor: % is outside [today - 31 days, today + 1 year]', v_anchor
      USING ERRCODE = '22023';
  END IF;
  -- Serializes creations for one org (the unique index would too, with a less clear error).
  PERFORM pg_advisory_xact_lock(hashtextextended('subscription:' || p_org::text, 0));
  IF NOT EXISTS (SELECT 1 FROM shared.organizations WHERE org_id = p_org) THEN
    IF coalesce(p_name, '') = '' OR p_industry IS NULL THEN
      RAISE EXCEPTION 'name: org % is not registered; give its name and industry', p_org
        USING ERRCODE = '22023';
    END IF;
    IF p_industry NOT IN ('hs', 'rest', 'auto', 'ret', 'edu', 'payroll') THEN
      RAISE EXCEPTION 'industry: % is not one of hs, rest, auto, ret, edu, payroll', p_industry
        USING ERRCODE = '22023';
    END IF;
    INSERT INTO shared.organizations (org_id, name, industry) VALUES (p_org, p_name, p_industry);
  END IF;
  v_sub := shared.live_subscription_for_update(p_org);
  IF v_sub.subscription_id IS NOT NULL THEN
    RAISE EXCEPTION 'org % already has a live subscription (%, %)', p_org,
      v_sub.subscription_id, v_sub.status USING ERRCODE = '55000';
  END IF;
  INSERT INTO shared.subscriptions (org_id, plan_id, status, current_period_start,
                                    current_period_end, billing_anchor)
  VALUES (p_org, p_plan, 'active', v_anchor::timestamp AT TIME ZONE 'UTC',
          shared.period_boundary_after(v_anchor::timestamp AT TIME ZONE 'UTC', v_interval,
                                       v_anchor::timestamp AT TIME ZONE 'UTC'),
          v_anchor::timestamp AT TIME ZONE 'UTC')
  RETURNING * INTO v_sub;
  v_doc := shared.subscription_json(v_sub);
  PERFORM shared.audit('subscription.created', p_org, NULL, v_doc);
  PERFORM shared.refresh_usage_charges(ARRAY[p_org]);
  RETURN v_doc;
END
$$;

-- Moves the live subscription to `p_plan`. The plan at close prices the whole period (base
-- fee and quotas; no proration); charges and quota alerts follow at once. The same plan
-- again changes nothing and audits nothing.
CREATE FUNCTION shared.change_subscription_plan(p_org uuid, p_plan text)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET timezone = 'UTC' AS $$
DECLARE
  v_sub shared.subscriptions;
  v_before jsonb;
  v_doc jsonb;
BEGIN
  PERFORM shared.assert_may_act_for(p_org);
  IF NOT EXISTS (SELECT 1 FROM shared.subscription_plans WHERE plan_id = p_plan) THEN
    RAISE EXCEPTION 'plan: unknown plan %; one of: %', coalesce(p_plan, 'null'),
      (SELECT string_agg(plan_id, ', ' ORDER BY base_price_micros) FROM shared.subscription_plans)
      USING ERRCODE = '22023';
  END IF;
  v_sub := shared.live_subscription_for_update(p_org);
  IF v_sub.subscription_id IS NULL THEN
    RAISE EXCEPTION 'org % has no live subscription', p_org USING ERRCODE = 'P0002';
  END IF;
  IF v_sub.status = 'canceled' THEN
    RAISE EXCEPTION 'subscription % is canceled; start a new one once it has ended',
      v_sub.subscription_id USING ERRCODE = '55000';
  END IF;
  v_before := shared.subscription_json(v_sub);
  IF v_sub.plan_id = p_plan THEN
    RETURN v_before;
  END IF;
  UPDATE shared.subscriptions SET plan_id = p_plan, updated_at = now()
  WHERE subscription_id = v_sub.subscription_id
  RETURNING * INTO v_sub;
  v_doc := shared.subscription_json(v_sub);
  PERFORM shared.audit('subscription.plan_changed', p_org, v_before, v_doc);
  PERFORM shared.refresh_usage_charges(ARRAY[p_org]);
  RETURN v_doc;
END
$$;

-- Cancels the live subscription. Now: the current period is still invoiced at its end, full
-- base fee and usage up to and including today (the close rules), then it ends. At period
-- end: canceled_at is the period's last instant, so the whole period is invoiced, then it
-- ends. Canceling again only moves the cancel earlier; a later one changes nothing.
CREATE FUNCTION shared.cancel_subscription(p_org uuid, p_at_period_end boolean DEFAULT true)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET timezone = 'UTC' AS $$
DECLARE
  v_sub shared.subscriptions;
  v_at timestamptz;
  v_before jsonb;
  v_doc jsonb;
BEGIN
  PERFORM shared.assert_may_act_for(p_org);
  v_sub := shared.live_subscription_for_update(p_org);
  IF v_sub.subscription_id IS NULL THEN
    RAISE EXCEPTION 'org % has no live subscription', p_org USING ERRCODE = 'P0002';
  END IF;
  v_at := CASE WHEN coalesce(p_at_period_end, true)
               THEN v_sub.current_period_end - interval '1 microsecond'
               ELSE least(now(), v_sub.current_period_end - interval '1 microsecond') END;
  v_before := shared.subscription_json(v_sub);
  IF v_sub.status = 'canceled' AND v_sub.canceled_at <= v_at THEN
    RETURN v_before;
  END IF;
  UPDATE shared.subscriptions SET status = 'canceled', canceled_at = v_at, updated_at = now()
  WHERE subscription_id = v_sub.subscription_id
  RETURNING * INTO v_sub;
  v_doc := shared.subscription_json(v_sub);
  PERFORM shared.audit('subscription.canceled', p_org, v_before, v_doc);
  RETURN v_doc;
END
$$;

-- The live subscription (or the last ended one) as JSON; NULL if the org never had one.
CREATE FUNCTION shared.get_subscription(p_org uuid)
RETURNS jsonb
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET timezone = 'UTC' AS $$
DECLARE
  v_sub shared.subscriptions;
BEGIN
  PERFORM shared.assert_may_act_for(p_org);
  SELECT * INTO v_sub FROM shared.subscriptions s WHERE s.org_id = p_org
  ORDER BY (s.status <> 'ended') DESC, s.subscription_id DESC LIMIT 1;
  IF v_sub.subscription_id IS NULL THEN
    RETURN NULL;
  END IF;
  RETURN shared.subscription_json(v_sub);
END
$$;

REVOKE EXECUTE ON FUNCTION shared.live_subscription_for_update(uuid) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION shared.subscription_json(shared.subscriptions) FROM PUBLIC;
DO $$
DECLARE
  v_fn text;
BEGIN
  FOREACH v_fn IN ARRAY ARRAY['shared.create_subscription(uuid, text, date, text, text)',
                              'shared.change_subscription_plan(uuid, text)',
                              'shared.cancel_subscription(uuid, boolean)',
                              'shared.get_subscription(uuid)'] LOOP
    EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', v_fn);
    EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO meterd, meterd_admin, meterd_org', v_fn);
  END LOOP;
END
$$;
