-- Stripe webhooks (lib/api/stripe_webhook.cc verifies the signature, then calls this):
--   shared.apply_stripe_event(event)  stores the event once by its id and applies it to
--   stripe_customers, subscriptions, invoices, payments and payment_methods, idempotently and
--   independent of arrival order: each Stripe object remembers the `created` time of the
--   newest event applied to it (shared.stripe_object_versions), and an older event about it is
--   stored but not applied (a stale customer.subscription.updated after a newer one must not
--   roll state back). Events about a charge are versioned under its payment intent, so a
--   refund is never undone by a late payment_intent.succeeded.
-- Returns 'applied', 'duplicate' (already stored: nothing changes), 'stale' (older than what
-- was applied), 'pending' (its org is not known until its customer's event arrives; applied
-- then, in created order) or 'stored' (a type meterd does not act on, or an object it cannot
-- place: stored and acknowledged). Each applied event is audited ('stripe.<type>').
-- Orgs: a Stripe customer names its org in metadata.org_id; other objects find the org through
-- their customer (or metadata.org_id). meterd's invoice: metadata.meterd_invoice_id.

CREATE TABLE shared.stripe_object_versions (
  object_id text PRIMARY KEY,
  event_created bigint NOT NULL,
  event_id text NOT NULL
);
REVOKE ALL ON shared.stripe_object_versions FROM PUBLIC;

-- The org a Stripe object belongs to: metadata.org_id, else its customer's org.
CREATE FUNCTION shared.stripe_object_org(p_object jsonb)
RETURNS uuid
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_org uuid;
BEGIN
  IF coalesce(p_object->'metadata'->>'org_id', '') ~* '^[0-9a-f]{8}-([0-9a-f]{4}-){3}[0-9a-f]{12}$' THEN
    v_org := (p_object->'metadata'->>'org_id')::uuid;
  ELSE
    SELECT c.org_id INTO v_org FROM shared.stripe_customers c
    WHERE c.stripe_customer_id = coalesce(p_object->>'customer', '');
  END IF;
  IF v_org IS NOT NULL AND NOT EXISTS (SELECT 1 FROM shared.organizations WHERE org_id = v_org) THEN
    RETURN NULL;
  END IF;
  RETURN v_org;
END
$$;

