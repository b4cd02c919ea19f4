-- Monthly SaaS metrics in shared.billing_metrics, by segment: shared.compute_billing_metrics.
--
-- metric_date is the first day of a calendar month M (UTC). Segments: 'all', and
-- 'industry:<code>' for hs, rest, auto, ret, edu, payroll (an org's industry is its current
-- one). Definitions:
--   invoices of M    invoices with status <> 'void' whose period_start falls in M.
--   active in M      orgs with at least one invoice of M of kind 'period'; a final
--                    'adjustment' invoice (late usage of an org whose subscription ended)
--                    counts in revenue but does not make a churned org active again.
--   revenue          sum of total_micros of the invoices of M.                 all + industry
--   mrr              sum over the invoices of M of their base_fee lines' amount x (1 month /
--                    the invoice plan's billing_interval), months of an interval being
--                    years x 12 + months + days / 30; usage is not in MRR.    all + industry
--   arr              12 x mrr (both rounded from the same unrounded sum).       all + industry
--   active_customers count of orgs active in M.                                 all + industry
--   arpa             revenue / active_customers.                                all + industry
--   logo_churn       |orgs active in M-1 and not in M| / |orgs active in M-1|.  all + industry
--   logo_retention   1 - logo_churn.                                            all + industry
--   nrr              revenue in M of the orgs active in M-1 / their revenue in M-1.
--                                                                               all + industry
--   ltv              arpa / logo_churn (unrounded; skipped when churn is 0).    all
--   payment_success_rate  (succeeded + refunded) / (succeeded + refunded + failed) over the
--                    payments created in M (refunded was collected; pending is left out). all
--   payment_failure_rate  failed / the same denominator.                       all
--   overage_share    sum of the usage and adjustment lines of the invoices of M / revenue.
--                                                                               all + industry
-- Money is micros rounded to the micro (half away from zero); rates and ratios are rounded to
-- 6 decimals. A metric whose denominator is 0 is not written; revenue, mrr, arr and
-- active_customers are written for every segment and month, 0 included.
-- Caveat: the definitions follow invoices, so a plan billed other than monthly counts in the
-- one month its invoice's period starts in (a yearly plan: its MRR is fee / 12 in that month,
-- 0 in the eleven others, and its org is not active in those).

ALTER TABLE shared.billing_metrics ADD COLUMN segment text NOT NULL DEFAULT 'all';
ALTER TABLE shared.billing_metrics ADD COLUMN computed_at timestamptz NOT NULL DEFAULT now();
ALTER TABLE shared.billing_metrics DROP CONSTRAINT billing_metrics_pkey;
ALTER TABLE shared.billing_metrics ADD PRIMARY KEY (metric_date, metric, segment);

-- Recomputes every month from the one of the earliest non-void invoice's period_start through
-- the month containing p_through, from invoices, their lines and payments as they are now.
-- After a run, the rows of the metrics above dated up to that month are exactly the computed
-- ones: values that changed are updated (computed_at: when the value was last written),
-- unchanged rows are left as they are, and rows no longer computed (a denominator that became
-- 0 after an invoice was voided) are deleted. Returns the number of metric rows computed.
-- SECURITY DEFINER: the close-period role (meterd) runs it but may not read or write
-- billing_metrics itself.
CREATE FUNCTION shared.compute_billing_metrics(p_through date)
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET timezone = 'UTC' AS $$
DECLARE
  v_last date := date_trunc('month', p_through)::date;
  v_first date;
  v_plan text;
  v_computed integer;
