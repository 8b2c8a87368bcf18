-- mdd: DICOM nodes (application entities) and what they may do

CREATE TABLE mdd.node (
	id				serial PRIMARY KEY,
	name			text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9_.-]{1,63}$'),
	ae_title		text NOT NULL CHECK (ae_title ~ '^[ -[\]-~]{1,16}$' AND ae_title !~ '^ | $'),
	host			text,
	port			integer CHECK (port BETWEEN 1 AND 65535),
	may_store		boolean NOT NULL DEFAULT true,
	may_query		boolean NOT NULL DEFAULT true,
	may_retrieve	boolean NOT NULL DEFAULT true,
	may_send		boolean NOT NULL DEFAULT true,	-- mdd may send objects to it
	retrieve_by		text NOT NULL DEFAULT 'move'	-- how mdd.retrieve asks it for objects
					CHECK (retrieve_by IN ('move', 'get')),
	options			jsonb NOT NULL DEFAULT '{}',
	created_at		timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ON mdd.node (ae_title);

-- mdd.add_node: a DICOM application entity.  host and port say where it
-- listens (for C-ECHO, C-MOVE destinations); an incoming association from
-- its AE title is accepted only from that host when host is set.  Options:
-- {"store": bool, "query": bool, "retrieve": bool} (default all true): what
-- it may ask of mdd; {"send": bool} (default true): whether mdd sends
-- objects to it (mdd.send, C-MOVE destination); {"find": bool} (default
-- true): whether mdd.find queries it (it needs a host and port), and
-- {"find_timeout": seconds} (default mdd.find_timeout): how long it may
-- take to answer.  {"retrieve_by": "move" or
-- "get"} (default "move"): how mdd.retrieve asks it for objects;
-- {"move_associations": n} (1 to 16, default 1): how many C-MOVE
-- associations a retrieve or move job opens to it at once, each asking
-- for a share of the instances, so that the node sends on as many
-- associations in parallel (a node must take that many).
-- {"span": bool} (default false): C-FINDs sent to mdd's own AE are also
-- answered from this node, and C-MOVEs and C-GETs to mdd for objects only
-- it holds are forwarded from it (sql/span_wire.sql).
-- A node by name; 42704 when there is none.
CREATE FUNCTION mdd._node(name text) RETURNS mdd.node
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	n mdd.node;
BEGIN
	SELECT * INTO n FROM mdd.node x WHERE x.name = _node.name;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'node "%" does not exist', coalesce(_node.name, 'NULL')
			USING ERRCODE = '42704', HINT = 'See mdd.nodes.';
	END IF;
	RETURN n;
END;
$$;

-- The row of a node as add_node and alter_node give it: every argument
-- checked (22004, 22023, 22P02), the permissions derived from the options.
CREATE FUNCTION mdd._node_row(name text, ae_title text, host text, port integer, options jsonb)
RETURNS mdd.node
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	bad text;
	n mdd.node;
