-- Pricing, the brief's functions, the monthly close, analytics views.
-- Billing periods are ranges of whole UTC days: usage_date >= start::date AND < end::date.

-- Charges of one org for one period at one plan: one row per meter the plan prices, also at
-- zero usage. `p_usage_end` (exclusive day) cuts usage short, for a canceled subscription.
CREATE FUNCTION shared.charges_for_period(p_org uuid, p_plan text, p_start timestamptz,
                                          p_end timestamptz, p_usage_end date DEFAULT NULL)
RETURNS TABLE (meter text, quantity bigint, included_quantity bigint, billable_quantity bigint,
               unit_price_micros bigint, amount_micros bigint)
LANGUAGE sql STABLE AS $$
  SELECT pp.meter, u.quantity, pp.included_quantity,
         greatest(u.quantity - pp.included_quantity, 0),
         pp.unit_price_micros,
         greatest(u.quantity - pp.included_quantity, 0) * pp.unit_price_micros
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

-- The period an org is billed for right now: its live subscription's, or, without one, the
-- calendar month priced at basic (indicative only: such orgs are never invoiced).
CREATE FUNCTION shared.current_billing_period(p_orgs uuid[], p_as_of timestamptz DEFAULT now())
RETURNS TABLE (org_id uuid, subscription_id bigint, status text, plan_id text,
               period_start timestamptz, period_end timestamptz, usage_end date)
LANGUAGE sql STABLE AS $$
  SELECT o.org_id, s.subscription_id, s.status, coalesce(s.plan_id, 'basic'),
         coalesce(s.current_period_start,
                  date_trunc('month', p_as_of AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'),
         coalesce(s.current_period_end,
                  (date_trunc('month', p_as_of AT TIME ZONE 'UTC') + interval '1 month')
                    AT TIME ZONE 'UTC'),
         (s.canceled_at AT TIME ZONE 'UTC')::date + 1
  FROM (SELECT DISTINCT unnest(p_orgs) AS org_id) o
  LEFT JOIN shared.subscriptions s ON s.org_id = o.org_id AND s.status <> 'ended'
$$;

CREATE FUNCTION shared.current_period_charges(p_orgs uuid[], p_as_of timestamptz DEFAULT now())
RETURNS TABLE (org_id uuid, subscription_id bigint, plan_id text, period_start timestamptz,
               period_end timestamptz, meter text, quantity bigint, included_quantity bigint,
               billable_quantity bigint, unit_price_micros bigint, amount_micros bigint)
LANGUAGE sql STABLE AS $$
  SELECT p.org_id, p.subscription_id, p.plan_id, p.period_start, p.period_end, c.*
  FROM shared.current_billing_period(p_orgs, p_as_of) p
  CROSS JOIN LATERAL shared.charges_for_period(p.org_id, p.plan_id, p.period_start,
                                               p.period_end, p.usage_end) c
$$;

-- Overage for an org in the period containing p_at: the live subscription's period, else the
-- invoiced period containing it, else the calendar month at the org's plan (basic if none).
CREATE FUNCTION shared.calculate_api_overage(p_org uuid, p_at timestamptz DEFAULT now())
RETURNS TABLE (meter text, quantity bigint, included_quantity bigint, billable_quantity bigint,
               unit_price_micros bigint, amount_micros bigint)
LANGUAGE sql STABLE AS $$
  WITH period AS (
    SELECT plan_id, period_start, period_end, usage_end, 1 AS preference
    FROM shared.current_billing_period(ARRAY[p_org], p_at)
    WHERE p_at >= period_start AND p_at < period_end
    UNION ALL
    SELECT i.plan_id, i.period_start, i.period_end, NULL, 2
    FROM shared.invoices i
    WHERE i.org_id = p_org AND p_at >= i.period_start AND p_at < i.period_end
    UNION ALL
    SELECT coalesce((SELECT s.plan_id FROM shared.subscriptions s
                     WHERE s.org_id = p_org AND s.status <> 'ended'), 'basic'),
           date_trunc('month', p_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
           (date_trunc('month', p_at AT TIME ZONE 'UTC') + interval '1 month') AT TIME ZONE 'UTC',
           NULL, 3
    ORDER BY preference
    LIMIT 1
  )
  SELECT c.* FROM period p
  CROSS JOIN LATERAL shared.charges_for_period(p_org, p.plan_id, p.period_start, p.period_end,
                                               p.usage_end) c
$$;

-- Recomputes current-period charges for the given orgs (set-based) and raises api_calls quota
-- alerts at 80 % and 100 % of the included quantity, once per org, period and threshold
-- (the unique key decides, so concurrent callers cannot double-raise). Each new alert is also
-- sent as pg_notify('meterd_usage_alerts', json). Returns the number of alerts raised.
CREATE FUNCTION shared.refresh_usage_charges(p_orgs uuid[])
RETURNS integer
LANGUAGE sql VOLATILE AS $$
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
      AND c.quantity * 100 >= c.included_quantity * t.percent
    ORDER BY c.org_id, t.percent
    ON CONFLICT (org_id, period_start, meter, threshold_percent) DO NOTHING
    RETURNING *
  )
  SELECT count(pg_notify('meterd_usage_alerts', json_build_object(
           'org_id', org_id, 'meter', meter, 'threshold_percent', threshold_percent,
           'quantity', quantity, 'included_quantity', included_quantity,
           'period_start', period_start)::text))::integer
  FROM raised
$$;

-- The slow direct path for apps that do not use Kafka: same table, same charges, same alerts.
-- Usage lands on today's UTC day. Returns the day's new total for that bucket.
CREATE FUNCTION shared.increment_api_usage(p_org uuid, p_meter text, p_quantity bigint DEFAULT 1,
                                           p_industry text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
  v_industry text := coalesce(p_industry,
                              (SELECT industry FROM shared.organizations WHERE org_id = p_org));
  v_total bigint;
BEGIN
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

-- Logs one API request (api_usage_logs) and counts it.
CREATE FUNCTION shared.track_api_request(p_org uuid, p_endpoint text, p_method text,
                                         p_status_code integer, p_response_ms integer,
                                         p_meter text DEFAULT 'api_calls',
                                         p_quantity bigint DEFAULT 1,
                                         p_industry text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
  v_industry text := coalesce(p_industry,
                              (SELECT industry FROM shared.organizations WHERE org_id = p_org));
BEGIN
  INSERT INTO shared.api_usage_logs (org_id, meter, industry, endpoint, method, status_code,
                                     response_ms, quantity)
  VALUES (p_org, p_meter, v_industry, p_endpoint, p_method, p_status_code, p_response_ms,
          p_quantity);
  RETURN shared.increment_api_usage(p_org, p_meter, p_quantity, v_industry);
END
$$;

-- Plan, period, per-meter usage/included/overage, charges so far, projected total (usage
-- extrapolated linearly over the period's days) and this period's alerts, as JSON.
CREATE FUNCTION shared.get_billing_status(p_org uuid)
RETURNS jsonb
LANGUAGE sql STABLE AS $$
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
    SELECT sum(greatest(c.quantity * d.total / d.elapsed - c.included_quantity, 0)
               * c.unit_price_micros)::bigint AS usage_micros
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
                 'quantity', a.quantity, 'raised_at', a.created_at)
                 ORDER BY a.threshold_percent)
               FROM shared.usage_alerts a
               WHERE a.org_id = p.org_id AND a.period_start = p.period_start), '[]'::jsonb))
  FROM period p
  JOIN shared.subscription_plans sp ON sp.plan_id = p.plan_id
  CROSS JOIN days d CROSS JOIN projected pr
