-- Hardening of the Stripe outbox (0019) after an adversarial review:
-- 1. A pending row may already be at Stripe (an answer lost to a timeout, a sender killed
--    after Stripe's 2xx): voiding its invoice no longer cancels it locally. Every meter event
--    of a voided invoice is sent as owed and then canceled at Stripe; a cancellation is only
--    claimed once its meter event is marked sent (the sender's claim checks it).
-- 2. Identifiers name the usage period's start and end, and a clash raises instead of
--    dropping a meter event (the close records the subscription in billing_close_failures).
-- 3. A row first attempted more than 23 hours ago is not retried automatically: Stripe keeps
--    idempotency keys (and meter event identifiers) about 24 hours, so a resend after that
--    could count twice. It becomes failed, saying so; an operator checks Stripe first.
-- 4. After `org erase`, rows no longer pending lose the old org id from their identifiers,
--    and requeueing skips rows whose customer was erased (they would violate the CHECK and
--    abort the whole retry).
-- 5. The daemon role may only move a row's delivery state, not rewrite what it sends.

ALTER TABLE shared.stripe_outbox ADD COLUMN first_attempt_at timestamptz;

REVOKE UPDATE ON shared.stripe_outbox FROM meterd;
GRANT UPDATE (state, attempts, next_attempt_at, last_error, sent_at, first_attempt_at)
  ON shared.stripe_outbox TO meterd;

CREATE OR REPLACE FUNCTION shared.enqueue_stripe_meter_events()
RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET timezone = 'UTC' AS $$
BEGIN
  INSERT INTO shared.stripe_outbox (org_id, invoice_id, line_id, kind, identifier, event_name,
                                    stripe_customer_id, value, event_time)
  SELECT l.org_id, l.invoice_id, l.line_id, 'meter_event',
         shared.stripe_identifier('mtr:', format('%s:%s:%s-%s:%s', l.org_id, l.meter,
                                                 to_char(l.usage_period_start, 'YYYYMMDD'),
                                                 to_char(l.usage_period_end, 'YYYYMMDD'),
                                                 l.invoice_id)),
         coalesce(m.stripe_event_name, m.name), c.stripe_customer_id, l.quantity,
         -- The period's last second (its end is exclusive).
         l.usage_period_end::timestamp AT TIME ZONE 'UTC' - interval '1 second'
  FROM new_lines l
  JOIN shared.meters m ON m.name = l.meter
  JOIN shared.stripe_customers c ON c.org_id = l.org_id AND c.deleted_at IS NULL
  WHERE l.kind IN ('usage', 'adjustment') AND l.quantity > 0
    AND l.usage_period_start IS NOT NULL AND l.usage_period_end IS NOT NULL
  ORDER BY l.line_id;
  RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION shared.cancel_stripe_exports_of_void_invoice()
RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  INSERT INTO shared.stripe_outbox (org_id, invoice_id, kind, identifier, event_name,
                                    cancel_identifier)
  SELECT o.org_id, o.invoice_id, 'meter_event_cancel',
         shared.stripe_identifier('cxl:', o.identifier), o.event_name, o.identifier
  FROM shared.stripe_outbox o
  WHERE o.invoice_id = NEW.invoice_id AND o.kind = 'meter_event'
  ORDER BY o.outbox_id
  ON CONFLICT (identifier) DO NOTHING;
  RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION shared.stripe_outbox_follows_invoice_org()
RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  -- Pending rows keep what they send (Stripe is owed them); the others keep no trace of the
  -- old id beyond a hash.
  UPDATE shared.stripe_outbox
  SET org_id = NEW.org_id,
      stripe_customer_id = CASE WHEN state = 'pending' THEN stripe_customer_id END,
      identifier = CASE WHEN state = 'pending' THEN identifier
                        ELSE 'erased:' || md5(identifier) END,
      cancel_identifier = CASE WHEN state = 'pending' OR cancel_identifier IS NULL
                               THEN cancel_identifier
                               ELSE 'erased:' || md5(cancel_identifier) END
  WHERE invoice_id = NEW.invoice_id;
  RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION shared.retry_stripe_exports(p_org uuid DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_count integer;
BEGIN
  UPDATE shared.stripe_outbox
  SET state = 'pending', next_attempt_at = now(), first_attempt_at = NULL
  WHERE state = 'failed' AND (p_org IS NULL OR org_id = p_org)
    AND (kind <> 'meter_event' OR stripe_customer_id IS NOT NULL)
    AND identifier NOT LIKE 'erased:%';
  GET DIAGNOSTICS v_count = ROW_COUNT;
  IF v_count > 0 THEN
    PERFORM shared.audit('stripe.export_retried', p_org, NULL,
                         jsonb_build_object('rows', v_count));
  END IF;
  RETURN v_count;
END
$$;