BEGIN
	IF name IS NULL OR ae_title IS NULL THEN
		RAISE EXCEPTION 'node name and AE title must not be NULL' USING ERRCODE = '22004';
	END IF;
	IF name !~ '^[A-Za-z0-9_.-]{1,63}$' THEN
		RAISE EXCEPTION 'invalid node name "%"', name
			USING ERRCODE = '22023', DETAIL = 'Use 1 to 63 letters, digits, "_", "." or "-".';
	END IF;
	IF ae_title !~ '^[ -[\]-~]{1,16}$' OR ae_title ~ '^ | $' THEN
		RAISE EXCEPTION 'invalid AE title "%"', ae_title
			USING ERRCODE = '22023',
				  DETAIL = 'An AE title has 1 to 16 printable ASCII characters, no backslash, no leading or trailing space.';
	END IF;
	IF name = 'local' THEN
		RAISE EXCEPTION 'node name "local" is reserved'
			USING ERRCODE = '22023', DETAIL = 'mdd.find calls the local catalog "local".';
	END IF;
	IF port IS NOT NULL AND port NOT BETWEEN 1 AND 65535 THEN
		RAISE EXCEPTION 'invalid port %', port USING ERRCODE = '22023';
	END IF;
	options := coalesce(options, '{}');
	IF jsonb_typeof(options) <> 'object' THEN
		RAISE EXCEPTION 'node options must be a JSON object' USING ERRCODE = '22023';
	END IF;
	SELECT string_agg(k, ', ') INTO bad
	FROM jsonb_object_keys(options) k
	WHERE k NOT IN ('store', 'query', 'retrieve', 'send', 'find', 'find_timeout', 'retrieve_by', 'tls', 'span',
					'move_associations');
	IF bad IS NOT NULL THEN
		RAISE EXCEPTION 'unknown node option(s): %', bad
			USING ERRCODE = '22023',
				  HINT = 'Options are "store", "query", "retrieve", "send", "find", "find_timeout", "retrieve_by", "tls", "span" and "move_associations".';
	END IF;
	-- tls: every association mdd requests of the node is DICOM over TLS, and
	-- the node's own are accepted on the TLS port only (docs/admin.md)
	IF options ? 'tls' AND jsonb_typeof(options->'tls') <> 'boolean' THEN
		RAISE EXCEPTION 'invalid node option "tls": %', options->'tls'
			USING ERRCODE = '22023', HINT = 'It is true (DICOM over TLS with this node) or false.';
	END IF;
	IF options ? 'retrieve_by' AND coalesce(options->>'retrieve_by', '') NOT IN ('move', 'get') THEN
		RAISE EXCEPTION 'invalid node option "retrieve_by"'
			USING ERRCODE = '22023', HINT = 'It is "move" (C-MOVE to this archive) or "get" (C-GET).';
	END IF;
	IF options ? 'move_associations' AND (jsonb_typeof(options->'move_associations') <> 'number'
										  OR (options->>'move_associations') !~ '^[0-9]+$'
										  OR (options->>'move_associations')::numeric NOT BETWEEN 1 AND 16) THEN
		RAISE EXCEPTION 'invalid node option "move_associations": %', options->'move_associations'
			USING ERRCODE = '22023',
				  HINT = 'Give how many C-MOVE associations mdd may open to the node at once, 1 to 16.';
	END IF;
	PERFORM (options->>'find')::boolean;	-- 22P02 unless a boolean, as the others below
	PERFORM (options->>'span')::boolean;
	IF options ? 'find_timeout' AND (jsonb_typeof(options->'find_timeout') <> 'number'
									 OR (options->>'find_timeout')::numeric NOT BETWEEN 0.001 AND 86400) THEN
		RAISE EXCEPTION 'invalid node option "find_timeout": %', options->'find_timeout'
			USING ERRCODE = '22023', HINT = 'Give the seconds a C-FIND may take, a number from 0.001 to 86400.';
	END IF;
	n.name := name;
	n.ae_title := ae_title;
	n.host := nullif(host, '');
	n.port := port;
	n.may_store := coalesce((options->>'store')::boolean, true);
	n.may_query := coalesce((options->>'query')::boolean, true);
	n.may_retrieve := coalesce((options->>'retrieve')::boolean, true);
	n.may_send := coalesce((options->>'send')::boolean, true);
	n.retrieve_by := coalesce(options->>'retrieve_by', 'move');
	n.options := options;
	RETURN n;
END;
$$;

CREATE FUNCTION mdd.add_node(name text, ae_title text, host text, port integer,
							 options jsonb DEFAULT '{}')
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	n mdd.node := mdd._node_row(name, ae_title, host, port, options);
BEGIN
	INSERT INTO mdd.node (name, ae_title, host, port, may_store, may_query, may_retrieve, may_send,
						  retrieve_by, options)
	VALUES (n.name, n.ae_title, n.host, n.port, n.may_store, n.may_query, n.may_retrieve, n.may_send,
			n.retrieve_by, n.options);
	PERFORM mdd._audit('add node', NULL, NULL,
					   format('node %s: AE title %s at %s:%s, options %s', n.name, n.ae_title,
							  coalesce(n.host, 'any host'), coalesce(n.port::text, '-'), n.options));
EXCEPTION WHEN unique_violation THEN
	RAISE EXCEPTION 'node "%" already exists', add_node.name USING ERRCODE = '42710';
END;
$$;

