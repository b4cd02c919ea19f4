-- Retention of shared.rejected_events. A refused event is kept for two uses: an operator
-- reading why it was refused, and `meterd replay-rejected` counting it once the cause is
-- fixed. Replay refuses events older than the late window (they could no longer be billed),
-- so a row rejected longer ago than the late window plus a margin serves neither: it only
-- holds raw bytes (possibly personal data) and grows the table. `meterd purge-rejected`
-- deletes rows rejected before now() - p_older_than, never less than the recorded late window
-- plus 7 days (a purge must not take rows a replay could still bill). Returns the rows
-- deleted; audited.
CREATE INDEX rejected_events_rejected_at_idx ON shared.rejected_events (rejected_at);

CREATE FUNCTION shared.purge_rejected_events(p_older_than interval)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_floor interval;
  v_count bigint;
BEGIN
  SELECT late_window + interval '7 days' INTO v_floor FROM shared.billing_settings;
  v_floor := coalesce(v_floor, interval '69 days');
  IF p_older_than IS NULL OR p_older_than < v_floor THEN
    RAISE EXCEPTION 'purge_rejected_events: % is shorter than the late window plus 7 days '
      '(%): replay-rejected could still bill those rows', p_older_than, v_floor
      USING ERRCODE = '22023';
  END IF;
  DELETE FROM shared.rejected_events WHERE rejected_at < now() - p_older_than;
  GET DIAGNOSTICS v_count = ROW_COUNT;
  IF v_count > 0 THEN
    PERFORM shared.audit('rejected_events.purged', NULL, NULL,
                         jsonb_build_object('rows', v_count, 'older_than', p_older_than::text));
  END IF;
  RETURN v_count;
END
$$;
REVOKE EXECUTE ON FUNCTION shared.purge_rejected_events(interval) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION shared.purge_rejected_events(interval) TO meterd, meterd_admin;