BEGIN
  IF p_through IS NULL THEN
    RAISE EXCEPTION 'compute_billing_metrics: p_through is required' USING ERRCODE = '22004';
  END IF;
  -- Two runs at once would each prune what the other just wrote.
  PERFORM pg_advisory_xact_lock(hashtextextended('meterd.compute_billing_metrics', 0));

  SELECT date_trunc('month', min(i.period_start) AT TIME ZONE 'UTC')::date INTO v_first
  FROM shared.invoices i WHERE i.status <> 'void';

  -- An interval shorter than a day has no month length to normalise MRR by.
  SELECT DISTINCT i.plan_id INTO v_plan
  FROM shared.invoices i JOIN shared.subscription_plans sp ON sp.plan_id = i.plan_id
  WHERE i.status <> 'void' AND i.period_start < (v_last + interval '1 month') AT TIME ZONE 'UTC'
    AND extract(year FROM sp.billing_interval) * 12 + extract(month FROM sp.billing_interval)
        + extract(day FROM sp.billing_interval) / 30 <= 0
  LIMIT 1;
  IF FOUND THEN
    RAISE EXCEPTION 'compute_billing_metrics: plan % bills every %; MRR needs an interval of '
      'at least a day', v_plan,
      (SELECT billing_interval FROM shared.subscription_plans WHERE plan_id = v_plan)
      USING ERRCODE = '22023';
  END IF;

  WITH months AS (
    SELECT m::date AS month
    FROM generate_series(v_first, v_last, interval '1 month') AS m
  ),
  segments AS (
    SELECT 'all' AS segment
    UNION ALL
    SELECT 'industry:' || code
    FROM unnest(ARRAY['hs', 'rest', 'auto', 'ret', 'edu', 'payroll']) AS code
  ),
  line_sums AS (
    SELECT l.invoice_id,
           coalesce(sum(l.amount_micros) FILTER (WHERE l.kind = 'base_fee'), 0) AS base,
           coalesce(sum(l.amount_micros) FILTER (WHERE l.kind IN ('usage', 'adjustment')), 0)
             AS overage
    FROM shared.invoice_lines l
    GROUP BY l.invoice_id
  ),
  -- The invoices of the months computed, each under 'all' and its org's industry segment.
  billed AS (
    SELECT s.segment, i.org_id,
           date_trunc('month', i.period_start AT TIME ZONE 'UTC')::date AS month,
           i.kind = 'period' AS makes_active,
           i.total_micros::numeric AS revenue,
           coalesce(l.base, 0)
             / (extract(year FROM sp.billing_interval) * 12
                + extract(month FROM sp.billing_interval)
                + extract(day FROM sp.billing_interval) / 30) AS mrr,
           coalesce(l.overage, 0)::numeric AS overage
    FROM shared.invoices i
    JOIN shared.subscription_plans sp ON sp.plan_id = i.plan_id
    LEFT JOIN line_sums l ON l.invoice_id = i.invoice_id
    LEFT JOIN shared.organizations o ON o.org_id = i.org_id
    CROSS JOIN LATERAL (VALUES ('all'), ('industry:' || o.industry)) AS s (segment)
    WHERE i.status <> 'void' AND s.segment IS NOT NULL
      AND i.period_start >= v_first::timestamp AT TIME ZONE 'UTC'
      AND i.period_start < (v_last + interval '1 month') AT TIME ZONE 'UTC'
  ),
  totals AS (
    SELECT segment, month, sum(revenue) AS revenue, sum(mrr) AS mrr, sum(overage) AS overage
    FROM billed GROUP BY segment, month
  ),
  org_months AS (
    SELECT segment, month, org_id, sum(revenue) AS revenue, bool_or(makes_active) AS active
    FROM billed GROUP BY segment, month, org_id
  ),
  actives AS (
    SELECT segment, month, count(*) AS active FROM org_months WHERE active
    GROUP BY segment, month
  ),
  -- Per month M: the orgs active in M-1, how many of them are not active in M, and their
  -- revenue in M-1 and in M.
  cohorts AS (
    SELECT prev.segment, (prev.month + interval '1 month')::date AS month,
           count(*) AS orgs,
           count(*) FILTER (WHERE cur.active IS NOT TRUE) AS churned,
           sum(prev.revenue) AS revenue_before,
           coalesce(sum(cur.revenue), 0) AS revenue_after
    FROM org_months prev
    LEFT JOIN org_months cur ON cur.segment = prev.segment AND cur.org_id = prev.org_id
                            AND cur.month = (prev.month + interval '1 month')::date
    WHERE prev.active AND prev.month < v_last
    GROUP BY prev.segment, prev.month
  ),
  payment_months AS (
    SELECT date_trunc('month', p.created_at AT TIME ZONE 'UTC')::date AS month,
           count(*) FILTER (WHERE p.status IN ('succeeded', 'refunded'))::numeric AS collected,
           count(*) FILTER (WHERE p.status = 'failed')::numeric AS failed
    FROM shared.payments p
    WHERE p.created_at >= v_first::timestamp AT TIME ZONE 'UTC'
      AND p.created_at < (v_last + interval '1 month') AT TIME ZONE 'UTC'
    GROUP BY 1
  ),
  computed AS (
    SELECT m.month, s.segment, v.metric, v.value
    FROM months m
    CROSS JOIN segments s
    LEFT JOIN totals t ON t.segment = s.segment AND t.month = m.month
    LEFT JOIN actives a ON a.segment = s.segment AND a.month = m.month
    LEFT JOIN cohorts c ON c.segment = s.segment AND c.month = m.month
    LEFT JOIN payment_months p ON s.segment = 'all' AND p.month = m.month
    CROSS JOIN LATERAL (
      SELECT coalesce(t.revenue, 0) AS revenue, coalesce(t.mrr, 0) AS mrr,
             coalesce(a.active, 0)::numeric AS active,
             c.churned::numeric / nullif(c.orgs, 0) AS churn,
             (c.orgs - c.churned)::numeric / nullif(c.orgs, 0) AS retention,
             p.collected + p.failed AS attempts
    ) x
    CROSS JOIN LATERAL (VALUES
      ('revenue', x.revenue),
      ('mrr', round(x.mrr)),
      ('arr', round(12 * x.mrr)),
      ('active_customers', x.active),
      ('arpa', round(x.revenue / nullif(x.active, 0))),
      ('logo_churn', round(x.churn, 6)),
      ('logo_retention', round(x.retention, 6)),
      ('nrr', round(c.revenue_after / nullif(c.revenue_before, 0), 6)),
      -- arpa / churn as one division: revenue x orgs(M-1) / (active x churned).
      ('ltv', CASE WHEN s.segment = 'all'
                   THEN round(x.revenue * c.orgs / nullif(x.active * c.churned, 0)) END),
      ('payment_success_rate', round(p.collected / nullif(x.attempts, 0), 6)),
      ('payment_failure_rate', round(p.failed / nullif(x.attempts, 0), 6)),
      ('overage_share', round(t.overage / nullif(x.revenue, 0), 6))
    ) AS v (metric, value)
    WHERE v.value IS NOT NULL
  ),
  written AS (
    INSERT INTO shared.billing_metrics AS b (metric_date, metric, segment, value)
    SELECT month, metric, segment, value FROM computed
    ON CONFLICT (metric_date, metric, segment) DO UPDATE
      SET value = EXCLUDED.value, computed_at = EXCLUDED.computed_at
      WHERE b.value IS DISTINCT FROM EXCLUDED.value
  ),
  pruned AS (
    DELETE FROM shared.billing_metrics b
    WHERE b.metric_date < (v_last + interval '1 month')
      AND b.metric IN ('revenue', 'mrr', 'arr', 'active_customers', 'arpa', 'logo_churn',
                       'logo_retention', 'nrr', 'ltv', 'payment_success_rate',
                       'payment_failure_rate', 'overage_share')
      AND NOT EXISTS (SELECT 1 FROM computed c
                      WHERE c.month = b.metric_date AND c.metric = b.metric
                        AND c.segment = b.segment)
  )
  SELECT count(*) INTO v_computed FROM computed;
  RETURN v_computed;
END
$$;

-- Like the close: the daemon's cron role and the back office.
REVOKE EXECUTE ON FUNCTION shared.compute_billing_metrics(date) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION shared.compute_billing_metrics(date) TO meterd, meterd_admin;
