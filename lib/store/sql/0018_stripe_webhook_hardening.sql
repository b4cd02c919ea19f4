-- Hardening of 0017 after an adversarial review:
-- 1. A meterd subscription follows only the Stripe subscription linked to it: already linked
--    (stripe_subscription_id), or naming it in metadata.meterd_subscription_id. An unrelated
--    Stripe subscription (a failed checkout, an old one) never cancels or links it.
--    Cancellation uses Stripe's ended_at (else canceled_at), never before the current period.
-- 2. Events about one customer are serialized (advisory lock on the customer id), so an
--    event never waits forever for a customer committed beside it; a deleted customer keeps
--    its org mapping (deleted_at) so its late events still find their org; a replayed event
--    that fails leaves itself pending without blocking its customer (subtransaction).
-- 3. Invoice events need a known org that owns the meterd invoice (metadata.org_id must agree
--    with the customer's org), are versioned per meterd invoice, and follow a state machine:
--    void is final, paid never goes back to open.
-- 4. Only the event types meterd acts on claim an object's version, and ties in `created`
--    (one-second resolution) go to the later state (refunded/deleted/void > paid/succeeded >
--    failed > the rest), not to the event id.
-- 5. Refunds: only a full refund marks the payment refunded; a charge without a payment
--    intent is stored, not applied. Payment methods remember their customer, and a deleted
--    customer removes only its own. A customer is remapped only by a newer customer object.
-- 6. Conflicts (a customer id already mapped to another org, a Stripe subscription id held by
--    an ended subscription) are stored with their reason, not retried forever; Connect events
--    (`account` set) are stored, not applied.
-- 7. Amounts by the currency's decimals (zero-decimal JPY…, three-decimal KWD…, else cents).

ALTER TABLE shared.stripe_object_versions ADD COLUMN state_rank integer NOT NULL DEFAULT 0;
ALTER TABLE shared.stripe_customers ADD COLUMN stripe_created bigint;
ALTER TABLE shared.stripe_customers ADD COLUMN deleted_at timestamptz;
ALTER TABLE shared.payment_methods ADD COLUMN stripe_customer_id text;
ALTER TABLE shared.stripe_webhook_events ADD COLUMN note text;
CREATE INDEX stripe_webhook_events_pending_idx
  ON shared.stripe_webhook_events ((payload->'data'->'object'->>'customer'))
  WHERE processed_at IS NULL;

CREATE FUNCTION shared.stripe_amount_micros(p_amount bigint, p_currency text)
RETURNS bigint
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT p_amount * CASE
    WHEN lower(p_currency) IN ('bif', 'clp', 'djf', 'gnf', 'jpy', 'kmf', 'krw', 'mga', 'pyg',
                               'rwf', 'ugx', 'vnd', 'vuv', 'xaf', 'xof', 'xpf') THEN 1000000
    WHEN lower(p_currency) IN ('bhd', 'jod', 'kwd', 'omr', 'tnd') THEN 1000
    ELSE 10000 END
$$;

-- Which state wins a tie in `created`: the one that comes later in an object's life.
CREATE FUNCTION shared.stripe_state_rank(p_type text)
RETURNS integer
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT CASE
    WHEN p_type IN ('customer.deleted', 'customer.subscription.deleted', 'invoice.voided',
                    'charge.refunded', 'payment_method.detached') THEN 3
    WHEN p_type IN ('invoice.paid', 'invoice.payment_succeeded', 'payment_intent.succeeded',
                    'invoice.marked_uncollectible') THEN 2
    WHEN p_type IN ('invoice.payment_failed', 'payment_intent.payment_failed',
                    'payment_intent.canceled') THEN 1
    ELSE 0 END
$$;

-- The event types meterd acts on (only these claim an object's version).
CREATE FUNCTION shared.stripe_acted_on(p_type text)
RETURNS boolean
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT p_type IN ('customer.created', 'customer.updated', 'customer.deleted',
                    'customer.subscription.created', 'customer.subscription.updated',
                    'customer.subscription.deleted', 'invoice.paid', 'invoice.payment_succeeded',
                    'invoice.voided', 'invoice.marked_uncollectible', 'invoice.payment_failed',
                    'payment_intent.succeeded', 'payment_intent.payment_failed',
                    'payment_intent.canceled', 'payment_intent.processing', 'charge.refunded',
                    'payment_method.attached', 'payment_method.updated',
                    'payment_method.detached')
$$;

-- The org of a Stripe object: its customer's (a deleted customer's too), its linked
-- subscription's, or metadata.org_id; NULL when unknown, or when metadata and customer
-- disagree.
CREATE OR REPLACE FUNCTION shared.stripe_object_org(p_object jsonb)
RETURNS uuid
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_meta uuid;
  v_org uuid;
BEGIN
  IF coalesce(p_object->'metadata'->>'org_id', '') ~* '^[0-9a-f]{8}-([0-9a-f]{4}-){3}[0-9a-f]{12}$' THEN
    v_meta := (p_object->'metadata'->>'org_id')::uuid;
  END IF;
  SELECT c.org_id INTO v_org FROM shared.stripe_customers c
  WHERE c.stripe_customer_id = CASE WHEN p_object->>'object' = 'customer' THEN p_object->>'id'
                                    ELSE coalesce(p_object->>'customer', '') END;
  IF v_org IS NULL AND p_object->>'object' = 'subscription' THEN
    SELECT s.org_id INTO v_org FROM shared.subscriptions s
    WHERE s.stripe_subscription_id = p_object->>'id';
  END IF;
  IF v_org IS NOT NULL AND v_meta IS NOT NULL AND v_org <> v_meta
     AND p_object->>'object' <> 'customer' THEN
    RETURN NULL;
  END IF;
  v_org := coalesce(v_org, v_meta);
  IF v_org IS NOT NULL AND NOT EXISTS (SELECT 1 FROM shared.organizations WHERE org_id = v_org) THEN
    RETURN NULL;
  END IF;
  RETURN v_org;
END
$$;

CREATE OR REPLACE FUNCTION shared.apply_stored_stripe_event(p_id text)
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
  v_note text;
  v_status text;
  v_before jsonb;
  v_after jsonb;
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
  -- One customer's events one at a time (a customer committed beside this event is seen).
  PERFORM pg_advisory_xact_lock(hashtextextended(
    'stripe:' || CASE WHEN v_object->>'object' = 'customer' THEN coalesce(v_object->>'id', '')
                      ELSE coalesce(v_object->>'customer', v_object->>'id', '') END, 0));
  v_org := shared.stripe_object_org(v_object);
  IF jsonb_typeof(v_event->'account') = 'string' THEN
    v_result := 'stored';
    v_note := 'a Connect account''s event';
  ELSIF NOT shared.stripe_acted_on(v_type) THEN
    v_result := 'stored';
  ELSIF v_org IS NULL AND v_type NOT IN ('customer.deleted', 'payment_method.detached') THEN
    RETURN 'pending';
  END IF;

  IF v_result = 'applied' THEN
    v_version_key := CASE
      WHEN v_type LIKE 'invoice.%' THEN 'meterd_invoice:' || coalesce(v_object->'metadata'->>'meterd_invoice_id', v_object->>'id')
      WHEN v_type LIKE 'charge.%' AND v_object->>'payment_intent' IS NOT NULL
        THEN v_object->>'payment_intent'
      ELSE v_object->>'id' END;
    INSERT INTO shared.stripe_object_versions AS v (object_id, event_created, event_id,
                                                    state_rank)
    VALUES (v_version_key, v_created, p_id, shared.stripe_state_rank(v_type))
    ON CONFLICT (object_id) DO UPDATE
      SET event_created = EXCLUDED.event_created, event_id = EXCLUDED.event_id,
          state_rank = EXCLUDED.state_rank
      WHERE (v.event_created, v.state_rank, v.event_id)
            < (EXCLUDED.event_created, EXCLUDED.state_rank, EXCLUDED.event_id);
    IF NOT FOUND THEN
      UPDATE shared.stripe_webhook_events SET processed_at = now(), note = 'stale'
      WHERE stripe_event_id = p_id;
      RETURN 'stale';
    END IF;
  END IF;

  BEGIN
    IF v_result <> 'applied' THEN
      NULL;
    ELSIF v_type IN ('customer.created', 'customer.updated') THEN
      IF EXISTS (SELECT 1 FROM shared.stripe_customers
                 WHERE stripe_customer_id = v_object->>'id' AND org_id <> v_org) THEN
        v_result := 'stored';
        v_note := 'the customer is mapped to another org';
      ELSE
        INSERT INTO shared.stripe_customers AS c (org_id, stripe_customer_id, email,
                                                  stripe_created)
        VALUES (v_org, v_object->>'id', v_object->>'email', (v_object->>'created')::bigint)
        ON CONFLICT (org_id) DO UPDATE
          SET stripe_customer_id = EXCLUDED.stripe_customer_id, email = EXCLUDED.email,
              stripe_created = EXCLUDED.stripe_created, deleted_at = NULL
          WHERE c.stripe_customer_id = EXCLUDED.stripe_customer_id OR c.stripe_created IS NULL
             OR c.stripe_created <= EXCLUDED.stripe_created;
        IF NOT FOUND THEN
          v_result := 'stored';
          v_note := 'the org has a newer Stripe customer';
        END IF;
      END IF;
    ELSIF v_type = 'customer.deleted' THEN
      -- The mapping stays (deleted_at), made here if the customer's own events come later:
      -- its late events must still find their org.
      DELETE FROM shared.payment_methods WHERE stripe_customer_id = v_object->>'id';
      UPDATE shared.stripe_customers SET deleted_at = now()
      WHERE stripe_customer_id = v_object->>'id';
      IF NOT FOUND AND v_org IS NOT NULL THEN
        INSERT INTO shared.stripe_customers AS c (org_id, stripe_customer_id, email,
                                                  stripe_created, deleted_at)
        VALUES (v_org, v_object->>'id', v_object->>'email', (v_object->>'created')::bigint, now())
        ON CONFLICT (org_id) DO NOTHING;
      END IF;
    ELSIF v_type LIKE 'customer.subscription.%' THEN
      v_status := CASE WHEN v_type = 'customer.subscription.deleted' THEN 'canceled'
                       ELSE v_object->>'status' END;
      SELECT to_jsonb(s) INTO v_before FROM shared.subscriptions s
      WHERE s.org_id = v_org AND s.status <> 'ended'
        AND (s.stripe_subscription_id = v_object->>'id'
             OR (s.stripe_subscription_id IS NULL
                 AND s.subscription_id::text = v_object->'metadata'->>'meterd_subscription_id'));
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
              THEN least(greatest(coalesce(to_timestamp((v_object->>'ended_at')::bigint),
                                           to_timestamp((v_object->>'canceled_at')::bigint),
                                           now()),
                                  s.current_period_start),
                         s.current_period_end - interval '1 microsecond')
            ELSE s.canceled_at END,
          updated_at = now()
      WHERE s.subscription_id = (v_before->>'subscription_id')::bigint
      RETURNING to_jsonb(s) INTO v_after;
      IF v_after IS NULL THEN
        v_result := 'stored';
        v_note := 'no meterd subscription is linked to this Stripe subscription';
      END IF;
    ELSIF v_type LIKE 'invoice.%' THEN
      v_invoice := CASE WHEN coalesce(v_object->'metadata'->>'meterd_invoice_id', '') ~ '^[0-9]{1,18}$'
                        THEN (v_object->'metadata'->>'meterd_invoice_id')::bigint END;
      v_status := CASE v_type WHEN 'invoice.paid' THEN 'paid'
                              WHEN 'invoice.payment_succeeded' THEN 'paid'
                              WHEN 'invoice.voided' THEN 'void'
                              WHEN 'invoice.marked_uncollectible' THEN 'uncollectible'
                              WHEN 'invoice.payment_failed' THEN 'open' END;
      SELECT to_jsonb(i) INTO v_before FROM shared.invoices i
      WHERE i.invoice_id = v_invoice AND i.org_id = v_org;
      -- void is final; paid never goes back to open or uncollectible.
      UPDATE shared.invoices i SET status = v_status
      WHERE i.invoice_id = v_invoice AND i.org_id = v_org AND i.status <> 'void'
        AND NOT (i.status = 'paid' AND v_status IN ('open', 'uncollectible'))
      RETURNING to_jsonb(i) INTO v_after;
      IF v_after IS NULL THEN
        v_result := 'stored';
        v_note := CASE WHEN v_before IS NULL THEN 'no invoice of this org has that meterd id'
                       ELSE 'the invoice''s status does not go there' END;
      END IF;
    ELSIF v_type LIKE 'payment_intent.%' THEN
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
      VALUES (v_org, v_invoice,
              shared.stripe_amount_micros((v_object->>'amount')::bigint,
                                          coalesce(v_object->>'currency', 'usd')),
              lower(coalesce(v_object->>'currency', 'usd')), v_status, v_object->>'id')
      ON CONFLICT (stripe_payment_intent_id) DO UPDATE
        SET status = EXCLUDED.status, amount_micros = EXCLUDED.amount_micros,
            invoice_id = coalesce(EXCLUDED.invoice_id, shared.payments.invoice_id)
        WHERE shared.payments.org_id = EXCLUDED.org_id;
    ELSIF v_type = 'charge.refunded' THEN
      IF v_object->>'payment_intent' IS NULL THEN
        v_result := 'stored';
        v_note := 'a charge without a payment intent';
      ELSIF coalesce((v_object->>'amount_refunded')::bigint, 0)
            < coalesce((v_object->>'amount')::bigint, 0) THEN
        v_result := 'stored';
        v_note := 'a partial refund';
      ELSE
        v_invoice := CASE WHEN coalesce(v_object->'metadata'->>'meterd_invoice_id', '') ~ '^[0-9]{1,18}$'
                          THEN (v_object->'metadata'->>'meterd_invoice_id')::bigint END;
        IF NOT EXISTS (SELECT 1 FROM shared.invoices WHERE invoice_id = v_invoice AND org_id = v_org) THEN
          v_invoice := NULL;
        END IF;
        INSERT INTO shared.payments (org_id, invoice_id, amount_micros, currency, status,
                                     stripe_payment_intent_id)
        VALUES (v_org, v_invoice,
                shared.stripe_amount_micros((v_object->>'amount')::bigint,
                                            coalesce(v_object->>'currency', 'usd')),
                lower(coalesce(v_object->>'currency', 'usd')), 'refunded',
                v_object->>'payment_intent')
        ON CONFLICT (stripe_payment_intent_id) DO UPDATE SET status = 'refunded'
          WHERE shared.payments.org_id = EXCLUDED.org_id;
      END IF;
    ELSIF v_type IN ('payment_method.attached', 'payment_method.updated') THEN
      INSERT INTO shared.payment_methods AS m (org_id, stripe_payment_method_id, brand, last4,
                                               exp_month, exp_year, stripe_customer_id)
      VALUES (v_org, v_object->>'id', v_object->'card'->>'brand', v_object->'card'->>'last4',
              (v_object->'card'->>'exp_month')::integer, (v_object->'card'->>'exp_year')::integer,
              v_object->>'customer')
      ON CONFLICT (stripe_payment_method_id) DO UPDATE
        SET brand = EXCLUDED.brand, last4 = EXCLUDED.last4, exp_month = EXCLUDED.exp_month,
            exp_year = EXCLUDED.exp_year
        WHERE m.org_id = EXCLUDED.org_id;
    ELSIF v_type = 'payment_method.detached' THEN
      DELETE FROM shared.payment_methods WHERE stripe_payment_method_id = v_object->>'id';
    END IF;
  EXCEPTION WHEN unique_violation OR foreign_key_violation OR check_violation THEN
    -- Stored with its reason, acknowledged: Stripe retrying it for days would change nothing.
    v_result := 'stored';
    v_note := 'conflicts with meterd''s data (' || SQLSTATE || ')';
  END;

  UPDATE shared.stripe_webhook_events SET processed_at = now(), note = v_note
  WHERE stripe_event_id = p_id;
  IF v_result = 'applied' THEN
    PERFORM shared.audit('stripe.' || v_type, v_org, v_before,
                         coalesce(v_after, '{}'::jsonb)
                         || jsonb_build_object('event_id', p_id, 'object_id', v_object->>'id',
                                               'created', v_created));
  END IF;
  -- A customer now placed: the events that waited for it, oldest first, each on its own (one
  -- that fails stays pending and does not undo the customer).
  IF v_type IN ('customer.created', 'customer.updated', 'customer.deleted')
     AND v_result = 'applied' THEN
    FOR v_pending IN
      SELECT e.stripe_event_id FROM shared.stripe_webhook_events e
      WHERE e.processed_at IS NULL
        AND e.payload->'data'->'object'->>'customer' = v_object->>'id'
      ORDER BY (e.payload->>'created')::bigint,
               shared.stripe_state_rank(e.event_type), e.stripe_event_id
    LOOP
      BEGIN
        PERFORM shared.apply_stored_stripe_event(v_pending.stripe_event_id);
      EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'stripe event % stays pending: %', v_pending.stripe_event_id, SQLSTATE;
      END;
    END LOOP;
  END IF;
  RETURN v_result;
END
$$;