$$;

-- Closes every subscription period that ended by p_as_of into an invoice, then advances the
-- period (or ends a canceled subscription). Idempotent: a closed period is never closed again
-- (one invoice per subscription and period start). Catches up several missed months in one
-- call. Late usage for already invoiced periods becomes adjustment lines. Returns the number
-- of invoices created.
CREATE FUNCTION shared.reset_monthly_usage(p_as_of timestamptz DEFAULT now())
RETURNS integer
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
  v_created integer := 0;
  v_round integer;
BEGIN
  -- One close at a time; a second cron run waits, then finds nothing due.
  PERFORM pg_advisory_xact_lock(7308604897068083202);
  CREATE TEMP TABLE IF NOT EXISTS closing_invoices (
    invoice_id bigint, org_id uuid, subscription_id bigint, plan_id text,
    period_start timestamptz, period_end timestamptz, usage_end date, was_canceled boolean
  ) ON COMMIT DROP;
  LOOP
    TRUNCATE closing_invoices;
    WITH due AS (
      SELECT s.* FROM shared.subscriptions s
      WHERE s.status <> 'ended' AND s.current_period_end <= p_as_of
      ORDER BY s.subscription_id
      FOR UPDATE
    ),
    created AS (
      INSERT INTO shared.invoices (org_id, subscription_id, plan_id, period_start, period_end,
                                   currency)
      SELECT d.org_id, d.subscription_id, d.plan_id, d.current_period_start,
             d.current_period_end, sp.currency
      FROM due d JOIN shared.subscription_plans sp ON sp.plan_id = d.plan_id
      ON CONFLICT (subscription_id, period_start) DO NOTHING
      RETURNING invoice_id, org_id, subscription_id, plan_id, period_start, period_end
    )
    INSERT INTO closing_invoices
    SELECT c.invoice_id, c.org_id, c.subscription_id, c.plan_id, c.period_start, c.period_end,
           least((c.period_end AT TIME ZONE 'UTC')::date,
                 (d.canceled_at AT TIME ZONE 'UTC')::date + 1),
           d.status = 'canceled'
    FROM created c JOIN due d ON d.subscription_id = c.subscription_id;
    GET DIAGNOSTICS v_round = ROW_COUNT;
    EXIT WHEN v_round = 0;
    v_created := v_created + v_round;

    INSERT INTO shared.invoice_lines (invoice_id, org_id, kind, usage_period_start,
                                      usage_period_end, quantity, amount_micros, description)
    SELECT ci.invoice_id, ci.org_id, 'base_fee', (ci.period_start AT TIME ZONE 'UTC')::date,
           (ci.period_end AT TIME ZONE 'UTC')::date, 1, sp.base_price_micros,
           sp.name || ' plan'
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

    -- Late usage: for each earlier invoiced period of the org (within 3 months), what is
    -- stored now minus what was billed so far, charged at that period's price and quota.
    WITH billed AS (
      SELECT ci.invoice_id AS closing_invoice, l.org_id, l.meter, l.usage_period_start,
             l.usage_period_end, sum(l.quantity) AS quantity,
             max(l.included_quantity) AS included_quantity,
             max(l.unit_price_micros) AS unit_price_micros
      FROM closing_invoices ci
      JOIN shared.invoice_lines l ON l.org_id = ci.org_id AND l.invoice_id <> ci.invoice_id
      WHERE l.kind IN ('usage', 'adjustment')
        AND l.usage_period_start >= (ci.period_start AT TIME ZONE 'UTC')::date - 92
      GROUP BY ci.invoice_id, l.org_id, l.meter, l.usage_period_start, l.usage_period_end
    ),
    stored AS (
      SELECT b.*, (SELECT coalesce(sum(m.quantity), 0)::bigint FROM shared.api_usage_meters m
                   WHERE m.org_id = b.org_id AND m.meter = b.meter
                     AND m.usage_date >= b.usage_period_start
                     AND m.usage_date < b.usage_period_end) AS now_quantity
      FROM billed b
    )
    INSERT INTO shared.invoice_lines (invoice_id, org_id, kind, meter, usage_period_start,
                                      usage_period_end, quantity, included_quantity,
                                      billable_quantity, unit_price_micros, amount_micros,
                                      description)
    SELECT s.closing_invoice, s.org_id, 'adjustment', s.meter, s.usage_period_start,
           s.usage_period_end, s.now_quantity - s.quantity, s.included_quantity,
           greatest(s.now_quantity - s.included_quantity, 0)
             - greatest(s.quantity - s.included_quantity, 0),
           s.unit_price_micros,
           (greatest(s.now_quantity - s.included_quantity, 0)
             - greatest(s.quantity - s.included_quantity, 0)) * s.unit_price_micros,
           format('late %s usage for %s to %s: %s more', s.meter, s.usage_period_start,
                  s.usage_period_end, s.now_quantity - s.quantity)
    FROM stored s
    WHERE s.now_quantity <> s.quantity;

    UPDATE shared.invoices i
    SET total_micros = (SELECT sum(l.amount_micros) FROM shared.invoice_lines l
                        WHERE l.invoice_id = i.invoice_id)
    FROM closing_invoices ci WHERE i.invoice_id = ci.invoice_id;

    UPDATE shared.subscriptions s
    SET current_period_start = CASE WHEN ci.was_canceled THEN s.current_period_start
                                    ELSE s.current_period_end END,
        current_period_end = CASE WHEN ci.was_canceled THEN s.current_period_end
                                  ELSE s.current_period_end + sp.billing_interval END,
        status = CASE WHEN ci.was_canceled THEN 'ended' ELSE s.status END,
        updated_at = now()
    FROM closing_invoices ci JOIN shared.subscription_plans sp ON sp.plan_id = ci.plan_id
    WHERE s.subscription_id = ci.subscription_id;
  END LOOP;
  RETURN v_created;
