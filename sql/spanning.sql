-- mdd: query spanning.  mdd.find searches the local catalog and DICOM
-- nodes at the same time (one C-FIND per node, each in a worker of its
-- own, see extension/find.c); mdd.patient_list is the single list of what
-- is known about a patient, here and on the nodes.

-- A DICOM date (YYYYMMDD) as a date, or NULL when it is not one.
CREATE FUNCTION mdd._find_da(value text) RETURNS date
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF value !~ '^[0-9]{8}$' THEN
		RETURN NULL;
	END IF;
	RETURN to_date(value, 'YYYYMMDD');
EXCEPTION WHEN datetime_field_overflow OR invalid_datetime_format THEN
	RETURN NULL;
END;
$$;

-- The local part of mdd.find: the catalog's matches, by the rules of the
-- C-FIND service (mdd._match_query), in the columns of mdd.find.
CREATE FUNCTION mdd._find_local(find_level text, find_patient_id text, find_patient_name text,
								find_study_date text, find_modality text,
								find_study_instance_uid text, find_accession_number text)
RETURNS TABLE(location text, status text, level text, patient_id text, patient_name text,
			  study_instance_uid text, study_date text, series_instance_uid text,
			  sop_instance_uid text, modality text, description text, instances integer)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	keys jsonb := jsonb_build_object('PatientID', coalesce(find_patient_id, ''),
									 'PatientName', coalesce(find_patient_name, ''),
									 'StudyInstanceUID', coalesce(find_study_instance_uid, ''),
									 'StudyDate', coalesce(find_study_date, ''),
									 'AccessionNumber', coalesce(find_accession_number, ''));
	q record;
	cols text[];
	k text;
BEGIN
	CASE find_level
	WHEN 'STUDY' THEN
		keys := keys || jsonb_build_object('ModalitiesInStudy', coalesce(find_modality, ''),
										   'StudyDescription', '',
										   'NumberOfStudyRelatedInstances', '');
	WHEN 'SERIES' THEN
		keys := keys || jsonb_build_object('Modality', coalesce(find_modality, ''),
										   'SeriesInstanceUID', '', 'SeriesDescription', '',
										   'NumberOfSeriesRelatedInstances', '');
	ELSE
		keys := keys || jsonb_build_object('Modality', coalesce(find_modality, ''),
										   'SeriesInstanceUID', '', 'SeriesDescription', '',
										   'SOPInstanceUID', '');
	END CASE;
	q := mdd._match_query('STUDY', find_level, keys, false);
	FOREACH k IN ARRAY ARRAY['PatientID', 'PatientName', 'StudyInstanceUID', 'StudyDate',
							 'SeriesInstanceUID', 'SOPInstanceUID',
							 CASE find_level WHEN 'STUDY' THEN 'ModalitiesInStudy' ELSE 'Modality' END,
							 CASE find_level WHEN 'STUDY' THEN 'StudyDescription' ELSE 'SeriesDescription' END,
							 CASE find_level WHEN 'STUDY' THEN 'NumberOfStudyRelatedInstances'
								 WHEN 'SERIES' THEN 'NumberOfSeriesRelatedInstances' END] LOOP
		cols := cols || coalesce(q.exprs[array_position(q.names, k)], 'NULL');
	END LOOP;
	RETURN QUERY EXECUTE format(
		'SELECT ''local''::text, ''ok''::text, %L::text, %s, %s, %s, %s, %s, %s, %s, %s, (%s)::integer %s ORDER BY %s',
		find_level, cols[1], cols[2], cols[3], cols[4], cols[5], cols[6], cols[7], cols[8], cols[9],
		q.from_where, (ARRAY['p.id', 'st.id', 'se.id', 'o.id'])[q.lvl + 1]);
END;
$$;

CREATE FUNCTION mdd._find_spanning(level text, patient_id text, patient_name text,
								   study_date text, modality text, study_instance_uid text,
								   accession_number text, local boolean, names text[],
								   ae_titles text[], hosts text[], ports integer[],
								   timeouts_ms integer[], timeout_ms integer,
								   tls boolean[] DEFAULT NULL)
