-- The audit trail also covers the two billing mutations that are not API calls:
-- 1. Closing a period: one row per invoice created ('period.closed', or
--    'invoice.adjustment_created' for a final late-usage invoice), written by a deferred
--    trigger at the end of the close's transaction, so it carries the invoice's final total
--    and an invoice rolled back with a failed subscription's subtransaction leaves none.
-- 2. Replaying rejected events (meterd replay-rejected): one row per org per chunk, with the
--    quantities counted by meter, in the chunk's transaction (lib/store/rejected_replay.cc).

CREATE FUNCTION shared.audit_invoice_created()
RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET timezone = 'UTC' AS $$
DECLARE
  v_doc jsonb;
BEGIN
  SELECT jsonb_build_object('invoice_id', i.invoice_id, 'kind', i.kind,
                            'subscription_id', i.subscription_id, 'plan', i.plan_id,
                            'period_start', i.period_start, 'period_end', i.period_end,
                            'status', i.status, 'total_micros', i.total_micros)
  INTO v_doc
  FROM shared.invoices i WHERE i.invoice_id = NEW.invoice_id;
  IF v_doc IS NULL THEN
    RETURN NULL;
  END IF;
  PERFORM shared.audit(CASE WHEN v_doc->>'kind' = 'adjustment'
                            THEN 'invoice.adjustment_created' ELSE 'period.closed' END,
                       NEW.org_id, NULL, v_doc);
  RETURN NULL;
END
$$;
REVOKE EXECUTE ON FUNCTION shared.audit_invoice_created() FROM PUBLIC;

CREATE CONSTRAINT TRIGGER invoices_audit AFTER INSERT ON shared.invoices
  DEFERRABLE INITIALLY DEFERRED
  FOR EACH ROW EXECUTE FUNCTION shared.audit_invoice_created();
