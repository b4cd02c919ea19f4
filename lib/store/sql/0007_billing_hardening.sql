-- Hardening of 0005 after an adversarial review (each point has a test in
-- tests/billing/billing_test.cc):
-- * the close isolates a failing subscription by bisection (log2(n) subtransactions, not n),
--   re-raises transient errors (deadlock, lock or statement timeout, shutdown) so the cron
--   retries the whole close instead of recording them as billing failures, and resolves
--   failure rows once an operator moved or ended the subscription;
-- * final adjustment invoices of ended subscriptions are isolated and recorded the same way,
--   and look back from the subscription's last period, not from the close's as-of;
-- * a cancellation ends the subscription only in the period it falls in (a catch-up close
--   bills the months before it), and canceled_at on a subscription that is not canceled cuts
--   nothing;
-- * the default anchor of a subscription whose first period is a stub (Jan 10 -> Feb 1) is the
--   end of that stub; subscriptions advanced by 0003 in a non-UTC session are re-anchored on
--   their first invoice and put back on the anchor grid;
-- * lines of void invoices do not count as billed;
-- * alert notifications carry only the alert's id (LISTEN needs no privilege: the row, read
--   with the listener's own rights, is the message);
-- * the direct usage path enforces the meter's max_event_quantity like the Kafka parser.

-- ---- Anchors ----

CREATE OR REPLACE FUNCTION shared.default_billing_anchor()
RETURNS trigger
LANGUAGE plpgsql SET timezone = 'UTC' AS $$
DECLARE
  v_interval interval;
BEGIN
  IF NEW.billing_anchor IS NULL THEN
    SELECT billing_interval INTO v_interval FROM shared.subscription_plans
    WHERE plan_id = NEW.plan_id;
    -- A first period of exactly one interval is anchored on its start; a shorter (or longer)
    -- stub on its end, where the regular periods begin.
    NEW.billing_anchor := CASE
      WHEN v_interval IS NULL OR NEW.current_period_end = shared.period_boundary_after(
             NEW.current_period_start, v_interval, NEW.current_period_start)
        THEN NEW.current_period_start
      ELSE NEW.current_period_end END;
  END IF;
  RETURN NEW;
END
$$;

