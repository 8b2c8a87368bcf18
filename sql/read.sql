-- mdd: reading objects back, exporting them, and what travels with them

-- The bytes of an object from its best present copy (online tiers first),
-- see mdd._read_verified.  The size is always checked; the SHA-256 with
-- verify, and always for copies outside PostgreSQL, which can change
-- behind mdd's back.
CREATE FUNCTION mdd._fetch(object_id bigint, verify boolean) RETURNS bytea
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF object_id IS NULL THEN
		RAISE EXCEPTION 'object id must not be NULL' USING ERRCODE = '22004';
	END IF;
	IF NOT EXISTS (SELECT 1 FROM mdd.object x WHERE x.id = object_id) THEN
		RAISE EXCEPTION 'object % does not exist', object_id USING ERRCODE = '42704';
	END IF;
	RETURN mdd._read_verified(object_id, NULL, coalesce(verify, false));
END;
$$;

CREATE FUNCTION mdd.read(object_id bigint, verify boolean DEFAULT false) RETURNS bytea
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	data bytea := mdd._fetch(object_id, coalesce(verify, false));
BEGIN
	PERFORM mdd._audit('read', object_id,
					   (SELECT p.patient_id FROM mdd.object o JOIN mdd.patient p ON p.id = o.patient
						WHERE o.id = object_id), NULL);
	RETURN data;
END;
$$;
COMMENT ON FUNCTION mdd.read(bigint, boolean) IS
	'The exact stored bytes of an object, from whatever storage holds it';

CREATE FUNCTION mdd.export(object_id bigint, path text, verify boolean DEFAULT false,
						   overwrite boolean DEFAULT false) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	target text := mdd._check_path(path, true);
	written bigint;
BEGIN
	written := mdd._write_file(target, mdd._fetch(object_id, coalesce(verify, false)),
							   coalesce(overwrite, false));
	PERFORM mdd._audit('export', object_id,
					   (SELECT p.patient_id FROM mdd.object o JOIN mdd.patient p ON p.id = o.patient
						WHERE o.id = object_id), target);
	RETURN written;
END;
$$;
COMMENT ON FUNCTION mdd.export(bigint, text, boolean, boolean) IS
	'Write the exact stored bytes of an object to a file (under mdd.allowed_paths); returns bytes written';

-- The given objects and those that reference them, transitively: what
-- travels with them.
CREATE FUNCTION mdd._related_set(object_ids bigint[]) RETURNS SETOF bigint
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
	WITH RECURSIVE closure(id) AS (
		SELECT DISTINCT x FROM unnest(object_ids) x
		UNION
		SELECT referrer.object
		FROM closure
		JOIN mdd.object o ON o.id = closure.id
		CROSS JOIN LATERAL (
			SELECT r.object FROM mdd.reference r
			WHERE r.kind = 'instance' AND r.uid = o.sop_instance_uid
			UNION ALL
			SELECT r.object FROM mdd.reference r JOIN mdd.series se ON se.id = o.series
			WHERE r.kind = 'series' AND r.uid = se.series_instance_uid
		) referrer
	)
	SELECT id FROM closure
$$;

-- Objects that reference the given one, transitively: what travels with it.
CREATE FUNCTION mdd.related(object_id bigint) RETURNS SETOF bigint
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF object_id IS NULL THEN
		RAISE EXCEPTION 'object id must not be NULL' USING ERRCODE = '22004';
	END IF;
	IF NOT EXISTS (SELECT 1 FROM mdd.object o WHERE o.id = object_id) THEN
		RAISE EXCEPTION 'object % does not exist', object_id USING ERRCODE = '42704';
	END IF;
	RETURN QUERY
	SELECT r FROM mdd._related_set(ARRAY[object_id]) r WHERE r <> object_id ORDER BY 1;
END;
$$;
COMMENT ON FUNCTION mdd.related(bigint) IS
	'Objects that travel with this one: those referencing it, transitively (structure sets, plans, doses, records ...)';