-- mdd.alter_node: change where a node is or what it may do.  Arguments left
-- NULL keep their value; host '' removes the host; options are merged into
-- the node's options, a key given as JSON null going back to its default.
-- Associations already open keep what they were admitted with.
CREATE FUNCTION mdd.alter_node(name text, ae_title text DEFAULT NULL, host text DEFAULT NULL,
							   port integer DEFAULT NULL, options jsonb DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	old mdd.node := mdd._node(name);
	n mdd.node;
BEGIN
	IF options IS NOT NULL AND jsonb_typeof(options) <> 'object' THEN
		RAISE EXCEPTION 'node options must be a JSON object' USING ERRCODE = '22023';
	END IF;
	n := mdd._node_row(old.name, coalesce(alter_node.ae_title, old.ae_title),
					   CASE WHEN alter_node.host IS NULL THEN old.host ELSE alter_node.host END,
					   coalesce(alter_node.port, old.port),
					   jsonb_strip_nulls(old.options || coalesce(options, '{}')));
	UPDATE mdd.node x SET ae_title = n.ae_title, host = n.host, port = n.port,
		   may_store = n.may_store, may_query = n.may_query, may_retrieve = n.may_retrieve,
		   may_send = n.may_send, retrieve_by = n.retrieve_by, options = n.options
	WHERE x.id = old.id;
	PERFORM mdd._audit('alter node', NULL, NULL,
					   format('%s: %s', old.name,
							  (SELECT string_agg(format('%s %s -> %s', k, o, v), ', ' ORDER BY k)
							   FROM jsonb_each(to_jsonb(n)) e(k, v)
							   JOIN jsonb_each(to_jsonb(old)) f(k2, o) ON f.k2 = e.k
							   WHERE e.k NOT IN ('id', 'created_at') AND o IS DISTINCT FROM v)));
END;
$$;

-- mdd.drop_node: forget a node no job or rule refers to.  What send jobs
-- delivered to it (mdd.delivered) goes with it.  A job or rule made for
-- it meanwhile makes the delete fail on its foreign key.
CREATE FUNCTION mdd.drop_node(name text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	n mdd.node := mdd._node(name);
	users text;
BEGIN
	SELECT string_agg(format('rule "%s"', r.name), ', ' ORDER BY r.name) INTO users
	FROM mdd.rule r WHERE r.node = n.id;
	IF users IS NOT NULL THEN
		RAISE EXCEPTION 'node "%" is used by %', n.name, users
			USING ERRCODE = '2BP01', HINT = 'Drop those rules first (mdd.drop_rule).';
	END IF;
	SELECT string_agg(format('job %s (%s)', j.id, j.state), ', ' ORDER BY j.id) INTO users
	FROM mdd.job j WHERE j.node = n.id OR j.destination = n.id;
	IF users IS NOT NULL THEN
		RAISE EXCEPTION 'node "%" is used by %', n.name, users
			USING ERRCODE = '2BP01',
				  HINT = 'Wait for or cancel the jobs that run (mdd.cancel), then remove ended ones with mdd.purge_jobs.';
	END IF;
	DELETE FROM mdd.delivered d WHERE d.node = n.id;
	DELETE FROM mdd.node x WHERE x.id = n.id;
	PERFORM mdd._audit('drop node', NULL, NULL, format('%s (%s at %s:%s)', n.name, n.ae_title, n.host, n.port));
END;
$$;

CREATE VIEW mdd.nodes AS
SELECT name, ae_title, host, port, may_store, may_query, may_retrieve, may_send, created_at,
	   host IS NOT NULL AND port IS NOT NULL AND coalesce((options->>'find')::boolean, true) AS may_find,
	   make_interval(secs => (options->>'find_timeout')::double precision) AS find_timeout,
	   retrieve_by,
	   coalesce((options->>'tls')::boolean, false) AS tls
FROM mdd.node;

CREATE FUNCTION mdd._echo(ae_title text, host text, port integer, timeout integer,
						  tls boolean DEFAULT false) RETURNS text
	AS 'MODULE_PATHNAME', 'mdd_echo_sql' LANGUAGE C VOLATILE;

CREATE FUNCTION mdd.echo(node text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	n mdd.node := mdd._node(node);
	failure text;
BEGIN
	IF n.host IS NULL OR n.port IS NULL THEN
		RAISE EXCEPTION 'node "%" has no host and port to call', n.name USING ERRCODE = '22023';
	END IF;
	failure := mdd._echo(n.ae_title, n.host, n.port, 10, coalesce((n.options->>'tls')::boolean, false));
	PERFORM mdd._audit('echo', NULL, NULL,
					   format('%s (%s at %s:%s%s): %s', n.name, n.ae_title, n.host, n.port,
							  CASE WHEN (n.options->>'tls')::boolean THEN ', TLS' ELSE '' END,
							  coalesce(failure, 'success')));
	IF failure IS NOT NULL THEN
		RAISE NOTICE 'C-ECHO to node "%" failed: %', n.name, failure;
	END IF;
	RETURN failure IS NULL;
END;
$$;

-- Whether an association request is accepted, and what the peer may do.
-- Called by the DICOM listeners; writes the audit trail.  transport: NULL
-- on the plain port, else what the TLS handshake agreed on (protocol,
-- cipher suite, client certificate), which the audit row records.
CREATE FUNCTION mdd._dicom_admit(calling_ae text, called_ae text, peer text,
								 transport text DEFAULT NULL,
								 OUT permits integer, OUT reason text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	ours text := coalesce(current_setting('mdd.ae_title', true), 'MDD');
	n mdd.node;
BEGIN
	permits := 0;
	IF called_ae IS DISTINCT FROM ours THEN
		reason := format('called AE title "%s" is not this archive''s "%s"', called_ae, ours);
	ELSE
		SELECT * INTO n FROM mdd.node x
		WHERE x.ae_title = calling_ae
		  AND (x.host IS NULL OR x.host = peer
			   OR (x.host = 'localhost' AND peer IN ('127.0.0.1', '::1')))
		ORDER BY x.host IS NULL, x.id
		LIMIT 1;
		IF FOUND AND transport IS NULL AND coalesce((n.options->>'tls')::boolean, false) THEN
			-- a node that uses TLS is not taken at its word over plain TCP
			reason := format('node %s uses TLS: it must associate on the TLS port', n.name);
		ELSIF FOUND THEN
			permits := 1 | CASE WHEN n.may_store THEN 2 ELSE 0 END
						 | CASE WHEN n.may_query THEN 4 ELSE 0 END
						 | CASE WHEN n.may_retrieve THEN 8 ELSE 0 END;
			reason := format('node %s', n.name);
		ELSIF EXISTS (SELECT 1 FROM mdd.node x WHERE x.ae_title = calling_ae) THEN
			-- a known AE title from another host: refused even when unknown
			-- nodes are accepted, else it would escape its node's limits
			reason := format('AE title "%s" is not registered for host %s', calling_ae, peer);
		ELSIF current_setting('mdd.accept_unknown_nodes', true)::boolean THEN
			permits := 1 | 2 | 4 | 8;
			reason := 'unknown node accepted (mdd.accept_unknown_nodes)';
		ELSE
			reason := format('unknown AE title "%s"', calling_ae);
		END IF;
	END IF;
	INSERT INTO mdd.audit (role, action, detail, client)
	VALUES (mdd._caller(), CASE WHEN permits = 0 THEN 'refuse' ELSE 'associate' END,
			format('%s -> %s: %s', calling_ae, called_ae, reason)
				|| coalesce(' (over ' || transport || ')', ''),
			format('%s@%s', calling_ae, peer));
END;
$$;

-- Archive an object received by C-STORE.  Its SOP Instance UID must be the
-- one the C-STORE request announced.
CREATE FUNCTION mdd._store_received(data bytea, calling_ae text, peer text,
									sop_instance_uid text) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	obj bigint := mdd._store_dicom(data, 'dicom:' || calling_ae, NULL,
								   format('%s@%s', calling_ae, peer));
BEGIN
	IF (SELECT o.sop_instance_uid FROM mdd.object o WHERE o.id = obj) <> _store_received.sop_instance_uid THEN
		RAISE EXCEPTION 'data set SOP Instance UID differs from the C-STORE request'
			USING ERRCODE = '22023',
				  DETAIL = format('The request announced %s.', _store_received.sop_instance_uid);
	END IF;
	RETURN obj;
END;
$$;