-- Re-anchor existing subscriptions on their first invoiced period (0005 took the current
-- period's start, which 0003 may have let drift in a non-UTC session).
WITH first_invoice AS (
  SELECT DISTINCT ON (i.subscription_id) i.subscription_id, i.period_start, i.period_end
  FROM shared.invoices i
  WHERE i.kind = 'period'
  ORDER BY i.subscription_id, i.period_start
)
UPDATE shared.subscriptions s
SET billing_anchor = CASE
      WHEN f.period_end = shared.period_boundary_after(f.period_start, sp.billing_interval,
                                                       f.period_start)
        THEN f.period_start
      ELSE f.period_end END
FROM first_invoice f, shared.subscription_plans sp
WHERE f.subscription_id = s.subscription_id AND sp.plan_id = s.plan_id;

-- Live subscriptions whose current period does not end on their anchor grid go back on it:
-- the period keeps its start (no day is billed twice or skipped) and ends at the first anchor
-- boundary at least half an interval later (no one-day stub with a full base fee).
UPDATE shared.subscriptions s
SET current_period_end = shared.period_boundary_after(
      s.billing_anchor, sp.billing_interval, s.current_period_start + sp.billing_interval / 2),
    updated_at = now()
FROM shared.subscription_plans sp
WHERE sp.plan_id = s.plan_id AND s.status <> 'ended'
  AND s.current_period_end <> shared.period_boundary_after(
        s.billing_anchor, sp.billing_interval, s.current_period_start);

-- ---- Cancellation: only when status says so, only in the period it falls in ----

CREATE OR REPLACE FUNCTION shared.current_billing_period(p_orgs uuid[],
                                                         p_as_of timestamptz DEFAULT now())
RETURNS TABLE (org_id uuid, subscription_id bigint, status text, plan_id text,
               period_start timestamptz, period_end timestamptz, usage_end date)
LANGUAGE sql STABLE SET timezone = 'UTC' AS $$
  SELECT o.org_id, s.subscription_id, s.status, coalesce(s.plan_id, 'basic'),
         coalesce(s.current_period_start,
                  date_trunc('month', p_as_of AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'),
         coalesce(s.current_period_end,
                  (date_trunc('month', p_as_of AT TIME ZONE 'UTC') + interval '1 month')
                    AT TIME ZONE 'UTC'),
         CASE WHEN s.status = 'canceled' AND s.canceled_at < s.current_period_end
              THEN (s.canceled_at AT TIME ZONE 'UTC')::date + 1 END
  FROM (SELECT DISTINCT unnest(p_orgs) AS org_id) o
  LEFT JOIN shared.subscriptions s ON s.org_id = o.org_id AND s.status <> 'ended'
$$;

-- ---- Late usage: void invoices bill nothing ----

CREATE OR REPLACE FUNCTION shared.unbilled_late_usage(p_org uuid, p_since date, p_invoice bigint)
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
    JOIN shared.invoices i ON i.invoice_id = l.invoice_id AND i.status <> 'void'
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

-- ---- The close ----

ALTER TABLE shared.billing_close_failures ADD COLUMN stage text NOT NULL DEFAULT 'period'
  CHECK (stage IN ('period', 'final_adjustment'));
COMMENT ON COLUMN shared.billing_close_failures.period_start IS
  'stage period: the period that could not be invoiced; stage final_adjustment: the end of the '
  'ended subscription''s last period';

-- DELETE, not TRUNCATE: a close retries in subtransactions, and TRUNCATE of a temp table per
-- subtransaction made the retries quadratic.
CREATE OR REPLACE FUNCTION shared.create_closing_invoices_table()
RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
  CREATE TEMP TABLE IF NOT EXISTS closing_invoices (
    invoice_id bigint, org_id uuid, subscription_id bigint, plan_id text,
    period_start timestamptz, period_end timestamptz, usage_end date, was_canceled boolean
  ) ON COMMIT DROP;
  DELETE FROM closing_invoices;
END
$$;

CREATE OR REPLACE FUNCTION shared.close_due_periods(p_subscriptions bigint[],
                                                    p_as_of timestamptz)
RETURNS integer
LANGUAGE plpgsql VOLATILE SET timezone = 'UTC' AS $$
DECLARE
  v_created integer;
  v_stuck record;
BEGIN
  PERFORM shared.create_closing_invoices_table();
  -- A period that already has an invoice (also a void one: the unique key still holds)
  -- would never advance: say so instead.
  SELECT s.subscription_id, s.org_id, s.current_period_start INTO v_stuck
  FROM shared.subscriptions s
  JOIN shared.invoices i ON i.subscription_id = s.subscription_id
                        AND i.period_start = s.current_period_start
  WHERE s.subscription_id = ANY (p_subscriptions)
  LIMIT 1;
  IF FOUND THEN
    RAISE EXCEPTION 'org % subscription %: an invoice already exists for the period starting %; '
      'the subscription cannot advance (delete that invoice, or move the subscription''s '
      'current period)', v_stuck.org_id, v_stuck.subscription_id, v_stuck.current_period_start
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
         CASE WHEN ends.here
              THEN least((c.period_end AT TIME ZONE 'UTC')::date,
                         (d.canceled_at AT TIME ZONE 'UTC')::date + 1)
              ELSE (c.period_end AT TIME ZONE 'UTC')::date END,
         ends.here
  FROM created c JOIN due d ON d.subscription_id = c.subscription_id
  -- Canceled in this period: its last one. Canceled later (a catch-up close): bill on.
  CROSS JOIN LATERAL (SELECT d.status = 'canceled' AND d.canceled_at < d.current_period_end
                      AS here) ends;
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
    AND f.stage = 'period' AND f.resolved_at IS NULL;
  RETURN v_created;
END
$$;

-- Final adjustment invoices for the given ended subscriptions (each the last one of an org
-- with no live subscription): their late usage since their last period, looked back as far
-- as the late window from that period's end. Returns the number of invoices created.
CREATE FUNCTION shared.close_final_adjustments(p_subscriptions bigint[], p_as_of timestamptz)
RETURNS integer
LANGUAGE plpgsql VOLATILE SET timezone = 'UTC' AS $$
DECLARE
  v_created integer;
BEGIN
  PERFORM shared.create_closing_invoices_table();
  WITH due AS (
    SELECT s.* FROM shared.subscriptions s
    WHERE s.subscription_id = ANY (p_subscriptions)
      AND EXISTS (SELECT 1 FROM shared.unbilled_late_usage(
                    s.org_id, shared.late_usage_since(s.current_period_end), NULL))
  ),
  created AS (
    INSERT INTO shared.invoices (org_id, subscription_id, plan_id, period_start, period_end,
                                 currency, kind)
    SELECT d.org_id, d.subscription_id, d.plan_id, p_as_of, p_as_of, sp.currency, 'adjustment'
    FROM due d JOIN shared.subscription_plans sp ON sp.plan_id = d.plan_id
    ON CONFLICT (subscription_id, period_start) DO NOTHING
    RETURNING invoice_id, org_id, subscription_id, plan_id, period_start, period_end
  )
  INSERT INTO closing_invoices
  SELECT c.invoice_id, c.org_id, c.subscription_id, c.plan_id,
         -- The look-back reference: the end of the subscription's last period.
         d.current_period_end, c.period_end, NULL, false
  FROM created c JOIN due d ON d.subscription_id = c.subscription_id;
  GET DIAGNOSTICS v_created = ROW_COUNT;
  IF v_created > 0 THEN
    PERFORM shared.insert_late_usage_lines();
    UPDATE shared.invoices i
    SET total_micros = (SELECT coalesce(shared.checked_micros(sum(l.amount_micros), i.org_id,
                                                              'total'), 0)
                        FROM shared.invoice_lines l WHERE l.invoice_id = i.invoice_id)
    FROM closing_invoices ci WHERE i.invoice_id = ci.invoice_id;
  END IF;
  UPDATE shared.billing_close_failures f SET resolved_at = now()
  WHERE f.subscription_id = ANY (p_subscriptions) AND f.stage = 'final_adjustment'
    AND f.resolved_at IS NULL;
  RETURN v_created;
END
$$;

-- Runs one close stage over `p_subscriptions`; if it fails, bisects until the subscriptions
-- that fail alone are found, records each in shared.billing_close_failures and closes the
-- rest. Transient errors (serialization, deadlock, lock or statement timeout, shutdown,
-- resources) are not a subscription's fault: they abort the whole close for the cron's retry.
CREATE FUNCTION shared.close_isolating(p_stage text, p_subscriptions bigint[],
                                       p_as_of timestamptz)
RETURNS integer
LANGUAGE plpgsql VOLATILE SET timezone = 'UTC' AS $$
DECLARE
  v_n integer := cardinality(p_subscriptions);
  v_reason text;
  v_state text;
BEGIN
  IF v_n = 0 THEN
    RETURN 0;
  END IF;
  BEGIN
    IF p_stage = 'period' THEN
      RETURN shared.close_due_periods(p_subscriptions, p_as_of);
    END IF;
    RETURN shared.close_final_adjustments(p_subscriptions, p_as_of);
  EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS v_reason = MESSAGE_TEXT, v_state = RETURNED_SQLSTATE;
    IF left(v_state, 2) IN ('08', '40', '53', '55', '57', '58', 'XX') THEN
      RAISE;
    END IF;
  END;
  IF v_n > 1 THEN
    RETURN shared.close_isolating(p_stage, p_subscriptions[1:v_n / 2], p_as_of)
         + shared.close_isolating(p_stage, p_subscriptions[v_n / 2 + 1:v_n], p_as_of);
  END IF;
  INSERT INTO shared.billing_close_failures AS f (subscription_id, period_start, org_id,
                                                  period_end, reason, sqlstate, stage)
  SELECT s.subscription_id,
         CASE WHEN p_stage = 'period' THEN s.current_period_start ELSE s.current_period_end END,
         s.org_id, s.current_period_end, v_reason, v_state, p_stage
  FROM shared.subscriptions s WHERE s.subscription_id = p_subscriptions[1]
  ON CONFLICT (subscription_id, period_start) DO UPDATE
    SET reason = EXCLUDED.reason, sqlstate = EXCLUDED.sqlstate, stage = EXCLUDED.stage,
        last_failed_at = now(), attempts = f.attempts + 1, resolved_at = NULL;
  RETURN 0;
END
$$;

CREATE OR REPLACE FUNCTION shared.reset_monthly_usage(p_as_of timestamptz DEFAULT now())
RETURNS integer
LANGUAGE plpgsql VOLATILE SET timezone = 'UTC' AS $$
DECLARE
  v_created integer := 0;
  v_due bigint[];
BEGIN
  -- One close at a time; a second cron run waits, then finds nothing due.
  PERFORM pg_advisory_xact_lock(7308604897068083202);
  -- Canceled before its current period began (recorded after the previous close): that
  -- period is not owed; the subscription just ends.
  UPDATE shared.subscriptions
  SET status = 'ended', updated_at = now()
  WHERE status = 'canceled' AND canceled_at < current_period_start;
  LOOP
    -- One period per due subscription per round; a subscription that failed in this run
    -- sits out the remaining rounds.
    SELECT array_agg(s.subscription_id ORDER BY s.subscription_id) INTO v_due
    FROM shared.subscriptions s
    WHERE s.status <> 'ended' AND s.current_period_end <= p_as_of
      AND NOT EXISTS (SELECT 1 FROM shared.billing_close_failures f
                      WHERE f.subscription_id = s.subscription_id AND f.last_failed_at = now()
                        AND f.resolved_at IS NULL);
    EXIT WHEN v_due IS NULL;
    v_created := v_created + shared.close_isolating('period', v_due, p_as_of);
  END LOOP;

  -- Late usage of orgs whose last subscription has ended.
  SELECT array_agg(e.subscription_id ORDER BY e.subscription_id) INTO v_due
  FROM (SELECT DISTINCT ON (s.org_id) s.subscription_id, s.org_id, s.status
        FROM shared.subscriptions s
        ORDER BY s.org_id, (s.status <> 'ended') DESC, s.current_period_end DESC) e
  WHERE e.status = 'ended';
  v_created := v_created + shared.close_isolating('final_adjustment', coalesce(v_due, '{}'),
                                                  p_as_of);

  -- Failures an operator resolved another way: the subscription ended or moved on.
  UPDATE shared.billing_close_failures f SET resolved_at = now()
  FROM shared.subscriptions s
  WHERE f.subscription_id = s.subscription_id AND f.stage = 'period' AND f.resolved_at IS NULL
    AND f.last_failed_at < now()
    AND (s.status = 'ended' OR s.current_period_start <> f.period_start);
  RETURN v_created;
END
$$;

DROP FUNCTION shared.close_ended_late_usage(timestamptz);

REVOKE EXECUTE ON FUNCTION shared.close_final_adjustments(bigint[], timestamptz),
  shared.close_isolating(text, bigint[], timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION shared.close_final_adjustments(bigint[], timestamptz),
  shared.close_isolating(text, bigint[], timestamptz) TO meterd, meterd_admin;

-- ---- Alerts: the notification names the row, nothing else ----

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
    RETURNING alert_id
  )
  SELECT count(pg_notify('meterd_usage_alerts', json_build_object('alert_id', alert_id)::text))
           ::integer
  FROM raised
$$;

-- ---- The direct usage path: the same per-event limit as the Kafka parser ----

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
  VALUES (p_org, p_meter, v_industry, (now() AT TIME ZONE 'UTC')::date, p_quantity)
  ON CONFLICT (org_id, meter, industry, usage_date) DO UPDATE
    SET quantity = m.quantity + EXCLUDED.quantity, updated_at = now()
  RETURNING quantity INTO v_total;
  PERFORM shared.refresh_usage_charges(ARRAY[p_org]);
  RETURN v_total;
END
$$;
