-- A voided invoice bills nothing: its periods stay known to the late-usage check (their price
-- and quota come from its lines), but its quantities count as unbilled, so the next invoice
-- bills that usage again as an adjustment. (0007 dropped void lines altogether, which also
-- dropped the period from the check: nothing was re-billed.)
CREATE OR REPLACE FUNCTION shared.unbilled_late_usage(p_org uuid, p_since date, p_invoice bigint)
RETURNS TABLE (meter text, usage_period_start date, usage_period_end date,
               billed_quantity bigint, stored_quantity bigint, included_quantity bigint,
               unit_price_micros bigint)
LANGUAGE sql STABLE SET timezone = 'UTC' AS $$
  WITH billed AS (
    SELECT l.meter, l.usage_period_start, l.usage_period_end,
           coalesce(sum(l.quantity) FILTER (WHERE i.status <> 'void'), 0)::bigint AS quantity,
           max(l.included_quantity) AS included_quantity,
           max(l.unit_price_micros) AS unit_price_micros
    FROM shared.invoice_lines l
    JOIN shared.invoices i ON i.invoice_id = l.invoice_id
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
