-- Billing that no time zone, tenant, outlier or stuck period can make wrong or block.
--
-- 1. Every billing function computes in UTC (SET timezone = 'UTC'), whatever the server's or
--    the session's zone, and a subscription keeps its billing anchor: periods end on the
--    anchor's day of the month, or the month's last day when it is shorter (Jan 31 -> Feb 28
--    -> Mar 31), as Stripe's billing_cycle_anchor does.
-- 2. Tenants read, never write. The org a tenant session acts for comes from its login
--    (shared.org_logins), never from a setting it can change; app.org_id is honoured only for
--    trusted sessions (logins that are members of meterd or meterd_admin: the daemon, the
--    HTTP API after it checked an API key, the back office). Usage writes go through
--    SECURITY DEFINER functions that check the caller may act for the org.
-- 3. A close isolates failures: a subscription whose invoice cannot be computed (an amount
--    beyond int64 micros, a stuck period, anything) is recorded in
--    shared.billing_close_failures with the reason and skipped; every other one is invoiced.
-- 4. Late usage: the look-back follows the ingest late window (shared.billing_settings), and
--    an org whose subscription ended gets a final adjustment invoice.
-- 5. Quota alerts are per quota in force (a plan change raises them again for the new quota),
--    and their notifications carry the alert's id so a listener can check them.

-- ---- Settings ----

CREATE TABLE shared.billing_settings (
  singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
  -- How old an event may be when it is accepted; `meterd run` raises it to its --late-window.
  -- The close looks this far back for late usage of already invoiced periods.
  late_window interval NOT NULL DEFAULT interval '62 days' CHECK (late_window >= interval '0')
);
INSERT INTO shared.billing_settings DEFAULT VALUES;

-- Raises the recorded late window to at least `p_window` (never lowers it: another instance
-- may still accept older events). Returns the window in force.
CREATE FUNCTION shared.note_late_window(p_window interval)
RETURNS interval
LANGUAGE sql VOLATILE AS $$
  UPDATE shared.billing_settings SET late_window = greatest(late_window, p_window)
  RETURNING late_window
$$;

-- First UTC day whose usage may still be billed as late usage when closing at `p_ref`.
CREATE FUNCTION shared.late_usage_since(p_ref timestamptz)
RETURNS date
LANGUAGE sql STABLE SET timezone = 'UTC' AS $$
  SELECT ((p_ref AT TIME ZONE 'UTC') - s.late_window - interval '1 day')::date
  FROM shared.billing_settings s
$$;

-- ---- 1. UTC, anchored periods ----

ALTER TABLE shared.subscriptions ADD COLUMN billing_anchor timestamptz;
UPDATE shared.subscriptions SET billing_anchor = current_period_start;
ALTER TABLE shared.subscriptions ALTER COLUMN billing_anchor SET NOT NULL;

-- A subscription created without an anchor is anchored on its first period's start.
CREATE FUNCTION shared.default_billing_anchor()
RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  NEW.billing_anchor := coalesce(NEW.billing_anchor, NEW.current_period_start);
  RETURN NEW;
END
$$;
CREATE TRIGGER subscriptions_default_anchor BEFORE INSERT ON shared.subscriptions
  FOR EACH ROW EXECUTE FUNCTION shared.default_billing_anchor();

-- The first period boundary strictly after `p_after`: anchor + k intervals, k >= 0, computed
-- on UTC wall time from the anchor itself (never from the previous boundary, so a clamped
-- Feb 28 does not drag later months to the 28th).
CREATE FUNCTION shared.period_boundary_after(p_anchor timestamptz, p_interval interval,
                                             p_after timestamptz)
RETURNS timestamptz
LANGUAGE plpgsql IMMUTABLE SET timezone = 'UTC' AS $$
DECLARE
  v_anchor timestamp := p_anchor AT TIME ZONE 'UTC';
  v_after timestamp := p_after AT TIME ZONE 'UTC';
  -- Interval length in days (a month counts 30): only a first guess for k.
  v_step double precision := greatest(extract(epoch FROM p_interval) / 86400, 1);
  v_k bigint := greatest(floor(extract(epoch FROM v_after - v_anchor) / 86400 / v_step), 0);
