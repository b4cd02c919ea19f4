-- Roles and row-level security.
--   meterd_org    an organization's own session: sets app.org_id and sees only its rows.
--   meterd_admin  back office: sees every row, including webhook events and billing metrics.
--   meterd        the daemon and the close-period cron.
-- All three are NOLOGIN groups: grant them to login roles (see README, "Database roles").
DO $$
DECLARE
  v_role text;
BEGIN
  FOREACH v_role IN ARRAY ARRAY['meterd_org', 'meterd_admin', 'meterd'] LOOP
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = v_role) THEN
      EXECUTE format('CREATE ROLE %I NOLOGIN', v_role);
    END IF;
  END LOOP;
END
$$;

CREATE FUNCTION shared.current_org_id() RETURNS uuid
LANGUAGE sql STABLE AS $$ SELECT nullif(current_setting('app.org_id', true), '')::uuid $$;

GRANT USAGE ON SCHEMA shared, hs, rest, auto, ret, edu, payroll
  TO meterd_org, meterd_admin, meterd;

-- Every table carrying org_id gets the same two policies.
DO $$
DECLARE
  v_table text;
BEGIN
  FOREACH v_table IN ARRAY ARRAY['organizations', 'stripe_customers', 'subscriptions',
      'api_usage_meters', 'api_usage_logs', 'payment_methods', 'invoices', 'invoice_lines',
      'payments', 'usage_charges', 'usage_alerts'] LOOP
    EXECUTE format('ALTER TABLE shared.%I ENABLE ROW LEVEL SECURITY', v_table);
    EXECUTE format('CREATE POLICY org_isolation ON shared.%I FOR ALL TO meterd_org '
                   'USING (org_id = shared.current_org_id()) '
                   'WITH CHECK (org_id = shared.current_org_id())', v_table);
    EXECUTE format('CREATE POLICY full_access ON shared.%I FOR ALL TO meterd_admin, meterd '
                   'USING (true) WITH CHECK (true)', v_table);
    EXECUTE format('GRANT SELECT ON shared.%I TO meterd_org', v_table);
  END LOOP;
END
$$;

-- Catalog tables every role may read.
GRANT SELECT ON shared.meters, shared.subscription_plans, shared.plan_prices TO meterd_org;
GRANT SELECT ON shared.organization_billing_summary, shared.api_usage_analytics,
  shared.monthly_revenue_summary, hs.billing_analytics, rest.billing_analytics,
  auto.billing_analytics, ret.billing_analytics, edu.billing_analytics,
  payroll.billing_analytics TO meterd_org;
-- An org may record its own usage through the direct path.
GRANT INSERT, UPDATE ON shared.api_usage_meters, shared.api_usage_logs, shared.usage_charges,
  shared.usage_alerts TO meterd_org;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA shared TO meterd_org;

GRANT ALL ON ALL TABLES IN SCHEMA shared TO meterd_admin;
GRANT ALL ON ALL SEQUENCES IN SCHEMA shared TO meterd_admin;
GRANT SELECT ON ALL TABLES IN SCHEMA hs, rest, auto, ret, edu, payroll TO meterd_admin, meterd;

GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA shared TO meterd;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA shared TO meterd;
REVOKE ALL ON shared.stripe_webhook_events, shared.billing_metrics FROM meterd;
-- Only the cron and the back office close periods.
REVOKE EXECUTE ON FUNCTION shared.reset_monthly_usage(timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION shared.reset_monthly_usage(timestamptz) TO meterd, meterd_admin;
