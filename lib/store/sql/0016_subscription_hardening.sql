-- Hardening of 0014 after an adversarial review:
-- 1. An anchor may not reach back before the end of the org's last invoiced period (a new
--    subscription would invoice that period a second time), nor lie in the future (usage
--    until then would go unbilled while the org shows as subscribed, and late usage of an
--    ended subscription would never be billed).
-- 2. A plan change or a cancel is refused while the current period has ended but is not yet
--    closed: it would reprice a finished period, or end the subscription at a stale period.
-- 3. Only active plans, with the subscription's billing interval; the error lists none (plan
--    ids can be negotiated, per-customer ones).
-- 4. Tenant logins (meterd_org) read their subscription; they do not change it (tenants read,
--    never write). The daemon, for an API key with the admin scope, and the back office do.
-- 5. A subscription becoming ended (by a close, or canceled before its period began) is
--    audited ('subscription.ended').

CREATE OR REPLACE FUNCTION shared.assert_plan_choosable(p_plan text, p_interval interval)
RETURNS interval
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_interval interval;
BEGIN
  SELECT billing_interval INTO v_interval FROM shared.subscription_plans
  WHERE plan_id = p_plan AND active;
  IF v_interval IS NULL THEN
    RAISE EXCEPTION 'plan: % is not an active plan', coalesce(p_plan, 'null')
      USING ERRCODE = '22023';
  END IF;
  IF p_interval IS NOT NULL AND v_interval <> p_interval THEN
    RAISE EXCEPTION 'plan: % bills every %, the subscription every %; start a new subscription '
      'instead', p_plan, v_interval, p_interval USING ERRCODE = '22023';
  END IF;
  RETURN v_interval;
END
$$;
REVOKE EXECUTE ON FUNCTION shared.assert_plan_choosable(text, interval) FROM PUBLIC;

-- 409 while the live subscription's period has ended but close-period has not closed it.
CREATE OR REPLACE FUNCTION shared.assert_period_not_ended(p_sub shared.subscriptions)
RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp SET timezone = 'UTC' AS $$
BEGIN
  IF p_sub.current_period_end <= now() THEN
    RAISE EXCEPTION 'the period of subscription % ended on % and is not closed yet; retry after '
      'close-period ran', p_sub.subscription_id, p_sub.current_period_end::date
      USING ERRCODE = '55000';
  END IF;
END
$$;
REVOKE EXECUTE ON FUNCTION shared.assert_period_not_ended(shared.subscriptions) FROM PUBLIC;

-- The org's live subscription, locked; P0002 (404) if there is none.
CREATE FUNCTION shared.required_live_subscription(p_org uuid)
RETURNS shared.subscriptions
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_sub shared.subscriptions := shared.live_subscription_for_update(p_org);
BEGIN
  IF v_sub.subscription_id IS NULL THEN
    RAISE EXCEPTION 'org % has no live subscription', p_org USING ERRCODE = 'P0002';
  END IF;
  RETURN v_sub;
END
$$;
REVOKE EXECUTE ON FUNCTION shared.required_live_subscription(uuid) FROM PUBLIC;

CREATE OR REPLACE FUNCTION shared.create_subscription(p_org uuid, p_plan text,
                                                      p_anchor date DEFAULT NULL,
                                                      p_name text DEFAULT NULL,
                                                      p_industry text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET timezone = 'UTC' AS $$
DECLARE
  v_interval interval;
  v_anchor date := coalesce(p_anchor, current_date);
  v_billed_until timestamptz;
  v_sub shared.subscriptions;
  v_doc jsonb;
BEGIN
  PERFORM shared.assert_may_act_for(p_org);
  v_interval := shared.assert_plan_choosable(p_plan, NULL);
  IF v_anchor < current_date - 31 OR v_anchor > current_date THEN
    RAISE EXCEPTION 'billing_anchor: % is outside [today - 31 days, today]', v_anchor
      USING ERRCODE = '22023';
  END IF;
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
  -- Days an earlier subscription invoiced are never invoiced again.
  SELECT max(i.period_end) INTO v_billed_until FROM shared.invoices i
  WHERE i.org_id = p_org AND i.kind = 'period' AND i.status <> 'void';
  IF v_billed_until IS NOT NULL AND v_anchor::timestamp AT TIME ZONE 'UTC' < v_billed_until THEN
    RAISE EXCEPTION 'billing_anchor: % is before %, the end of the org''s last invoiced period',
      v_anchor, (v_billed_until AT TIME ZONE 'UTC')::date USING ERRCODE = '22023';
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

CREATE OR REPLACE FUNCTION shared.change_subscription_plan(p_org uuid, p_plan text)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET timezone = 'UTC' AS $$
DECLARE
  v_sub shared.subscriptions;
  v_interval interval;
  v_before jsonb;
  v_doc jsonb;
BEGIN
  PERFORM shared.assert_may_act_for(p_org);
  v_sub := shared.required_live_subscription(p_org);
  SELECT billing_interval INTO v_interval FROM shared.subscription_plans
  WHERE plan_id = v_sub.plan_id;
  PERFORM shared.assert_plan_choosable(p_plan, v_interval);
  IF v_sub.status = 'canceled' THEN
    RAISE EXCEPTION 'subscription % is canceled; start a new one once it has ended',
      v_sub.subscription_id USING ERRCODE = '55000';
  END IF;
  PERFORM shared.assert_period_not_ended(v_sub);
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

CREATE OR REPLACE FUNCTION shared.cancel_subscription(p_org uuid,
                                                      p_at_period_end boolean DEFAULT true)
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
  v_sub := shared.required_live_subscription(p_org);
  PERFORM shared.assert_period_not_ended(v_sub);
  v_at := CASE WHEN coalesce(p_at_period_end, true)
               THEN v_sub.current_period_end - interval '1 microsecond'
               ELSE now() END;
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

REVOKE EXECUTE ON FUNCTION shared.create_subscription(uuid, text, date, text, text),
  shared.change_subscription_plan(uuid, text), shared.cancel_subscription(uuid, boolean)
  FROM meterd_org;

-- 5. Ended: by a close (after a canceled subscription's last period) or before it began.
CREATE FUNCTION shared.audit_subscription_ended()
RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET timezone = 'UTC' AS $$
BEGIN
  PERFORM shared.audit('subscription.ended', NEW.org_id, shared.subscription_json(OLD),
                       shared.subscription_json(NEW));
  RETURN NULL;
END
$$;
REVOKE EXECUTE ON FUNCTION shared.audit_subscription_ended() FROM PUBLIC;
CREATE TRIGGER subscriptions_audit_ended AFTER UPDATE OF status ON shared.subscriptions
  FOR EACH ROW WHEN (OLD.status <> 'ended' AND NEW.status = 'ended')
  EXECUTE FUNCTION shared.audit_subscription_ended();