BEGIN
  IF p_interval <= interval '0' THEN
    RAISE EXCEPTION 'billing interval must be positive, got %', p_interval USING ERRCODE = '22023';
  END IF;
  WHILE v_anchor + v_k * p_interval <= v_after LOOP
    v_k := v_k + 1;
  END LOOP;
  WHILE v_k > 0 AND v_anchor + (v_k - 1) * p_interval > v_after LOOP
    v_k := v_k - 1;
  END LOOP;
  RETURN (v_anchor + v_k * p_interval) AT TIME ZONE 'UTC';
END
$$;

-- Money that does not fit int64 micros fails loudly, naming the org and meter, instead of a
-- bare "bigint out of range" (the close records it against that org alone).
CREATE FUNCTION shared.checked_micros(p_amount numeric, p_org uuid, p_meter text)
RETURNS bigint
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
  IF p_amount > 9223372036854775807 OR p_amount < -9223372036854775808 THEN
    RAISE EXCEPTION 'org % meter %: amount of % micros does not fit int64 micros', p_org,
      p_meter, p_amount USING ERRCODE = '22003';
  END IF;
  RETURN p_amount::bigint;
END
$$;

CREATE OR REPLACE FUNCTION shared.charges_for_period(p_org uuid, p_plan text, p_start timestamptz,
                                                     p_end timestamptz,
                                                     p_usage_end date DEFAULT NULL)
RETURNS TABLE (meter text, quantity bigint, included_quantity bigint, billable_quantity bigint,
               unit_price_micros bigint, amount_micros bigint)
LANGUAGE sql STABLE SET timezone = 'UTC' AS $$
  SELECT pp.meter, u.quantity, pp.included_quantity,
         greatest(u.quantity - pp.included_quantity, 0),
         pp.unit_price_micros,
         shared.checked_micros(greatest(u.quantity - pp.included_quantity, 0)::numeric
                                 * pp.unit_price_micros, p_org, pp.meter)
  FROM shared.plan_prices pp
  CROSS JOIN LATERAL (
    SELECT coalesce(sum(m.quantity), 0)::bigint AS quantity
    FROM shared.api_usage_meters m
    WHERE m.org_id = p_org AND m.meter = pp.meter
      AND m.usage_date >= (p_start AT TIME ZONE 'UTC')::date
      AND m.usage_date < least((p_end AT TIME ZONE 'UTC')::date, coalesce(p_usage_end, 'infinity'))
  ) u
  WHERE pp.plan_id = p_plan
$$;

ALTER FUNCTION shared.current_billing_period(uuid[], timestamptz) SET timezone = 'UTC';
ALTER FUNCTION shared.current_period_charges(uuid[], timestamptz) SET timezone = 'UTC';
ALTER FUNCTION shared.calculate_api_overage(uuid, timestamptz) SET timezone = 'UTC';

CREATE OR REPLACE FUNCTION shared.get_billing_status(p_org uuid)
RETURNS jsonb
LANGUAGE sql STABLE SET timezone = 'UTC' AS $$
  WITH period AS (SELECT * FROM shared.current_billing_period(ARRAY[p_org])),
  charges AS (SELECT * FROM shared.current_period_charges(ARRAY[p_org])),
  days AS (
    SELECT greatest((p.period_end AT TIME ZONE 'UTC')::date
                    - (p.period_start AT TIME ZONE 'UTC')::date, 1) AS total,
           least(greatest((now() AT TIME ZONE 'UTC')::date
                          - (p.period_start AT TIME ZONE 'UTC')::date + 1, 1),
                 greatest((p.period_end AT TIME ZONE 'UTC')::date
                          - (p.period_start AT TIME ZONE 'UTC')::date, 1)) AS elapsed
    FROM period p
  ),
  projected AS (
    -- numeric: a projection may exceed int64 micros; it is information, not an invoice.
    SELECT sum(greatest(c.quantity::numeric * d.total / d.elapsed - c.included_quantity, 0)
               * c.unit_price_micros)::numeric(40, 0) AS usage_micros
    FROM charges c CROSS JOIN days d
  )
  SELECT jsonb_build_object(
    'org_id', p.org_id,
    'subscribed', p.subscription_id IS NOT NULL,
    'status', coalesce(p.status, 'none'),
    'plan', p.plan_id,
    'currency', sp.currency,
    'period', jsonb_build_object('start', p.period_start, 'end', p.period_end,
                                 'days', d.total, 'days_elapsed', d.elapsed),
    'base_fee_micros', sp.base_price_micros,
    'meters', (SELECT jsonb_agg(jsonb_build_object(
                 'meter', c.meter, 'usage', c.quantity, 'included', c.included_quantity,
                 'overage', c.billable_quantity, 'unit_price_micros', c.unit_price_micros,
                 'charge_micros', c.amount_micros) ORDER BY c.meter) FROM charges c),
    'usage_charges_micros', (SELECT coalesce(sum(amount_micros), 0) FROM charges),
    'charges_so_far_micros', sp.base_price_micros
                             + (SELECT coalesce(sum(amount_micros), 0) FROM charges),
    'projected_total_micros', sp.base_price_micros + coalesce(pr.usage_micros, 0),
    'alerts', coalesce((SELECT jsonb_agg(jsonb_build_object(
                 'meter', a.meter, 'threshold_percent', a.threshold_percent,
                 'quantity', a.quantity, 'included', a.included_quantity,
                 'raised_at', a.created_at)
                 ORDER BY a.included_quantity, a.threshold_percent)
               FROM shared.usage_alerts a
               WHERE a.org_id = p.org_id AND a.period_start = p.period_start), '[]'::jsonb))
  FROM period p
  JOIN shared.subscription_plans sp ON sp.plan_id = p.plan_id
  CROSS JOIN days d CROSS JOIN projected pr
