-- Export to Stripe: the outbox.
--
-- One row per request meterd owes Stripe, written by the transaction that made the fact: the
-- close that created an invoice's usage lines writes their meter events, the update that
-- voids an invoice writes the cancellations of the meter events already sent for it. So a
-- fact is exported if and only if it committed, and a rolled-back close exports nothing.
--
-- A sender (`meterd run --stripe-secret-key…` or `meterd stripe-export`) claims due rows with
-- FOR UPDATE SKIP LOCKED, sends each with its `identifier` as Stripe's Idempotency-Key (and,
-- for a meter event, as the event's own `identifier`), and marks it sent in the transaction
-- that claimed it. A sender killed between Stripe's answer and that commit sends the row
-- again: Stripe answers from its idempotency cache, and no second meter event exists.
--
-- Only orgs with a live Stripe customer (shared.stripe_customers, not deleted) are exported,
-- with the customer they had when the line was invoiced. Zero and negative quantities are not
-- sent (a meter event's value adds to Stripe's sum).

ALTER TABLE shared.meters ADD COLUMN stripe_event_name text
  CHECK (stripe_event_name ~ '^[A-Za-z0-9_.:-]{1,100}$');
COMMENT ON COLUMN shared.meters.stripe_event_name IS
  'The event_name of the Stripe meter this meter is exported to; NULL: the meter''s name';

CREATE TABLE shared.stripe_outbox (
  outbox_id bigserial PRIMARY KEY,
  org_id uuid NOT NULL,
  invoice_id bigint REFERENCES shared.invoices (invoice_id),
  line_id bigint,
  -- meter_event: POST /v1/billing/meter_events. meter_event_cancel: POST
  -- /v1/billing/meter_event_adjustments (type=cancel) of cancel_identifier.
  kind text NOT NULL CHECK (kind IN ('meter_event', 'meter_event_cancel')),
  identifier text NOT NULL UNIQUE CHECK (length(identifier) BETWEEN 1 AND 100),
  event_name text NOT NULL,
  stripe_customer_id text,
  value bigint,
  event_time timestamptz,
  cancel_identifier text,
  -- pending: to send (at next_attempt_at); sent: Stripe answered 2xx; failed: Stripe refused
  -- it (4xx other than 429): not retried until someone calls shared.retry_stripe_exports();
  -- canceled: its invoice was voided before it was sent.
  state text NOT NULL DEFAULT 'pending'
    CHECK (state IN ('pending', 'sent', 'failed', 'canceled')),
  attempts integer NOT NULL DEFAULT 0,
  next_attempt_at timestamptz NOT NULL DEFAULT now(),
  last_error text,
  created_at timestamptz NOT NULL DEFAULT now(),
  sent_at timestamptz,
  CHECK (kind <> 'meter_event' OR state <> 'pending'
         OR (stripe_customer_id IS NOT NULL AND value IS NOT NULL AND event_time IS NOT NULL)),
  CHECK (kind <> 'meter_event_cancel' OR cancel_identifier IS NOT NULL)
);
CREATE INDEX stripe_outbox_due_idx ON shared.stripe_outbox (next_attempt_at, outbox_id)
  WHERE state = 'pending';
CREATE INDEX stripe_outbox_failed_idx ON shared.stripe_outbox (outbox_id) WHERE state = 'failed';
CREATE INDEX stripe_outbox_invoice_idx ON shared.stripe_outbox (invoice_id);
CREATE INDEX stripe_outbox_org_idx ON shared.stripe_outbox (org_id);
REVOKE ALL ON shared.stripe_outbox FROM PUBLIC;
GRANT SELECT, UPDATE ON shared.stripe_outbox TO meterd;
GRANT ALL ON shared.stripe_outbox TO meterd_admin;
GRANT USAGE ON SEQUENCE shared.stripe_outbox_outbox_id_seq TO meterd_admin;

-- A Stripe identifier (at most 100 characters) from its readable form: kept when it fits,
-- else a prefix and the md5 of the whole (still stable).
CREATE FUNCTION shared.stripe_identifier(p_prefix text, p_text text)
RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT CASE WHEN length(p_prefix || p_text) <= 100 THEN p_prefix || p_text
              ELSE p_prefix || md5(p_text) END
$$;

-- Meter events of invoice lines: mtr:<org>:<meter>:<usage period start>:<invoice>. The invoice
-- id keeps a period's usage and a later adjustment for it (another invoice) apart; a resend
-- of one row always carries the same identifier.
CREATE FUNCTION shared.enqueue_stripe_meter_events()
RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET timezone = 'UTC' AS $$
BEGIN
  INSERT INTO shared.stripe_outbox (org_id, invoice_id, line_id, kind, identifier, event_name,
                                    stripe_customer_id, value, event_time)
  SELECT l.org_id, l.invoice_id, l.line_id, 'meter_event',
         shared.stripe_identifier('mtr:', format('%s:%s:%s:%s', l.org_id, l.meter,
                                                 to_char(l.usage_period_start, 'YYYYMMDD'),
                                                 l.invoice_id)),
         coalesce(m.stripe_event_name, m.name), c.stripe_customer_id, l.quantity,
         -- The period's last second (its end is exclusive).
         l.usage_period_end::timestamp AT TIME ZONE 'UTC' - interval '1 second'
  FROM new_lines l
  JOIN shared.meters m ON m.name = l.meter
  JOIN shared.stripe_customers c ON c.org_id = l.org_id AND c.deleted_at IS NULL
  WHERE l.kind IN ('usage', 'adjustment') AND l.quantity > 0
    AND l.usage_period_start IS NOT NULL AND l.usage_period_end IS NOT NULL
  ORDER BY l.line_id
  ON CONFLICT (identifier) DO NOTHING;
  RETURN NULL;