END
$$;

-- ---- Views (security_invoker: row-level security of the caller applies) ----

CREATE VIEW shared.organization_billing_summary WITH (security_invoker = true) AS
SELECT o.org_id, o.name, o.industry, s.subscription_id, s.plan_id, s.status,
       s.current_period_start, s.current_period_end,
       coalesce(c.api_calls, 0) AS api_calls_used,
       coalesce(c.api_calls_included, 0) AS api_calls_included,
       sp.base_price_micros AS base_fee_micros,
       coalesce(c.usage_charges_micros, 0) AS usage_charges_micros,
       coalesce(sp.base_price_micros, 0) + coalesce(c.usage_charges_micros, 0)
         AS charges_so_far_micros,
       li.total_micros AS last_invoice_total_micros,
       li.period_start AS last_invoice_period_start
FROM shared.organizations o
LEFT JOIN shared.subscriptions s ON s.org_id = o.org_id AND s.status <> 'ended'
LEFT JOIN shared.subscription_plans sp ON sp.plan_id = s.plan_id
LEFT JOIN LATERAL (
  SELECT sum(u.quantity) FILTER (WHERE u.meter = 'api_calls') AS api_calls,
         sum(u.included_quantity) FILTER (WHERE u.meter = 'api_calls') AS api_calls_included,
         sum(u.amount_micros) AS usage_charges_micros
  FROM shared.usage_charges u
  WHERE u.org_id = o.org_id AND u.period_start = s.current_period_start
) c ON true
LEFT JOIN LATERAL (
  SELECT i.total_micros, i.period_start FROM shared.invoices i
  WHERE i.org_id = o.org_id ORDER BY i.period_start DESC LIMIT 1
) li ON true;