$$;

-- ---- 5. Alerts per quota in force, notifications that name their row ----

ALTER TABLE shared.usage_alerts
  DROP CONSTRAINT usage_alerts_org_id_period_start_meter_threshold_percent_key;
ALTER TABLE shared.usage_alerts ADD CONSTRAINT usage_alerts_once_per_quota
  UNIQUE (org_id, period_start, meter, included_quantity, threshold_percent);

CREATE OR REPLACE FUNCTION shared.refresh_usage_charges(p_orgs uuid[])
RETURNS integer
LANGUAGE sql VOLATILE SET timezone = 'UTC' AS $$
  WITH charges AS (
    SELECT * FROM shared.current_period_charges(p_orgs) WHERE subscription_id IS NOT NULL
  ),
  upserted AS (
    INSERT INTO shared.usage_charges AS u (org_id, period_start, period_end, plan_id, meter,
      quantity, included_quantity, billable_quantity, unit_price_micros, amount_micros)
    SELECT org_id, period_start, period_end, plan_id, meter, quantity, included_quantity,
           billable_quantity, unit_price_micros, amount_micros
    FROM charges ORDER BY org_id, meter
    ON CONFLICT (org_id, period_start, meter) DO UPDATE SET
      period_end = EXCLUDED.period_end, plan_id = EXCLUDED.plan_id,
      quantity = EXCLUDED.quantity, included_quantity = EXCLUDED.included_quantity,
      billable_quantity = EXCLUDED.billable_quantity,
      unit_price_micros = EXCLUDED.unit_price_micros, amount_micros = EXCLUDED.amount_micros,
      updated_at = now()
    WHERE (u.quantity, u.plan_id, u.amount_micros)
          IS DISTINCT FROM (EXCLUDED.quantity, EXCLUDED.plan_id, EXCLUDED.amount_micros)
  ),
  raised AS (
    INSERT INTO shared.usage_alerts (org_id, period_start, meter, threshold_percent, quantity,
                                     included_quantity)
    SELECT c.org_id, c.period_start, c.meter, t.percent, c.quantity, c.included_quantity
    FROM charges c CROSS JOIN (VALUES (80), (100)) AS t (percent)
    WHERE c.meter = 'api_calls' AND c.included_quantity > 0
      AND c.quantity::numeric * 100 >= c.included_quantity::numeric * t.percent
    ORDER BY c.org_id, t.percent
    ON CONFLICT (org_id, period_start, meter, included_quantity, threshold_percent) DO NOTHING
    RETURNING *
  )
  SELECT count(pg_notify('meterd_usage_alerts', json_build_object(
           'alert_id', alert_id, 'org_id', org_id, 'meter', meter,
           'threshold_percent', threshold_percent, 'quantity', quantity,
           'included_quantity', included_quantity, 'period_start', period_start)::text))::integer
  FROM raised
$$;

-- ---- 2. Tenants read, never write ----

-- Login roles of tenants with their own SQL access, each bound to one org. Only the back
-- office writes it; tenants cannot read it.
CREATE TABLE shared.org_logins (
  login name PRIMARY KEY,
  org_id uuid NOT NULL REFERENCES shared.organizations (org_id),
  created_at timestamptz NOT NULL DEFAULT now()
);

