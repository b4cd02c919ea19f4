-- Concurrent charge refreshes (two flushes' overage workers, a flush and the direct path)
-- no longer let the one that read usage earlier overwrite a larger total committed meanwhile:
-- READ COMMITTED's ON CONFLICT DO UPDATE applies the proposed row to the latest version, so
-- without this guard the last committer wins even when it read less. Found by
-- BillingTest.AlertsFireOncePerThresholdUnderConcurrentFlushes (3990 stored, 4000 used).

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
    -- A period's usage only grows: a refresh that read it before a concurrent one committed
    -- a larger total is stale and must not roll the charge back (unless the period itself
    -- changed its end).
    WHERE (EXCLUDED.quantity >= u.quantity OR EXCLUDED.period_end <> u.period_end)
      AND (u.quantity, u.plan_id, u.amount_micros)
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