RETURNS TABLE(location text, status text, level text, patient_id text, patient_name text,
			  study_instance_uid text, study_date text, series_instance_uid text,
			  sop_instance_uid text, modality text, description text, instances integer)
	AS 'MODULE_PATHNAME', 'mdd_find_spanning_sql' LANGUAGE C VOLATILE;

-- mdd._find, behind mdd.find (whose input and output columns share names,
-- which PL/pgSQL does not allow): one search over the local catalog ('local') and DICOM nodes,
-- queried at the same time.  nodes NULL: 'local' and every node that may be
-- queried (a host and port, and node option "find" not false); else the
-- nodes named, 'local' among them for the catalog.  Each node has its own
-- time limit (node option "find_timeout", else mdd.find_timeout), and
-- timeout bounds the whole call.  A node that fails or runs out of time
-- gives one row whose status says so; matches have status 'ok'.
-- What nodes answer is matched again by the catalog's rules, for the
-- attributes they return, since a node may ignore a key it does not
-- support.
CREATE FUNCTION mdd._find(find_patient_id text, find_patient_name text, find_study_date text,
						  find_modality text, find_study_instance_uid text,
						  find_accession_number text, find_level text, find_nodes text[],
						  find_timeout interval)
RETURNS TABLE(location text, status text, level text, patient_id text, patient_name text,
			  study_instance_uid text, study_date text, series_instance_uid text,
			  sop_instance_uid text, modality text, description text, instances integer)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	lvl text := upper(btrim(find_level));
	want_local boolean;
	names text[];
	aes text[];
	hosts text[];
	ports integer[];
	timeouts integer[];
	tls boolean[];
	total_ms numeric;
	default_ms integer;
	conds text[] := '{}';
	c text;
	missing text;
	n mdd.node;
	v text;