-- Is this session's login trusted to act for any org (the daemon, the HTTP API, the back
-- office)? session_user, not current_user: SET ROLE cannot change it, and a tenant login
-- cannot SET SESSION AUTHORIZATION.
CREATE FUNCTION shared.session_is_trusted()
RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  SELECT NOT EXISTS (SELECT 1 FROM shared.org_logins l WHERE l.login = session_user)
         AND (pg_has_role(session_user, 'meterd', 'MEMBER')
              OR pg_has_role(session_user, 'meterd_admin', 'MEMBER'))
$$;

-- The org this session acts for: the org its login is bound to; for a trusted session, the
-- org it chose with app.org_id (after checking an API key); otherwise none.
CREATE OR REPLACE FUNCTION shared.current_org_id()
RETURNS uuid
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  SELECT coalesce(
    (SELECT l.org_id FROM shared.org_logins l WHERE l.login = session_user),
    CASE WHEN shared.session_is_trusted()
         THEN nullif(current_setting('app.org_id', true), '')::uuid END)
$$;

-- May this session record usage for `p_org`? Trusted sessions for any org, a tenant for its own.
CREATE FUNCTION shared.assert_may_act_for(p_org uuid)
RETURNS void
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF shared.session_is_trusted() THEN
    RETURN;
  END IF;
  IF p_org IS NULL OR p_org IS DISTINCT FROM shared.current_org_id() THEN
    RAISE EXCEPTION 'login % may not act for org %', session_user, p_org
      USING ERRCODE = '42501';
  END IF;
END
$$;

-- Tenant policies: read-only, org from the function above (evaluated once per statement).
DO $$
DECLARE
  v_table text;
BEGIN
  FOREACH v_table IN ARRAY ARRAY['organizations', 'stripe_customers', 'subscriptions',
      'api_usage_meters', 'api_usage_logs', 'payment_methods', 'invoices', 'invoice_lines',
      'payments', 'usage_charges', 'usage_alerts'] LOOP
    EXECUTE format('DROP POLICY org_isolation ON shared.%I', v_table);
    EXECUTE format('CREATE POLICY org_read ON shared.%I FOR SELECT TO meterd_org '
                   'USING (org_id = (SELECT shared.current_org_id()))', v_table);
  END LOOP;
END
$$;

REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON ALL TABLES IN SCHEMA shared FROM meterd_org;
REVOKE USAGE ON ALL SEQUENCES IN SCHEMA shared FROM meterd_org;