-- Applies a stored, not yet processed event (see apply_stripe_event). 'pending': it needs an
-- org that is not known yet (its customer's event has not arrived): it stays unprocessed and
-- is applied when that customer's event is.
CREATE FUNCTION shared.apply_stored_stripe_event(p_id text)
RETURNS text
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp SET timezone = 'UTC' AS $$
DECLARE
  v_event jsonb;
  v_type text;
  v_created bigint;
  v_object jsonb;
  v_version_key text;
  v_org uuid;
  v_invoice bigint;
  v_result text := 'applied';
  v_status text;
  v_pending record;
BEGIN
  SELECT payload INTO v_event FROM shared.stripe_webhook_events
  WHERE stripe_event_id = p_id AND processed_at IS NULL FOR UPDATE;
  IF v_event IS NULL THEN
    RETURN 'duplicate';
  END IF;
  v_type := v_event->>'type';
  v_created := (v_event->>'created')::bigint;
  v_object := v_event->'data'->'object';
  v_org := shared.stripe_object_org(v_object);
  IF v_org IS NULL AND (v_type LIKE 'customer.subscription.%' OR v_type LIKE 'payment_intent.%'
                        OR v_type IN ('payment_method.attached', 'payment_method.updated',
                                      'charge.refunded')) THEN
    RETURN 'pending';
  END IF;

  -- Only the newest event about an object is applied.
  v_version_key := CASE WHEN v_type LIKE 'charge.%' AND v_object->>'payment_intent' IS NOT NULL
                        THEN v_object->>'payment_intent' ELSE v_object->>'id' END;
  IF v_version_key IS NOT NULL AND (v_type LIKE 'customer.%' OR v_type LIKE 'invoice.%'
      OR v_type LIKE 'payment_intent.%' OR v_type LIKE 'payment_method.%'
      OR v_type = 'charge.refunded') THEN
    INSERT INTO shared.stripe_object_versions AS v (object_id, event_created, event_id)
    VALUES (v_version_key, v_created, p_id)
    ON CONFLICT (object_id) DO UPDATE
      SET event_created = EXCLUDED.event_created, event_id = EXCLUDED.event_id
      WHERE (v.event_created, v.event_id) < (EXCLUDED.event_created, EXCLUDED.event_id);
    IF NOT FOUND THEN
      UPDATE shared.stripe_webhook_events SET processed_at = now() WHERE stripe_event_id = p_id;
      RETURN 'stale';
    END IF;
  END IF;

  IF v_type IN ('customer.created', 'customer.updated') AND v_org IS NOT NULL THEN
    INSERT INTO shared.stripe_customers (org_id, stripe_customer_id, email)
    VALUES (v_org, v_object->>'id', v_object->>'email')
    ON CONFLICT (org_id) DO UPDATE
      SET stripe_customer_id = EXCLUDED.stripe_customer_id, email = EXCLUDED.email;
  ELSIF v_type = 'customer.deleted' THEN
    DELETE FROM shared.payment_methods
    WHERE org_id IN (SELECT org_id FROM shared.stripe_customers
                     WHERE stripe_customer_id = v_object->>'id');
    DELETE FROM shared.stripe_customers WHERE stripe_customer_id = v_object->>'id';
  ELSIF v_type LIKE 'customer.subscription.%' AND v_org IS NOT NULL THEN
    -- Link the org's live subscription; mirror Stripe's dunning state; a subscription Stripe
    -- deleted is canceled here on the day Stripe canceled it (billed by the close rules).
    v_status := CASE WHEN v_type = 'customer.subscription.deleted' THEN 'canceled'
                     ELSE v_object->>'status' END;
    UPDATE shared.subscriptions s
    SET stripe_subscription_id = v_object->>'id',
        status = CASE
          WHEN s.status = 'canceled' THEN s.status
          WHEN v_status IN ('past_due', 'unpaid') THEN 'past_due'
          WHEN v_status = 'trialing' THEN 'trialing'
          WHEN v_status = 'active' THEN 'active'
          WHEN v_status IN ('canceled', 'incomplete_expired') THEN 'canceled'
          ELSE s.status END,
        canceled_at = CASE
          WHEN s.status <> 'canceled' AND v_status IN ('canceled', 'incomplete_expired')
            THEN least(coalesce(to_timestamp((v_object->>'canceled_at')::bigint), now()),
                       s.current_period_end - interval '1 microsecond')
          ELSE s.canceled_at END,
        updated_at = now()
    WHERE s.org_id = v_org AND s.status <> 'ended'
      AND (s.stripe_subscription_id IS NULL OR s.stripe_subscription_id = v_object->>'id');
    IF NOT FOUND THEN
      v_result := 'stored';
    END IF;
  ELSIF v_type LIKE 'invoice.%' THEN
    v_invoice := CASE WHEN coalesce(v_object->'metadata'->>'meterd_invoice_id', '') ~ '^[0-9]{1,18}$'
                      THEN (v_object->'metadata'->>'meterd_invoice_id')::bigint END;
    v_status := CASE v_type WHEN 'invoice.paid' THEN 'paid'
                            WHEN 'invoice.payment_succeeded' THEN 'paid'
                            WHEN 'invoice.voided' THEN 'void'
                            WHEN 'invoice.marked_uncollectible' THEN 'uncollectible'
                            WHEN 'invoice.payment_failed' THEN 'open' END;
    UPDATE shared.invoices SET status = v_status
    WHERE invoice_id = v_invoice AND v_status IS NOT NULL
      AND (v_org IS NULL OR org_id = v_org);
    IF NOT FOUND THEN
      v_result := 'stored';
    END IF;
  ELSIF v_type LIKE 'payment_intent.%' AND v_org IS NOT NULL THEN
    v_invoice := CASE WHEN coalesce(v_object->'metadata'->>'meterd_invoice_id', '') ~ '^[0-9]{1,18}$'
                      THEN (v_object->'metadata'->>'meterd_invoice_id')::bigint END;
    IF NOT EXISTS (SELECT 1 FROM shared.invoices WHERE invoice_id = v_invoice AND org_id = v_org) THEN
      v_invoice := NULL;
    END IF;
    v_status := CASE WHEN v_type = 'payment_intent.succeeded' THEN 'succeeded'
                     WHEN v_type IN ('payment_intent.payment_failed', 'payment_intent.canceled')
                       THEN 'failed'
                     ELSE 'pending' END;
    INSERT INTO shared.payments (org_id, invoice_id, amount_micros, currency, status,
                                 stripe_payment_intent_id)
    VALUES (v_org, v_invoice, (v_object->>'amount')::bigint * 10000,
            coalesce(v_object->>'currency', 'usd'), v_status, v_object->>'id')
    ON CONFLICT (stripe_payment_intent_id) DO UPDATE
      SET status = EXCLUDED.status, amount_micros = EXCLUDED.amount_micros,
          invoice_id = coalesce(EXCLUDED.invoice_id, shared.payments.invoice_id);
  ELSIF v_type = 'charge.refunded' THEN
    -- Refunded whatever arrives after (versioned under the payment intent); the payment row
    -- is made here if the intent's own events have not arrived yet.
    v_invoice := CASE WHEN coalesce(v_object->'metadata'->>'meterd_invoice_id', '') ~ '^[0-9]{1,18}$'
                      THEN (v_object->'metadata'->>'meterd_invoice_id')::bigint END;
    IF NOT EXISTS (SELECT 1 FROM shared.invoices WHERE invoice_id = v_invoice AND org_id = v_org) THEN
      v_invoice := NULL;
    END IF;
    INSERT INTO shared.payments (org_id, invoice_id, amount_micros, currency, status,
                                 stripe_payment_intent_id)
    VALUES (v_org, v_invoice, (v_object->>'amount')::bigint * 10000,
            coalesce(v_object->>'currency', 'usd'), 'refunded', v_object->>'payment_intent')
    ON CONFLICT (stripe_payment_intent_id) DO UPDATE SET status = 'refunded';
  ELSIF v_type IN ('payment_method.attached', 'payment_method.updated') AND v_org IS NOT NULL THEN
    INSERT INTO shared.payment_methods (org_id, stripe_payment_method_id, brand, last4,
                                        exp_month, exp_year)
    VALUES (v_org, v_object->>'id', v_object->'card'->>'brand', v_object->'card'->>'last4',
            (v_object->'card'->>'exp_month')::integer, (v_object->'card'->>'exp_year')::integer)
    ON CONFLICT (stripe_payment_method_id) DO UPDATE
      SET brand = EXCLUDED.brand, last4 = EXCLUDED.last4, exp_month = EXCLUDED.exp_month,
          exp_year = EXCLUDED.exp_year;
  ELSIF v_type = 'payment_method.detached' THEN
    DELETE FROM shared.payment_methods WHERE stripe_payment_method_id = v_object->>'id';
  ELSE
    v_result := 'stored';
  END IF;

  UPDATE shared.stripe_webhook_events SET processed_at = now() WHERE stripe_event_id = p_id;
  IF v_result = 'applied' THEN
    PERFORM shared.audit('stripe.' || v_type, v_org, NULL,
                         jsonb_build_object('event_id', p_id, 'object_id', v_object->>'id',
                                            'created', v_created));
  END IF;
  -- A customer now placed: the events that waited for it, oldest first.
  IF v_type IN ('customer.created', 'customer.updated') AND v_org IS NOT NULL THEN
    FOR v_pending IN
      SELECT e.stripe_event_id FROM shared.stripe_webhook_events e
      WHERE e.processed_at IS NULL
        AND e.payload->'data'->'object'->>'customer' = v_object->>'id'
      ORDER BY (e.payload->>'created')::bigint, e.stripe_event_id
    LOOP
      PERFORM shared.apply_stored_stripe_event(v_pending.stripe_event_id);
    END LOOP;
  END IF;
  RETURN v_result;
END
$$;
REVOKE EXECUTE ON FUNCTION shared.apply_stored_stripe_event(text) FROM PUBLIC;

-- Stores the event once by its Stripe id, then applies it (apply_stored_stripe_event).
CREATE FUNCTION shared.apply_stripe_event(p_event jsonb)
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET timezone = 'UTC' AS $$
BEGIN
  IF NOT shared.session_is_trusted() THEN
    RAISE EXCEPTION 'apply_stripe_event: only the daemon and the back office apply Stripe events'
      USING ERRCODE = '42501';
  END IF;
  IF p_event->>'id' IS NULL OR p_event->>'type' IS NULL
     OR jsonb_typeof(p_event->'data'->'object') IS DISTINCT FROM 'object'
     OR jsonb_typeof(p_event->'created') IS DISTINCT FROM 'number' THEN
    RAISE EXCEPTION 'apply_stripe_event: an event has id, type, created and data.object'
      USING ERRCODE = '22023';
  END IF;
  INSERT INTO shared.stripe_webhook_events (stripe_event_id, event_type, payload)
  VALUES (p_event->>'id', p_event->>'type', p_event) ON CONFLICT (stripe_event_id) DO NOTHING;
  IF NOT FOUND THEN
    RETURN 'duplicate';
  END IF;
  RETURN shared.apply_stored_stripe_event(p_event->>'id');
END
$$;
REVOKE EXECUTE ON FUNCTION shared.apply_stripe_event(jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION shared.apply_stripe_event(jsonb) TO meterd, meterd_admin;
