-- Erase and the Stripe links, after review:
-- 1. `org erase` no longer strands a pending cancellation: a sent meter event whose
--    cancellation is still pending keeps its identifier (the cancellation names it), so the
--    voided usage is still canceled at Stripe.
-- 2. The Stripe invoice ids that 0023 records lead back to the customer like the subscription
--    ids erase already clears: moving an invoice or a payment to the pseudonymous org clears
--    them.
CREATE OR REPLACE FUNCTION shared.stripe_outbox_follows_invoice_org()
RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  UPDATE shared.stripe_outbox o
  SET org_id = NEW.org_id,
      stripe_customer_id = CASE WHEN o.state = 'pending' THEN o.stripe_customer_id END,
      identifier = CASE
        WHEN o.state = 'pending' OR EXISTS (
          SELECT 1 FROM shared.stripe_outbox c
          WHERE c.kind = 'meter_event_cancel' AND c.state = 'pending'
            AND c.cancel_identifier = o.identifier) THEN o.identifier
        ELSE 'erased:' || md5(o.identifier) END,
      cancel_identifier = CASE WHEN o.state = 'pending' OR o.cancel_identifier IS NULL
                               THEN o.cancel_identifier
                               ELSE 'erased:' || md5(o.cancel_identifier) END
  WHERE o.invoice_id = NEW.invoice_id;
  RETURN NULL;
END
$$;

CREATE FUNCTION shared.forget_stripe_invoice_on_org_change()
RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  NEW.stripe_invoice_id := NULL;
  RETURN NEW;
END
$$;
CREATE TRIGGER invoices_forget_stripe_invoice BEFORE UPDATE OF org_id ON shared.invoices
  FOR EACH ROW WHEN (NEW.org_id IS DISTINCT FROM OLD.org_id)
  EXECUTE FUNCTION shared.forget_stripe_invoice_on_org_change();
CREATE TRIGGER payments_forget_stripe_invoice BEFORE UPDATE OF org_id ON shared.payments
  FOR EACH ROW WHEN (NEW.org_id IS DISTINCT FROM OLD.org_id)
  EXECUTE FUNCTION shared.forget_stripe_invoice_on_org_change();