-- The direct usage path, now checked: SECURITY DEFINER with a pinned search_path.
CREATE OR REPLACE FUNCTION shared.increment_api_usage(p_org uuid, p_meter text,
                                                      p_quantity bigint DEFAULT 1,
                                                      p_industry text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET timezone = 'UTC' AS $$
DECLARE
  v_industry text;
  v_total bigint;
BEGIN
  PERFORM shared.assert_may_act_for(p_org);
  v_industry := coalesce(p_industry,
                         (SELECT industry FROM shared.organizations WHERE org_id = p_org));
  IF p_quantity IS NULL OR p_quantity < 0 THEN
    RAISE EXCEPTION 'increment_api_usage: quantity must be a non-negative integer, got %', p_quantity
      USING ERRCODE = '22023';
  END IF;
  IF NOT EXISTS (SELECT 1 FROM shared.meters WHERE name = p_meter) THEN
    RAISE EXCEPTION 'increment_api_usage: unknown meter %', p_meter USING ERRCODE = '22023';
  END IF;
  IF v_industry IS NULL THEN
    RAISE EXCEPTION 'increment_api_usage: industry not given and org % has none', p_org
      USING ERRCODE = '22023';
  END IF;
  INSERT INTO shared.api_usage_meters AS m (org_id, meter, industry, usage_date, quantity)
  VALUES (p_org, p_meter, v_industry, (now() AT TIME ZONE 'UTC')::date, p_quantity)
  ON CONFLICT (org_id, meter, industry, usage_date) DO UPDATE
    SET quantity = m.quantity + EXCLUDED.quantity, updated_at = now()
  RETURNING quantity INTO v_total;
  PERFORM shared.refresh_usage_charges(ARRAY[p_org]);
  RETURN v_total;
END
$$;

CREATE OR REPLACE FUNCTION shared.track_api_request(p_org uuid, p_endpoint text, p_method text,
                                                    p_status_code integer, p_response_ms integer,
                                                    p_meter text DEFAULT 'api_calls',
                                                    p_quantity bigint DEFAULT 1,
                                                    p_industry text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET timezone = 'UTC' AS $$
DECLARE
  v_industry text;
BEGIN
  PERFORM shared.assert_may_act_for(p_org);
  v_industry := coalesce(p_industry,
                         (SELECT industry FROM shared.organizations WHERE org_id = p_org));
  INSERT INTO shared.api_usage_logs (org_id, meter, industry, endpoint, method, status_code,
                                     response_ms, quantity)
  VALUES (p_org, p_meter, v_industry, p_endpoint, p_method, p_status_code, p_response_ms,
          p_quantity);
  RETURN shared.increment_api_usage(p_org, p_meter, p_quantity, v_industry);
END
$$;

-- Functions that write billing state run only for the owner roles (not tenants, not PUBLIC).
REVOKE EXECUTE ON FUNCTION shared.refresh_usage_charges(uuid[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION shared.refresh_usage_charges(uuid[]) TO meterd, meterd_admin;
REVOKE EXECUTE ON FUNCTION shared.note_late_window(interval) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION shared.note_late_window(interval) TO meterd, meterd_admin;

-- ---- 3. The close, with failures isolated per subscription ----

CREATE TABLE shared.billing_close_failures (
  subscription_id bigint NOT NULL REFERENCES shared.subscriptions (subscription_id),
  period_start timestamptz NOT NULL,
  org_id uuid NOT NULL,
  period_end timestamptz NOT NULL,
  reason text NOT NULL,
  sqlstate text NOT NULL,
  first_failed_at timestamptz NOT NULL DEFAULT now(),
  last_failed_at timestamptz NOT NULL DEFAULT now(),
  attempts integer NOT NULL DEFAULT 1,
  resolved_at timestamptz,  -- Set by the close that finally invoiced the period.
  PRIMARY KEY (subscription_id, period_start)
);
CREATE INDEX billing_close_failures_open_idx ON shared.billing_close_failures (last_failed_at)
  WHERE resolved_at IS NULL;

-- adjustment: a final invoice of late usage for an org whose subscription has ended.
ALTER TABLE shared.invoices ADD COLUMN kind text NOT NULL DEFAULT 'period'
  CHECK (kind IN ('period', 'adjustment'));

-- Usage stored now for the org's earlier invoiced periods (those ending on or after
-- `p_since`, other than `p_invoice`'s own) that differs from what invoices billed so far.
CREATE FUNCTION shared.unbilled_late_usage(p_org uuid, p_since date, p_invoice bigint)
RETURNS TABLE (meter text, usage_period_start date, usage_period_end date,
               billed_quantity bigint, stored_quantity bigint, included_quantity bigint,
               unit_price_micros bigint)
LANGUAGE sql STABLE SET timezone = 'UTC' AS $$
  WITH billed AS (
    SELECT l.meter, l.usage_period_start, l.usage_period_end,
           sum(l.quantity)::bigint AS quantity,
           max(l.included_quantity) AS included_quantity,
           max(l.unit_price_micros) AS unit_price_micros
    FROM shared.invoice_lines l
    WHERE l.org_id = p_org AND l.invoice_id IS DISTINCT FROM p_invoice
      AND l.kind IN ('usage', 'adjustment') AND l.usage_period_end >= p_since
    GROUP BY l.meter, l.usage_period_start, l.usage_period_end
  )
  SELECT b.meter, b.usage_period_start, b.usage_period_end, b.quantity, s.quantity,
         b.included_quantity, b.unit_price_micros
  FROM billed b
  CROSS JOIN LATERAL (
    SELECT coalesce(sum(m.quantity), 0)::bigint AS quantity FROM shared.api_usage_meters m
    WHERE m.org_id = p_org AND m.meter = b.meter
      AND m.usage_date >= b.usage_period_start AND m.usage_date < b.usage_period_end) s
  WHERE s.quantity <> b.quantity
$$;

-- Lines, for each invoice in the session's closing_invoices table, that bill the late usage
-- `unbilled_late_usage` finds, at the price and quota of the period it belongs to.
-- plpgsql: the temp table exists only while a close runs, so the body is resolved at call time.
CREATE FUNCTION shared.insert_late_usage_lines()
RETURNS void
LANGUAGE plpgsql VOLATILE SET timezone = 'UTC' AS $$
BEGIN
  INSERT INTO shared.invoice_lines (invoice_id, org_id, kind, meter, usage_period_start,
                                    usage_period_end, quantity, included_quantity,
                                    billable_quantity, unit_price_micros, amount_micros,
                                    description)
  SELECT ci.invoice_id, ci.org_id, 'adjustment', u.meter, u.usage_period_start,
         u.usage_period_end, u.stored_quantity - u.billed_quantity, u.included_quantity,
         greatest(u.stored_quantity - u.included_quantity, 0)
           - greatest(u.billed_quantity - u.included_quantity, 0),
         u.unit_price_micros,
         shared.checked_micros((greatest(u.stored_quantity - u.included_quantity, 0)
                                  - greatest(u.billed_quantity - u.included_quantity, 0))::numeric
                                 * u.unit_price_micros, ci.org_id, u.meter),
         format('late %s usage for %s to %s: %s more', u.meter, u.usage_period_start,
                u.usage_period_end, u.stored_quantity - u.billed_quantity)
  FROM pg_temp.closing_invoices ci
  CROSS JOIN LATERAL shared.unbilled_late_usage(
    ci.org_id, shared.late_usage_since(ci.period_start), ci.invoice_id) u;
END
$$;

CREATE FUNCTION shared.create_closing_invoices_table()
RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
  CREATE TEMP TABLE IF NOT EXISTS closing_invoices (
    invoice_id bigint, org_id uuid, subscription_id bigint, plan_id text,
    period_start timestamptz, period_end timestamptz, usage_end date, was_canceled boolean
  ) ON COMMIT DROP;
  TRUNCATE closing_invoices;
END
$$;

-- Closes the current period of each given subscription (all due by p_as_of) into an invoice
-- and advances it to the next anchored period (or ends a canceled one). Set-based; raises if
-- any of them cannot be invoiced, so the caller can retry them one by one. Returns the
-- number of invoices created.
CREATE FUNCTION shared.close_due_periods(p_subscriptions bigint[], p_as_of timestamptz)
RETURNS integer
LANGUAGE plpgsql VOLATILE SET timezone = 'UTC' AS $$
DECLARE
  v_created integer;
  v_stuck record;
BEGIN
  PERFORM shared.create_closing_invoices_table();
  -- A period that already has an invoice would never advance: say so instead.
  SELECT s.subscription_id, s.org_id, s.current_period_start INTO v_stuck
  FROM shared.subscriptions s
  JOIN shared.invoices i ON i.subscription_id = s.subscription_id
                        AND i.period_start = s.current_period_start
  WHERE s.subscription_id = ANY (p_subscriptions)
  LIMIT 1;
  IF FOUND THEN
    RAISE EXCEPTION 'org % subscription %: an invoice already exists for the period starting %; '
      'the subscription cannot advance (void or move that invoice, or fix the period)',
      v_stuck.org_id, v_stuck.subscription_id, v_stuck.current_period_start
      USING ERRCODE = '23505';
  END IF;

  WITH due AS (
    SELECT s.* FROM shared.subscriptions s
    WHERE s.subscription_id = ANY (p_subscriptions) AND s.status <> 'ended'
      AND s.current_period_end <= p_as_of
    ORDER BY s.subscription_id
    FOR UPDATE
  ),
  created AS (
    INSERT INTO shared.invoices (org_id, subscription_id, plan_id, period_start, period_end,
                                 currency)
    SELECT d.org_id, d.subscription_id, d.plan_id, d.current_period_start,
           d.current_period_end, sp.currency
    FROM due d JOIN shared.subscription_plans sp ON sp.plan_id = d.plan_id
    RETURNING invoice_id, org_id, subscription_id, plan_id, period_start, period_end
  )
  INSERT INTO closing_invoices
  SELECT c.invoice_id, c.org_id, c.subscription_id, c.plan_id, c.period_start, c.period_end,
         least((c.period_end AT TIME ZONE 'UTC')::date,
               (d.canceled_at AT TIME ZONE 'UTC')::date + 1),
         d.status = 'canceled'
  FROM created c JOIN due d ON d.subscription_id = c.subscription_id;
  GET DIAGNOSTICS v_created = ROW_COUNT;
  IF v_created = 0 THEN
    RETURN 0;
  END IF;

  INSERT INTO shared.invoice_lines (invoice_id, org_id, kind, usage_period_start,
                                    usage_period_end, quantity, amount_micros, description)
  SELECT ci.invoice_id, ci.org_id, 'base_fee', (ci.period_start AT TIME ZONE 'UTC')::date,
         (ci.period_end AT TIME ZONE 'UTC')::date, 1, sp.base_price_micros, sp.name || ' plan'
  FROM closing_invoices ci JOIN shared.subscription_plans sp ON sp.plan_id = ci.plan_id;

  INSERT INTO shared.invoice_lines (invoice_id, org_id, kind, meter, usage_period_start,
                                    usage_period_end, quantity, included_quantity,
                                    billable_quantity, unit_price_micros, amount_micros,
                                    description)
  SELECT ci.invoice_id, ci.org_id, 'usage', c.meter, (ci.period_start AT TIME ZONE 'UTC')::date,
         ci.usage_end, c.quantity, c.included_quantity, c.billable_quantity,
         c.unit_price_micros, c.amount_micros,
         format('%s: %s used, %s included, %s billable', c.meter, c.quantity,
                c.included_quantity, c.billable_quantity)
  FROM closing_invoices ci
  CROSS JOIN LATERAL shared.charges_for_period(ci.org_id, ci.plan_id, ci.period_start,
                                               ci.period_end, ci.usage_end) c;

  PERFORM shared.insert_late_usage_lines();

  UPDATE shared.invoices i
  SET total_micros = (SELECT shared.checked_micros(sum(l.amount_micros), i.org_id, 'total')
                      FROM shared.invoice_lines l WHERE l.invoice_id = i.invoice_id)
  FROM closing_invoices ci WHERE i.invoice_id = ci.invoice_id;

  UPDATE shared.subscriptions s
  SET current_period_start = CASE WHEN ci.was_canceled THEN s.current_period_start
                                  ELSE s.current_period_end END,
      current_period_end = CASE WHEN ci.was_canceled THEN s.current_period_end
                                ELSE shared.period_boundary_after(s.billing_anchor,
                                       sp.billing_interval, s.current_period_end) END,
      status = CASE WHEN ci.was_canceled THEN 'ended' ELSE s.status END,
      updated_at = now()
  FROM closing_invoices ci JOIN shared.subscription_plans sp ON sp.plan_id = ci.plan_id
  WHERE s.subscription_id = ci.subscription_id;

  UPDATE shared.billing_close_failures f SET resolved_at = now()
  FROM closing_invoices ci
  WHERE f.subscription_id = ci.subscription_id AND f.period_start = ci.period_start
    AND f.resolved_at IS NULL;
  RETURN v_created;
END
$$;

-- Final adjustment invoices: late usage of an org whose subscription has ended and that has
-- no live subscription whose next invoice would carry it. Returns the number created.
CREATE FUNCTION shared.close_ended_late_usage(p_as_of timestamptz)
RETURNS integer
LANGUAGE plpgsql VOLATILE SET timezone = 'UTC' AS $$
DECLARE
  v_created integer;
BEGIN
  PERFORM shared.create_closing_invoices_table();
  WITH last_ended AS (
    SELECT DISTINCT ON (s.org_id) s.*
    FROM shared.subscriptions s
    WHERE s.status = 'ended'
      AND s.current_period_end >= shared.late_usage_since(p_as_of)
      AND NOT EXISTS (SELECT 1 FROM shared.subscriptions live
                      WHERE live.org_id = s.org_id AND live.status <> 'ended')
      AND EXISTS (SELECT 1 FROM shared.unbilled_late_usage(
                    s.org_id, shared.late_usage_since(p_as_of), NULL))
    ORDER BY s.org_id, s.current_period_end DESC
  ),
  created AS (
    INSERT INTO shared.invoices (org_id, subscription_id, plan_id, period_start, period_end,
                                 currency, kind)
    SELECT e.org_id, e.subscription_id, e.plan_id, p_as_of, p_as_of, sp.currency, 'adjustment'
    FROM last_ended e JOIN shared.subscription_plans sp ON sp.plan_id = e.plan_id
    ON CONFLICT (subscription_id, period_start) DO NOTHING
    RETURNING invoice_id, org_id, subscription_id, plan_id, period_start, period_end
  )
  INSERT INTO closing_invoices
  SELECT invoice_id, org_id, subscription_id, plan_id, period_start, period_end, NULL, false
  FROM created;
  GET DIAGNOSTICS v_created = ROW_COUNT;
  IF v_created = 0 THEN
    RETURN 0;
  END IF;
  PERFORM shared.insert_late_usage_lines();
  UPDATE shared.invoices i
  SET total_micros = (SELECT coalesce(shared.checked_micros(sum(l.amount_micros), i.org_id,
                                                            'total'), 0)
                      FROM shared.invoice_lines l WHERE l.invoice_id = i.invoice_id)
  FROM closing_invoices ci WHERE i.invoice_id = ci.invoice_id;
  RETURN v_created;
END
$$;

-- Closes every subscription period that ended by p_as_of, catching up missed months, then
-- bills late usage of ended subscriptions. A subscription that cannot be invoiced is recorded
-- in shared.billing_close_failures and skipped for this run; the others are invoiced in the
-- same transaction. Idempotent. Returns the number of invoices created.
CREATE OR REPLACE FUNCTION shared.reset_monthly_usage(p_as_of timestamptz DEFAULT now())
RETURNS integer
LANGUAGE plpgsql VOLATILE SET timezone = 'UTC' AS $$
DECLARE
  v_created integer := 0;
  v_due bigint[];
  v_failed bigint[] := '{}';
  v_id bigint;
  v_reason text;
  v_state text;
BEGIN
  -- One close at a time; a second cron run waits, then finds nothing due.
  PERFORM pg_advisory_xact_lock(7308604897068083202);
  LOOP
    SELECT array_agg(s.subscription_id ORDER BY s.subscription_id) INTO v_due
    FROM shared.subscriptions s
    WHERE s.status <> 'ended' AND s.current_period_end <= p_as_of
      AND s.subscription_id <> ALL (v_failed);
    EXIT WHEN v_due IS NULL;
    BEGIN
      -- The common case: every due subscription in one set-based pass.
      v_created := v_created + shared.close_due_periods(v_due, p_as_of);
    EXCEPTION WHEN OTHERS THEN
      -- Something in the batch cannot be invoiced: close them one at a time, so only the
      -- culprits are skipped (each in its own subtransaction).
      FOREACH v_id IN ARRAY v_due LOOP
        BEGIN
          v_created := v_created + shared.close_due_periods(ARRAY[v_id], p_as_of);
        EXCEPTION WHEN OTHERS THEN
          GET STACKED DIAGNOSTICS v_reason = MESSAGE_TEXT, v_state = RETURNED_SQLSTATE;
          INSERT INTO shared.billing_close_failures AS f (subscription_id, period_start, org_id,
                                                          period_end, reason, sqlstate)
          SELECT s.subscription_id, s.current_period_start, s.org_id, s.current_period_end,
                 v_reason, v_state
          FROM shared.subscriptions s WHERE s.subscription_id = v_id
          ON CONFLICT (subscription_id, period_start) DO UPDATE
            SET reason = EXCLUDED.reason, sqlstate = EXCLUDED.sqlstate,
                last_failed_at = now(), attempts = f.attempts + 1, resolved_at = NULL;
          v_failed := v_failed || v_id;
        END;
      END LOOP;
    END;
  END LOOP;
  BEGIN
    v_created := v_created + shared.close_ended_late_usage(p_as_of);
  EXCEPTION WHEN OTHERS THEN
    -- Late usage stays unbilled (nothing is lost) and is retried by the next close.
    GET STACKED DIAGNOSTICS v_reason = MESSAGE_TEXT;
    RAISE WARNING 'final adjustment invoices skipped: %', v_reason;
  END;
  RETURN v_created;
END
$$;

REVOKE EXECUTE ON FUNCTION shared.close_due_periods(bigint[], timestamptz),
  shared.close_ended_late_usage(timestamptz), shared.insert_late_usage_lines(),
  shared.create_closing_invoices_table() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION shared.close_due_periods(bigint[], timestamptz),
  shared.close_ended_late_usage(timestamptz), shared.insert_late_usage_lines(),
  shared.create_closing_invoices_table() TO meterd, meterd_admin;

GRANT SELECT, INSERT, UPDATE ON shared.billing_close_failures, shared.billing_settings TO meterd;
GRANT ALL ON shared.billing_close_failures, shared.billing_settings, shared.org_logins
  TO meterd_admin;