CREATE VIEW shared.api_usage_analytics WITH (security_invoker = true) AS
SELECT m.org_id, m.industry, m.meter,
       date_trunc('month', m.usage_date)::date AS usage_month,
       sum(m.quantity)::bigint AS quantity,
       count(DISTINCT m.usage_date) AS active_days,
       round(sum(m.quantity)::numeric / count(DISTINCT m.usage_date), 2) AS avg_per_active_day,
       max(m.quantity) AS peak_day_quantity,
       max(m.updated_at) AS last_updated_at
FROM shared.api_usage_meters m
GROUP BY m.org_id, m.industry, m.meter, date_trunc('month', m.usage_date);

CREATE VIEW shared.monthly_revenue_summary WITH (security_invoker = true) AS
SELECT date_trunc('month', i.period_start AT TIME ZONE 'UTC')::date AS month,
       i.plan_id, i.currency,
       count(DISTINCT i.invoice_id) AS invoices,
       coalesce(sum(l.amount_micros) FILTER (WHERE l.kind = 'base_fee'), 0)::bigint AS mrr_micros,
       coalesce(sum(l.amount_micros) FILTER (WHERE l.kind = 'usage'), 0)::bigint
         AS overage_revenue_micros,
       coalesce(sum(l.amount_micros) FILTER (WHERE l.kind = 'adjustment'), 0)::bigint
         AS adjustment_micros,
       coalesce(sum(l.amount_micros), 0)::bigint AS total_micros
FROM shared.invoices i
JOIN shared.invoice_lines l ON l.invoice_id = i.invoice_id
WHERE i.status <> 'void'
GROUP BY 1, i.plan_id, i.currency;

-- One schema per industry, each with its own billing_analytics view.
DO $$
DECLARE
  v_industry text;
BEGIN
  FOREACH v_industry IN ARRAY ARRAY['hs', 'rest', 'auto', 'ret', 'edu', 'payroll'] LOOP
    EXECUTE format('CREATE SCHEMA IF NOT EXISTS %I', v_industry);
    EXECUTE format($v$
      CREATE VIEW %I.billing_analytics WITH (security_invoker = true) AS
      SELECT g.org_id, o.name AS org_name, g.meter, g.usage_month, g.quantity,
             coalesce(c.amount_micros, 0) AS current_charges_micros
      FROM (SELECT m.org_id, m.meter, date_trunc('month', m.usage_date)::date AS usage_month,
                   sum(m.quantity)::bigint AS quantity
            FROM shared.api_usage_meters m WHERE m.industry = %L
            GROUP BY 1, 2, 3) g
      LEFT JOIN shared.organizations o ON o.org_id = g.org_id
      LEFT JOIN LATERAL (
        SELECT sum(u.amount_micros)::bigint AS amount_micros FROM shared.usage_charges u
        WHERE u.org_id = g.org_id AND u.meter = g.meter
          AND date_trunc('month', u.period_start AT TIME ZONE 'UTC')::date = g.usage_month) c
        ON true
    $v$, v_industry, v_industry);
  END LOOP;
END
$$;
