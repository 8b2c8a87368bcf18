-- mdd: the audit trail of who stored, read, exported what

CREATE TABLE mdd.audit (
	id			bigserial PRIMARY KEY,
	at			timestamptz NOT NULL DEFAULT clock_timestamp(),
	role		name NOT NULL,
	action		text NOT NULL,
	object_id	bigint,
	patient_id	text,
	detail		text,
	client		text
);
CREATE INDEX ON mdd.audit (at);
CREATE INDEX ON mdd.audit (object_id);

CREATE FUNCTION mdd._audit(action text, object_id bigint, patient_id text, detail text,
						   client text DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	INSERT INTO mdd.audit (role, action, object_id, patient_id, detail, client)
	VALUES (mdd._caller(), action, object_id, patient_id, detail,
			coalesce(client, mdd._http_client(), host(inet_client_addr()) || ':' || inet_client_port(),
					 'local'));
END;
$$;

CREATE VIEW mdd.audit_log AS
	SELECT at, role, action, object_id, patient_id, detail, client
	FROM mdd.audit;