BEGIN
	IF lvl IS NULL OR lvl NOT IN ('STUDY', 'SERIES', 'IMAGE') THEN
		RAISE EXCEPTION 'unknown find level "%"', coalesce(find_level, '')
			USING ERRCODE = '22023', HINT = 'Use STUDY, SERIES or IMAGE.';
	END IF;
	total_ms := extract(epoch FROM coalesce(find_timeout, interval '10 s')) * 1000;
	IF total_ms <= 0 OR total_ms > 86400000 THEN
		RAISE EXCEPTION 'invalid find timeout "%"', find_timeout
			USING ERRCODE = '22023', HINT = 'Give a positive interval of at most a day.';
	END IF;
	FOREACH v IN ARRAY coalesce(string_to_array(find_study_date, '\'), '{}') LOOP
		IF v !~ '^([0-9]{8}|[0-9]{8}-|-[0-9]{8}|[0-9]{8}-[0-9]{8})$'
		   OR mdd._find_da(nullif(split_part(v, '-', 1), '')) IS NULL AND split_part(v, '-', 1) <> ''
		   OR mdd._find_da(nullif(split_part(v, '-', 2), '')) IS NULL AND split_part(v, '-', 2) <> '' THEN
			RAISE EXCEPTION 'invalid study date "%"', find_study_date
				USING ERRCODE = '22007',
					  HINT = 'Give a DICOM date YYYYMMDD or a range such as 20240101-20240131, -20240131 or 20240101-.';
		END IF;
	END LOOP;
	IF find_study_date LIKE '%\%' THEN
		RAISE EXCEPTION 'invalid study date "%"', find_study_date
			USING ERRCODE = '22007', HINT = 'Give one date or one range.';
	END IF;

	default_ms := extract(epoch FROM current_setting('mdd.find_timeout')::interval) * 1000;
	IF find_nodes IS NULL THEN
		want_local := true;
		SELECT coalesce(array_agg(x.name ORDER BY x.name), '{}') INTO names
		FROM mdd.node x
		WHERE x.host IS NOT NULL AND x.port IS NOT NULL
		  AND coalesce((x.options->>'find')::boolean, true);
	ELSE
		IF array_position(find_nodes, NULL) IS NOT NULL THEN
			RAISE EXCEPTION 'nodes must not contain NULL' USING ERRCODE = '22004';
		END IF;
		want_local := 'local' = ANY (find_nodes);
		SELECT string_agg(format('"%s"', u), ', ') INTO missing
		FROM unnest(find_nodes) u
		WHERE u <> 'local' AND NOT EXISTS (SELECT 1 FROM mdd.node x WHERE x.name = u);
		IF missing IS NOT NULL THEN
			RAISE EXCEPTION 'node % does not exist', missing
				USING ERRCODE = '42704', HINT = 'See mdd.nodes; ''local'' names the local catalog.';
		END IF;
		SELECT coalesce(array_agg(DISTINCT u ORDER BY u), '{}') INTO names
		FROM unnest(find_nodes) u WHERE u <> 'local';
		FOR n IN SELECT * FROM mdd.node x WHERE x.name = ANY (names) ORDER BY x.name LOOP
			IF n.host IS NULL OR n.port IS NULL THEN
				RAISE EXCEPTION 'node "%" has no host and port to query', n.name USING ERRCODE = '22023';
			END IF;
			IF NOT coalesce((n.options->>'find')::boolean, true) THEN
				RAISE EXCEPTION 'node "%" may not be queried', n.name
					USING ERRCODE = '42501', HINT = 'Its node option "find" is false.';
			END IF;
		END LOOP;
	END IF;
	SELECT coalesce(array_agg(x.ae_title ORDER BY x.name), '{}'),
		   coalesce(array_agg(x.host ORDER BY x.name), '{}'),
		   coalesce(array_agg(x.port ORDER BY x.name), '{}'),
		   coalesce(array_agg(coalesce(round((x.options->>'find_timeout')::numeric * 1000)::integer,
									   default_ms) ORDER BY x.name), '{}'),
		   coalesce(array_agg(coalesce((x.options->>'tls')::boolean, false) ORDER BY x.name), '{}')
	INTO aes, hosts, ports, timeouts, tls
	FROM mdd.node x WHERE x.name = ANY (names);

	PERFORM mdd._audit('find', NULL, find_patient_id,
					   concat_ws(', ', 'level ' || lvl,
								 'patient name ' || find_patient_name, 'study date ' || find_study_date,
								 'modality ' || find_modality, 'study ' || find_study_instance_uid,
								 'accession number ' || find_accession_number,
								 'in ' || array_to_string(CASE WHEN want_local THEN 'local'::text || names
															  ELSE names END, ', ')));

	-- the nodes' answers, matched again on what they returned
	FOREACH c IN ARRAY ARRAY[
		CASE WHEN find_patient_id IS NOT NULL THEN
			format('(r.patient_id IS NULL OR %s)', mdd._find_condition('r.patient_id', 'LO', find_patient_id)) END,
		CASE WHEN find_patient_name IS NOT NULL THEN
			format('(r.patient_name IS NULL OR %s)', mdd._find_condition('r.patient_name', 'PN', find_patient_name)) END,
		CASE WHEN find_study_date IS NOT NULL THEN
			format('(mdd._find_da(r.study_date) IS NULL OR %s)',
				   mdd._find_condition('mdd._find_da(r.study_date)', 'DA', find_study_date)) END,
		CASE WHEN find_study_instance_uid IS NOT NULL THEN
			format('(r.study_instance_uid IS NULL OR %s)',
				   mdd._find_condition('r.study_instance_uid', 'UI', find_study_instance_uid)) END,
		CASE WHEN find_modality IS NOT NULL AND lvl = 'STUDY' THEN
			format('(r.modality IS NULL OR %s)',
				   mdd._find_condition('string_to_array(r.modality, ''\'')', 'MODALITIES', find_modality))
			 WHEN find_modality IS NOT NULL THEN
			format('(r.modality IS NULL OR %s)', mdd._find_condition('r.modality', 'CS', find_modality)) END
	] LOOP
		IF c IS NOT NULL THEN
			conds := conds || c;
		END IF;
	END LOOP;

	RETURN QUERY EXECUTE format(
		'SELECT r.* FROM mdd._find_spanning($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) r '
		'WHERE r.location = ''local'' OR r.status <> ''ok'' OR (%s) '
		'ORDER BY r.location <> ''local'', r.location, r.status <> ''ok'', r.study_date, '
		'r.study_instance_uid, r.series_instance_uid, r.sop_instance_uid',
		coalesce(nullif(array_to_string(conds, ' AND '), ''), 'true'))
	USING lvl, find_patient_id, find_patient_name, find_study_date, find_modality,
		  find_study_instance_uid, find_accession_number, want_local, names, aes, hosts, ports,
		  timeouts, least(total_ms, 86400000)::integer, tls;
END;
$$;

-- mdd.find: the public name of mdd._find.
CREATE FUNCTION mdd.find(patient_id text DEFAULT NULL, patient_name text DEFAULT NULL,
						 study_date text DEFAULT NULL, modality text DEFAULT NULL,
						 study_instance_uid text DEFAULT NULL, accession_number text DEFAULT NULL,
						 level text DEFAULT 'STUDY', nodes text[] DEFAULT NULL,
						 timeout interval DEFAULT '10 s')
RETURNS TABLE(location text, status text, level text, patient_id text, patient_name text,
			  study_instance_uid text, study_date text, series_instance_uid text,
			  sop_instance_uid text, modality text, description text, instances integer)
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
	SELECT * FROM mdd._find($1, $2, $3, $4, $5, $6, $7, $8, $9)
$$;

-- mdd.patient_list: everything known about one patient, one row per
-- series (and per tier, when a series is partly archived) and per
-- document here, and with include_remote one row per series on each node
-- that may be queried (from mdd.find at SERIES level), or one row saying
-- why a node could not answer.
CREATE FUNCTION mdd.patient_list(patient_id text, include_remote boolean DEFAULT false)
RETURNS TABLE(location text, tier text, status text, kind text,
			  study_instance_uid text, study_date date, study_description text,
			  series_instance_uid text, modality text, series_description text,
			  document_id bigint, objects integer, bytes bigint)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF patient_list.patient_id IS NULL THEN
		RAISE EXCEPTION 'patient ID must not be NULL' USING ERRCODE = '22004';
	END IF;
	PERFORM mdd._audit('patient list', NULL, patient_list.patient_id,
					   CASE WHEN include_remote THEN 'with remote nodes' END);
	RETURN QUERY
	WITH here AS (
		SELECT 'local'::text AS location, o.tier, 'ok'::text AS status, o.kind,
			   st.study_instance_uid, st.study_date, st.study_description,
			   se.series_instance_uid, se.modality,
			   CASE WHEN o.kind = 'document' THEN max(coalesce(o.description, o.filename))
					ELSE se.series_description END AS series_description,
			   CASE WHEN o.kind = 'document' THEN o.id END AS document_id,
			   count(*)::integer AS objects, sum(o.size)::bigint AS bytes
		FROM mdd.patient p
		JOIN mdd.object o ON o.patient = p.id
		LEFT JOIN mdd.study st ON st.id = o.study
		LEFT JOIN mdd.series se ON se.id = o.series
		WHERE p.patient_id = patient_list.patient_id
		GROUP BY o.tier, o.kind, st.id, se.id, CASE WHEN o.kind = 'document' THEN o.id END
	), remote AS (
		SELECT f.location, NULL::text AS tier, f.status,
			   CASE WHEN f.status = 'ok' THEN 'dicom' END AS kind,
			   f.study_instance_uid, mdd._find_da(f.study_date), NULL::text,
			   f.series_instance_uid, f.modality, f.description, NULL::bigint,
			   f.instances, NULL::bigint
		FROM mdd.find(patient_id => patient_list.patient_id, level => 'SERIES') f
		WHERE include_remote AND f.location <> 'local'
	)
	SELECT * FROM (SELECT * FROM here UNION ALL SELECT * FROM remote) x
	ORDER BY x.study_date NULLS LAST, x.study_instance_uid, x.series_instance_uid,
			 x.location <> 'local', x.location, x.tier, x.document_id;
END;
$$;
