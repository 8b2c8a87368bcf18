-- mdd: the audit trail of the HTTP service (web viewer, JSON API, DICOMweb)

-- The address:port of the HTTP client whose request this backend serves,
-- or NULL outside HTTP requests (mdd._audit names it as the client).
CREATE FUNCTION mdd._http_client() RETURNS text
	AS 'MODULE_PATHNAME', 'mdd_http_client_sql' LANGUAGE C STABLE;

-- One row per HTTP request, written by the HTTP workers: the role that
-- was authenticated (the worker's own when none was), 'http' or
-- 'http refused' (401, 403), the method, path, query and status, and the
-- client.
CREATE FUNCTION mdd._http_audit(role name, action text, detail text, client text)
RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
	INSERT INTO mdd.audit (role, action, detail, client)
	VALUES (role, action, detail, client)
$$;
