-- mdd: what the DICOM C-MOVE and C-GET services send, and where to

-- Where the C-MOVE destination with this AE title listens.  It must be a
-- registered node with a host and port that mdd may send to, whatever
-- mdd.accept_unknown_nodes says: an archive sends patient data only to
-- places it was told about.
CREATE FUNCTION mdd._dicom_destination(ae_title text, OUT host text, OUT port integer,
										OUT tls boolean)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	n mdd.node;
BEGIN
	SELECT * INTO n FROM mdd.node x
	WHERE x.ae_title = _dicom_destination.ae_title AND x.host IS NOT NULL AND x.port IS NOT NULL
	ORDER BY x.may_send DESC, x.id LIMIT 1;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'move destination "%" is not a node with a host and port', ae_title
			USING ERRCODE = '42704', HINT = 'Register it with mdd.add_node.';
	END IF;
	IF NOT n.may_send THEN
		RAISE EXCEPTION 'move destination "%" is a node mdd may not send to', ae_title
			USING ERRCODE = '42704', HINT = 'Its node option "send" is false.';
	END IF;
	host := n.host;
	port := n.port;
	tls := coalesce((n.options->>'tls')::boolean, false);
END;
$$;

-- The DICOM objects a C-MOVE or C-GET identifier selects, in the order they
-- are sent.  The identifier must hold the unique key of its level, without
-- wildcards.  Each request is written to the audit trail: a row for each
-- patient whose objects it sends, with their count (one row without a
-- patient when nothing matched), all with the same time.
CREATE FUNCTION mdd._dicom_retrieve(operation text, model text, level text, keys jsonb,
									destination text, calling_ae text, peer text)
RETURNS TABLE(object_id bigint, sop_class_uid text, sop_instance_uid text,
			  transfer_syntax_uid text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	q record := mdd._match_query(model, level, keys, true);
	unique_key text := (ARRAY['PatientID', 'StudyInstanceUID', 'SeriesInstanceUID',
							  'SOPInstanceUID'])[q.lvl + 1];
	n bigint;
	ids bigint[];
	stamp timestamptz;
BEGIN
	IF coalesce(btrim(keys->>unique_key), '') = '' OR keys->>unique_key ~ '[*?]' THEN
		RAISE EXCEPTION '% at level % needs the % of what to send, without wildcards',
			operation, level, unique_key
			USING ERRCODE = '22023';
	END IF;
	-- one matching pass: the objects in sending order, and their patients
	EXECUTE format('SELECT array_agg(o.id ORDER BY o.series, o.id) %s AND o.kind = ''dicom''', q.from_where)
	INTO ids;
	n := coalesce(cardinality(ids), 0);
	RETURN QUERY
	SELECT o.id, o.sop_class_uid, o.sop_instance_uid, o.transfer_syntax_uid
	FROM unnest(ids) WITH ORDINALITY AS x(id, pos) JOIN mdd.object o ON o.id = x.id
	ORDER BY x.pos;
	stamp := clock_timestamp();
	INSERT INTO mdd.audit (at, role, action, patient_id, detail, client)
	SELECT stamp, mdd._caller(), lower(operation), x.patient_id,
		   format('%s level %s %s: %s objects to %s', operation, level, keys, x.objects,
				  coalesce(destination, calling_ae)),
		   format('%s@%s', calling_ae, peer)
	FROM (SELECT p.patient_id, count(*) AS objects
		  FROM unnest(ids) i(id) JOIN mdd.object o ON o.id = i.id JOIN mdd.patient p ON p.id = o.patient
		  GROUP BY p.patient_id
		  UNION ALL
		  SELECT NULL, 0 WHERE n = 0) x
	ORDER BY x.patient_id;
END;
$$;

-- The stored bytes of one object for a C-MOVE or C-GET, checked against
-- their SHA-256 so that nothing corrupt ever leaves the archive.
CREATE FUNCTION mdd._dicom_fetch(object_id bigint) RETURNS bytea
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
	SELECT mdd._fetch(object_id, true)
$$;

-- An audit row for a DICOM peer (a refused C-MOVE or C-GET, say).
CREATE FUNCTION mdd._dicom_audit(action text, detail text, calling_ae text, peer text)
RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
	INSERT INTO mdd.audit (role, action, detail, client)
	VALUES (mdd._caller(), action, detail, format('%s@%s', calling_ae, peer))
$$;
