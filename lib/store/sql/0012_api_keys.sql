-- API keys for the HTTP API (lib/api):
--   shared.api_keys          one row per key: its id, the org it acts for (NULL: an admin key,
--                            any org), its scopes, and SHA-256(salt || secret). The secret
--                            itself is shown once, when the key is created, and stored nowhere.
--   shared.create_api_key    back office only (meterd_admin or the schema's owner), audited.
--   shared.revoke_api_key    back office only, audited; once (a second call returns false).
--   shared.api_key_list      the keys without salt or hash, for the back office.
-- The daemon (meterd) reads the columns it needs to verify a key; tenants see nothing.

CREATE TABLE shared.api_keys (
  key_id text PRIMARY KEY CHECK (key_id ~ '^[0-9a-f]{12}$'),
  -- No foreign key: usage (and so keys) may exist for orgs not registered in organizations.
  org_id uuid,
  -- In the order ingest, read, admin, without duplicates (create_api_key normalizes).
  scopes text[] NOT NULL
    CHECK (cardinality(scopes) > 0 AND scopes <@ ARRAY['ingest', 'read', 'admin']),
  label text NOT NULL DEFAULT '' CHECK (char_length(label) <= 200),
  salt bytea NOT NULL CHECK (octet_length(salt) = 16),
  secret_hash bytea NOT NULL CHECK (octet_length(secret_hash) = 32),
  created_at timestamptz NOT NULL DEFAULT now(),
  created_by text NOT NULL,
  revoked_at timestamptz,
  -- An admin key acts for any org and has exactly the admin scope; an org key never has it.
  CONSTRAINT api_keys_admin_shape CHECK (
    CASE WHEN org_id IS NULL THEN scopes = ARRAY['admin']
         ELSE NOT 'admin' = ANY (scopes) END)
);
CREATE INDEX api_keys_org_idx ON shared.api_keys (org_id);

ALTER TABLE shared.api_keys ENABLE ROW LEVEL SECURITY;
CREATE POLICY daemon_read ON shared.api_keys FOR SELECT TO meterd USING (true);
REVOKE ALL ON shared.api_keys FROM PUBLIC;
-- What verifying a key needs, and nothing more (not the label, not who created it).
GRANT SELECT (key_id, org_id, scopes, salt, secret_hash, revoked_at) ON shared.api_keys
  TO meterd;

CREATE VIEW shared.api_key_list AS
SELECT key_id, org_id, scopes, label, created_at, created_by, revoked_at
FROM shared.api_keys;
REVOKE ALL ON shared.api_key_list FROM PUBLIC;
GRANT SELECT ON shared.api_key_list TO meterd_admin;

-- Stores a key the caller generated (only its salt and hash) and audits it. `p_scopes` in any
-- order; stored as ingest, read, admin. Raises 42501 unless the login is back office.
CREATE FUNCTION shared.create_api_key(p_key_id text, p_org uuid, p_scopes text[], p_label text,
                                      p_salt bytea, p_hash bytea)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_scopes text[];
BEGIN
  PERFORM shared.assert_data_protection_admin('create_api_key');
  IF p_key_id IS NULL OR p_key_id !~ '^[0-9a-f]{12}$' THEN
    RAISE EXCEPTION 'create_api_key: key id must be 12 lowercase hex characters, got %', p_key_id
      USING ERRCODE = '22023';
  END IF;
  IF p_scopes IS NULL OR cardinality(p_scopes) = 0
     OR NOT p_scopes <@ ARRAY['ingest', 'read', 'admin'] THEN
    RAISE EXCEPTION 'create_api_key: scopes must be a non-empty subset of {ingest,read,admin}, '
      'got %', p_scopes USING ERRCODE = '22023';
  END IF;
  v_scopes := ARRAY(SELECT s FROM unnest(ARRAY['ingest', 'read', 'admin']) WITH ORDINALITY
                      AS t (s, n)
                    WHERE s = ANY (p_scopes) ORDER BY n);
  IF p_org IS NULL AND v_scopes <> ARRAY['admin'] THEN
    RAISE EXCEPTION 'create_api_key: a key without an org is an admin key and has exactly the '
      'admin scope, got %', v_scopes USING ERRCODE = '22023';
  END IF;
  IF p_org IS NOT NULL AND 'admin' = ANY (v_scopes) THEN
    RAISE EXCEPTION 'create_api_key: the admin scope is only for admin keys (no org)'
      USING ERRCODE = '22023';
  END IF;
  IF octet_length(p_salt) IS DISTINCT FROM 16 OR octet_length(p_hash) IS DISTINCT FROM 32 THEN
    RAISE EXCEPTION 'create_api_key: salt must be 16 bytes and hash 32 bytes'
      USING ERRCODE = '22023';
  END IF;
  INSERT INTO shared.api_keys (key_id, org_id, scopes, label, salt, secret_hash, created_by)
  VALUES (p_key_id, p_org, v_scopes, coalesce(p_label, ''), p_salt, p_hash,
          shared.audit_actor());
  -- Never the salt or the hash: the audit trail is readable by more roles than the keys.
  PERFORM shared.audit('api_key.created', p_org, NULL,
                       jsonb_build_object('key_id', p_key_id, 'org_id', p_org,
                                          'scopes', to_jsonb(v_scopes),
                                          'label', coalesce(p_label, '')));
END
$$;

-- Revokes a live key (audited). False if the key is unknown or already revoked, so a second
-- call, or a concurrent one that waited for the first, changes nothing.
CREATE FUNCTION shared.revoke_api_key(p_key_id text)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_key record;
  v_shown jsonb;
BEGIN
  PERFORM shared.assert_data_protection_admin('revoke_api_key');
  UPDATE shared.api_keys SET revoked_at = now()
  WHERE key_id = p_key_id AND revoked_at IS NULL
  RETURNING key_id, org_id, scopes, label, revoked_at INTO v_key;
  IF NOT FOUND THEN
    RETURN false;
  END IF;
  v_shown := jsonb_build_object('key_id', v_key.key_id, 'org_id', v_key.org_id,
                                'scopes', to_jsonb(v_key.scopes), 'label', v_key.label);
  PERFORM shared.audit('api_key.revoked', v_key.org_id,
                       v_shown || jsonb_build_object('revoked_at', NULL),
                       v_shown || jsonb_build_object('revoked_at', v_key.revoked_at));
  RETURN true;
END
$$;

REVOKE EXECUTE ON FUNCTION shared.create_api_key(text, uuid, text[], text, bytea, bytea),
  shared.revoke_api_key(text) FROM PUBLIC;
-- As for shared.export_org: granted to meterd's roles so that a tenant or the daemon gets the
-- function's own clear refusal ("lacks the meterd_admin role") rather than a bare
-- "permission denied"; logins outside meterd's roles get the bare one.
GRANT EXECUTE ON FUNCTION shared.create_api_key(text, uuid, text[], text, bytea, bytea),
  shared.revoke_api_key(text) TO meterd_admin, meterd, meterd_org;
