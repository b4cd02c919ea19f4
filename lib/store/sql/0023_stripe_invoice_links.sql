-- Payments recorded against meterd's invoices also by Stripe invoice id. A payment intent
-- usually names its Stripe invoice (`invoice`) and carries no meterd metadata; the Stripe
-- invoice id is learned from the first invoice.* event applied to a meterd invoice (it names
-- the meterd invoice in metadata.meterd_invoice_id and passed the org checks of 0018). A
-- payment naming that Stripe invoice is linked to the meterd invoice of the same org, whichever
-- of the two events arrives first.
ALTER TABLE shared.invoices ADD COLUMN stripe_invoice_id text UNIQUE;
ALTER TABLE shared.payments ADD COLUMN stripe_invoice_id text;
CREATE INDEX payments_unlinked_stripe_invoice_idx ON shared.payments (stripe_invoice_id)
  WHERE invoice_id IS NULL;

CREATE FUNCTION shared.link_stripe_invoices()
RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_object jsonb := NEW.payload->'data'->'object';
  v_invoice bigint;
  v_org uuid;
BEGIN
  IF NEW.event_type LIKE 'invoice.%' AND NEW.note IS NULL
     AND coalesce(v_object->'metadata'->>'meterd_invoice_id', '') ~ '^[0-9]{1,18}$'
     AND coalesce(v_object->>'id', '') <> '' THEN
    UPDATE shared.invoices i SET stripe_invoice_id = v_object->>'id'
    WHERE i.invoice_id = (v_object->'metadata'->>'meterd_invoice_id')::bigint
      AND i.org_id = shared.stripe_object_org(v_object) AND i.stripe_invoice_id IS NULL
      AND NOT EXISTS (SELECT 1 FROM shared.invoices o WHERE o.stripe_invoice_id = v_object->>'id')
    RETURNING i.invoice_id, i.org_id INTO v_invoice, v_org;
    IF v_invoice IS NOT NULL THEN
      UPDATE shared.payments p SET invoice_id = v_invoice
      WHERE p.stripe_invoice_id = v_object->>'id' AND p.invoice_id IS NULL AND p.org_id = v_org;
    END IF;
  ELSIF NEW.event_type LIKE 'payment_intent.%' AND jsonb_typeof(v_object->'invoice') = 'string'
  THEN
    UPDATE shared.payments p
    SET stripe_invoice_id = v_object->>'invoice',
        invoice_id = coalesce(p.invoice_id, (SELECT i.invoice_id FROM shared.invoices i
                                             WHERE i.stripe_invoice_id = v_object->>'invoice'
                                               AND i.org_id = p.org_id))
    WHERE p.stripe_payment_intent_id = v_object->>'id';
  END IF;
  RETURN NULL;
END
$$;
CREATE TRIGGER stripe_webhook_events_link_invoices
  AFTER UPDATE OF processed_at ON shared.stripe_webhook_events
  FOR EACH ROW WHEN (OLD.processed_at IS NULL AND NEW.processed_at IS NOT NULL)
  EXECUTE FUNCTION shared.link_stripe_invoices();