END
$$;
CREATE TRIGGER invoice_lines_stripe_export AFTER INSERT ON shared.invoice_lines
  REFERENCING NEW TABLE AS new_lines
  FOR EACH STATEMENT EXECUTE FUNCTION shared.enqueue_stripe_meter_events();

-- A voided invoice bills nothing, and the next close bills its usage again as adjustments
-- (0008), which are exported as new meter events: the voided invoice's own meter events are
-- canceled at Stripe (sent ones by an adjustment, pending ones never sent). Stripe accepts a
-- cancellation only within 24 hours of the meter event; a later one is refused and stays
-- `failed` with Stripe's message (README: correct it in Stripe).
CREATE FUNCTION shared.cancel_stripe_exports_of_void_invoice()
RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  -- A row a sender holds is waited for, then seen as sent (and canceled below).
  UPDATE shared.stripe_outbox SET state = 'canceled', last_error = 'invoice voided before export'
  WHERE invoice_id = NEW.invoice_id AND kind = 'meter_event' AND state IN ('pending', 'failed');
  INSERT INTO shared.stripe_outbox (org_id, invoice_id, kind, identifier, event_name,
                                    cancel_identifier)
  SELECT o.org_id, o.invoice_id, 'meter_event_cancel',
         shared.stripe_identifier('cxl:', o.identifier), o.event_name, o.identifier
  FROM shared.stripe_outbox o
  WHERE o.invoice_id = NEW.invoice_id AND o.kind = 'meter_event' AND o.state = 'sent'
  ORDER BY o.outbox_id
  ON CONFLICT (identifier) DO NOTHING;
  RETURN NULL;
END
$$;
CREATE TRIGGER invoices_void_stripe_export AFTER UPDATE OF status ON shared.invoices
  FOR EACH ROW WHEN (NEW.status = 'void' AND OLD.status <> 'void')
  EXECUTE FUNCTION shared.cancel_stripe_exports_of_void_invoice();

-- `meterd org erase` moves invoices to a pseudonymous org id: their outbox rows follow, and
-- rows already sent (or never to be) forget the Stripe customer id. Identifiers stay: they
-- are Stripe's references to what it holds, like the payment intent ids erase keeps.
CREATE FUNCTION shared.stripe_outbox_follows_invoice_org()
RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  UPDATE shared.stripe_outbox
  SET org_id = NEW.org_id,
      stripe_customer_id = CASE WHEN state = 'pending' THEN stripe_customer_id END
  WHERE invoice_id = NEW.invoice_id;
  RETURN NULL;
END
$$;
CREATE TRIGGER invoices_org_stripe_export AFTER UPDATE OF org_id ON shared.invoices
  FOR EACH ROW WHEN (NEW.org_id IS DISTINCT FROM OLD.org_id)
  EXECUTE FUNCTION shared.stripe_outbox_follows_invoice_org();

-- What the sender reports in /metrics.
CREATE FUNCTION shared.stripe_outbox_status()
RETURNS TABLE (pending bigint, due bigint, failed bigint, oldest_pending_seconds double precision)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  SELECT count(*) FILTER (WHERE state = 'pending'),
         count(*) FILTER (WHERE state = 'pending' AND next_attempt_at <= now()),
         (SELECT count(*) FROM shared.stripe_outbox WHERE state = 'failed'),
         coalesce(extract(epoch FROM now() - min(created_at) FILTER (WHERE state = 'pending')), 0)
  FROM shared.stripe_outbox WHERE state = 'pending'
$$;
REVOKE EXECUTE ON FUNCTION shared.stripe_outbox_status() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION shared.stripe_outbox_status() TO meterd, meterd_admin;

-- After fixing what Stripe refused (a customer, a meter, the key's permissions): send the
-- failed rows again (all, or those of one org). Returns how many were requeued; audited.
CREATE FUNCTION shared.retry_stripe_exports(p_org uuid DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_count integer;
BEGIN
  UPDATE shared.stripe_outbox SET state = 'pending', next_attempt_at = now()
  WHERE state = 'failed' AND (p_org IS NULL OR org_id = p_org);
  GET DIAGNOSTICS v_count = ROW_COUNT;
  IF v_count > 0 THEN
    PERFORM shared.audit('stripe.export_retried', p_org, NULL,
                         jsonb_build_object('rows', v_count));
  END IF;
  RETURN v_count;
END
$$;
REVOKE EXECUTE ON FUNCTION shared.retry_stripe_exports(uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION shared.retry_stripe_exports(uuid) TO meterd_admin;
