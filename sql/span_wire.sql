-- mdd: query spanning and move forwarding on the wire.  A C-FIND sent to
-- mdd's own AE is answered from the catalog first (sql/find.sql) and then
-- from every node whose option "span" is true, queried at the same time by
-- mdd.find's workers; a C-MOVE or C-GET for objects the catalog does not
-- hold has them fetched from the span node that answers for them (a
-- retrieve job, sql/fetch.sql) before they are passed on.  The calling
-- node itself is never asked, so that two archives spanning each other do
-- not query in a loop.

-- The nodes spanned for a query or retrieval from calling_ae, by name.
CREATE FUNCTION mdd._span_nodes(calling_ae text) RETURNS text[]
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
	SELECT coalesce(array_agg(n.name ORDER BY n.name), '{}')
	FROM mdd.node n
	WHERE coalesce((n.options->>'span')::boolean, false)
	  AND coalesce((n.options->>'find')::boolean, true)
	  AND n.host IS NOT NULL AND n.port IS NOT NULL
	  AND n.ae_title <> coalesce(calling_ae, '')
	  AND n.ae_title <> current_setting('mdd.ae_title')
$$;

-- How long a spanned query may take: the longest time limit of the nodes
-- (node option "find_timeout", else mdd.find_timeout), and a second more.
CREATE FUNCTION mdd._span_timeout(nodes text[]) RETURNS interval
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
	SELECT make_interval(secs => coalesce(max(coalesce((n.options->>'find_timeout')::numeric,
													   extract(epoch FROM current_setting('mdd.find_timeout')::interval))),
										  0)::double precision + 1)
	FROM mdd.node n WHERE n.name = ANY (nodes)
$$;

-- A key of an identifier as a filter of mdd.find: NULL when empty or '*'.
CREATE FUNCTION mdd._span_filter(keys jsonb, keyword text) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
	SELECT nullif(nullif(btrim(keys->>keyword), ''), '*')
$$;

-- Whether a UID matches the UID key of an identifier (a list with '\').
CREATE FUNCTION mdd._span_uid_matches(uid text, keys jsonb, keyword text) RETURNS boolean
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
	SELECT mdd._span_filter(keys, keyword) IS NULL
		OR uid = ANY (string_to_array(mdd._span_filter(keys, keyword), '\'))
$$;

-- The span nodes' matches of an identifier at STUDY, SERIES or IMAGE
-- level, each at most once (the first node by name that has it), leaving
-- out what the catalog holds (the local answers have it).  Keys mdd.find
-- has no filter for (Series and SOP Instance UIDs) are matched here.
-- A node that failed gives a row with its status and no match.
CREATE FUNCTION mdd._span_matches(calling_ae text, level text, keys jsonb)
RETURNS TABLE(node text, ae_title text, status text, patient_id text, patient_name text,
			  study_instance_uid text, study_date text, series_instance_uid text,
			  sop_instance_uid text, modality text, description text, instances integer)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	nodes text[] := mdd._span_nodes(calling_ae);
	r record;
	last_uid text;
	uid text;
BEGIN
	IF _span_matches.level NOT IN ('STUDY', 'SERIES', 'IMAGE') OR cardinality(nodes) = 0 THEN
		RETURN;
	END IF;
	FOR r IN
		SELECT f.*, n.ae_title AS node_ae,
			   CASE _span_matches.level WHEN 'STUDY' THEN f.study_instance_uid
						  WHEN 'SERIES' THEN f.series_instance_uid
						  ELSE f.sop_instance_uid END AS level_uid
		FROM mdd._find(mdd._span_filter(keys, 'PatientID'), mdd._span_filter(keys, 'PatientName'),
					   mdd._span_filter(keys, 'StudyDate'),
					   mdd._span_filter(keys, CASE _span_matches.level WHEN 'STUDY' THEN 'ModalitiesInStudy' ELSE 'Modality' END),
					   mdd._span_filter(keys, 'StudyInstanceUID'), mdd._span_filter(keys, 'AccessionNumber'),
					   _span_matches.level, nodes, mdd._span_timeout(nodes)) f
		JOIN mdd.node n ON n.name = f.location
		ORDER BY f.status = 'ok', level_uid, f.location
	LOOP
		IF r.status <> 'ok' THEN
			RAISE LOG 'mdd: C-FIND spanning for "%": node "%" gave no answers: %', calling_ae, r.location, r.status;
			RETURN QUERY SELECT r.location, r.node_ae, r.status, NULL::text, NULL::text, NULL::text,
								NULL::text, NULL::text, NULL::text, NULL::text, NULL::text, NULL::integer;
			CONTINUE;
		END IF;
		uid := r.level_uid;
		IF uid IS NULL OR uid = last_uid
		   OR NOT mdd._span_uid_matches(r.series_instance_uid, keys, 'SeriesInstanceUID') AND _span_matches.level <> 'STUDY'
		   OR NOT mdd._span_uid_matches(r.sop_instance_uid, keys, 'SOPInstanceUID') AND _span_matches.level = 'IMAGE' THEN
			CONTINUE;
		END IF;
		last_uid := uid;
		IF _span_matches.level = 'STUDY' AND EXISTS (SELECT 1 FROM mdd.study s WHERE s.study_instance_uid = uid)
		   OR _span_matches.level = 'SERIES' AND EXISTS (SELECT 1 FROM mdd.series s WHERE s.series_instance_uid = uid)
		   OR _span_matches.level = 'IMAGE' AND EXISTS (SELECT 1 FROM mdd.object o WHERE o.sop_instance_uid = uid) THEN
			CONTINUE;
		END IF;
		RETURN QUERY SELECT r.location, r.node_ae, r.status, r.patient_id, r.patient_name,
							r.study_instance_uid, r.study_date, r.series_instance_uid,
							r.sop_instance_uid, r.modality, r.description, r.instances;
	END LOOP;
END;
$$;

-- mdd._dicom_find_remote(calling_ae, level, keys): the span nodes' part of
-- a C-FIND answer, as mdd._dicom_find gives the local part: first the
-- keywords answered (those asked that mdd.find returns, the level's unique
-- key, and RetrieveAETitle, the node's AE title), then one row of values
-- per match.  Patient Root queries at PATIENT level are not spanned.
CREATE FUNCTION mdd._dicom_find_remote(calling_ae text, level text, keys jsonb) RETURNS SETOF text[]
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	names text[] := '{}';
	k text;
	r record;
	row text[];
	unique_key text := CASE level WHEN 'STUDY' THEN 'StudyInstanceUID' WHEN 'SERIES' THEN 'SeriesInstanceUID'
								  WHEN 'IMAGE' THEN 'SOPInstanceUID' END;
	answered text[] := ARRAY['PatientID', 'PatientName', 'StudyInstanceUID', 'StudyDate',
							 'SeriesInstanceUID', 'SOPInstanceUID', 'Modality', 'ModalitiesInStudy',
							 'StudyDescription', 'SeriesDescription',
							 'NumberOfStudyRelatedInstances', 'NumberOfSeriesRelatedInstances'];
BEGIN
	FOR k IN SELECT jsonb_object_keys(keys) LOOP
		IF k = ANY (answered) THEN
			names := names || k;
		END IF;
	END LOOP;
	IF unique_key IS NOT NULL AND NOT unique_key = ANY (names) THEN
		names := names || unique_key;
	END IF;
	names := names || 'RetrieveAETitle'::text;
	RETURN NEXT names;
	FOR r IN SELECT * FROM mdd._span_matches(calling_ae, level, keys) m WHERE m.status = 'ok' LOOP
		row := '{}';
		FOREACH k IN ARRAY names LOOP
			row := row || CASE k
				WHEN 'PatientID' THEN r.patient_id
				WHEN 'PatientName' THEN r.patient_name
				WHEN 'StudyInstanceUID' THEN r.study_instance_uid
				WHEN 'StudyDate' THEN r.study_date
				WHEN 'SeriesInstanceUID' THEN CASE WHEN level <> 'STUDY' THEN r.series_instance_uid END
				WHEN 'SOPInstanceUID' THEN CASE WHEN level = 'IMAGE' THEN r.sop_instance_uid END
				WHEN 'Modality' THEN CASE WHEN level <> 'STUDY' THEN r.modality END
				WHEN 'ModalitiesInStudy' THEN CASE WHEN level = 'STUDY' THEN r.modality END
				WHEN 'StudyDescription' THEN CASE WHEN level = 'STUDY' THEN r.description END
				WHEN 'SeriesDescription' THEN CASE WHEN level = 'SERIES' THEN r.description END
				WHEN 'NumberOfStudyRelatedInstances' THEN CASE WHEN level = 'STUDY' THEN r.instances::text END
				WHEN 'NumberOfSeriesRelatedInstances' THEN CASE WHEN level = 'SERIES' THEN r.instances::text END
				WHEN 'RetrieveAETitle' THEN r.ae_title
			END;
		END LOOP;
		RETURN NEXT row;
	END LOOP;
END;
$$;

-- Move forwarding, step one: for the UIDs a C-MOVE or C-GET identifier
-- names at its level (StudyInstanceUID at STUDY; SeriesInstanceUID, within
-- one study, at SERIES; SOPInstanceUID, within one series, at IMAGE) that
-- the catalog does not hold, find the span node that has them and queue a
-- retrieve job for each (its C-FIND lists the instances to expect).
-- Returns the jobs; none when everything is here, nothing is spanned, or
-- the identifier names no UIDs (a relational or PATIENT level request is
-- served from the catalog only).
CREATE FUNCTION mdd._forward_queue(calling_ae text, level text, keys jsonb) RETURNS bigint[]
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	nodes text[] := mdd._span_nodes(calling_ae);
	study text := mdd._span_filter(keys, 'StudyInstanceUID');
	series text := mdd._span_filter(keys, 'SeriesInstanceUID');
	wanted text[];
	missing text[];
	jobs bigint[] := '{}';
	r record;
BEGIN
	IF level NOT IN ('STUDY', 'SERIES', 'IMAGE') OR cardinality(nodes) = 0 OR study IS NULL
	   OR level <> 'STUDY' AND study LIKE '%\%'
	   OR level = 'IMAGE' AND (series IS NULL OR series LIKE '%\%') THEN
		RETURN jobs;
	END IF;
	wanted := string_to_array(mdd._span_filter(keys, CASE level WHEN 'STUDY' THEN 'StudyInstanceUID'
															   WHEN 'SERIES' THEN 'SeriesInstanceUID'
															   ELSE 'SOPInstanceUID' END), '\');
	IF wanted IS NULL OR EXISTS (SELECT 1 FROM unnest(wanted) u WHERE u ~ '[*?]') THEN
		RETURN jobs;
	END IF;
	SELECT array_agg(u) INTO missing FROM unnest(wanted) u
	WHERE NOT CASE level
		WHEN 'STUDY' THEN EXISTS (SELECT 1 FROM mdd.study s WHERE s.study_instance_uid = u)
		WHEN 'SERIES' THEN EXISTS (SELECT 1 FROM mdd.series s WHERE s.series_instance_uid = u)
		ELSE EXISTS (SELECT 1 FROM mdd.object o WHERE o.sop_instance_uid = u) END;
	IF missing IS NULL THEN
		RETURN jobs;
	END IF;
	FOR r IN
		SELECT DISTINCT ON (m.uid) m.node, m.uid, m.study_instance_uid, m.series_instance_uid
		FROM (SELECT s.*, CASE level WHEN 'STUDY' THEN s.study_instance_uid
									 WHEN 'SERIES' THEN s.series_instance_uid
									 ELSE s.sop_instance_uid END AS uid
			  FROM mdd._span_matches(calling_ae, level,
									 jsonb_build_object('StudyInstanceUID', CASE WHEN level = 'STUDY'
																				 THEN array_to_string(missing, '\')
																				 ELSE study END)
									 || CASE WHEN level = 'IMAGE' THEN jsonb_build_object('SeriesInstanceUID', series)
											 ELSE '{}' END) s
			  WHERE s.status = 'ok') m
		WHERE m.uid = ANY (missing)
		ORDER BY m.uid, m.node
	LOOP
		jobs := jobs || mdd.retrieve(r.node, r.study_instance_uid,
									 CASE WHEN level <> 'STUDY' THEN r.series_instance_uid END,
									 CASE WHEN level = 'IMAGE' THEN r.uid END);
	END LOOP;
	IF cardinality(jobs) > 0 THEN
		PERFORM mdd._audit('forward', NULL, NULL,
						   format('%s level %s for %s: %s not here, retrieve jobs %s',
								  'C-MOVE/C-GET', level, calling_ae, array_to_string(missing, ', '),
								  array_to_string(jobs, ', ')));
	END IF;
	RETURN jobs;
END;
$$;

-- Move forwarding, step two (after the jobs ended or the wait ran out):
-- the SOP Instance UIDs the jobs were to bring that are still not here,
-- which the C-MOVE or C-GET counts as failed sub-operations.  A job that
-- failed before it could list the node's instances counts the instance it
-- asked for, when it asked for one.
CREATE FUNCTION mdd._forward_missing(jobs bigint[]) RETURNS text[]
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
	SELECT coalesce(array_agg(DISTINCT u), '{}') FROM (
		SELECT ji.sop_instance_uid AS u
		FROM mdd.job_instance ji
		WHERE ji.job = ANY (jobs)
		  AND NOT EXISTS (SELECT 1 FROM mdd.object o WHERE o.sop_instance_uid = ji.sop_instance_uid)
		UNION ALL
		SELECT j.request->>'instance'
		FROM mdd.job j
		WHERE j.id = ANY (jobs) AND j.request ? 'instance'
		  AND NOT EXISTS (SELECT 1 FROM mdd.job_instance ji WHERE ji.job = j.id)
		  AND NOT EXISTS (SELECT 1 FROM mdd.object o WHERE o.sop_instance_uid = j.request->>'instance')
	) x
$$;

-- Move forwarding: wait for the jobs of mdd._forward_queue to end, at most
-- timeout; the jobs that did not end go on (what they bring is archived).
CREATE FUNCTION mdd._forward_wait(jobs bigint[], timeout interval) RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	deadline timestamptz := clock_timestamp() + timeout;
	running integer;
BEGIN
	LOOP
		SELECT count(*) INTO running FROM mdd.job j
		WHERE j.id = ANY (jobs) AND j.state NOT IN ('done', 'failed', 'cancelled');
		IF running = 0 OR clock_timestamp() >= deadline THEN
			RETURN running;
		END IF;
		PERFORM pg_sleep(0.05);
	END LOOP;
END;
$$;

-- Move forwarding with mdd.forward_keep off: once the C-MOVE or C-GET has
-- been answered, remove the objects its jobs brought that were not here
-- before, unless something else has taken them up meanwhile (a job item,
-- a delivery record, a copy still being made): their copies (blobs, then
-- rows), the object, and the series and study left empty, with the
-- counts kept right.  Returns how many objects were removed.
CREATE FUNCTION mdd._forward_release(jobs bigint[]) RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	o mdd.object;
	c record;
	removed integer := 0;
BEGIN
	FOR o IN
		SELECT ob.* FROM mdd.object ob
		WHERE ob.id IN (SELECT ji.object FROM mdd.job_instance ji
						WHERE ji.job = ANY (jobs) AND NOT ji.present_before AND ji.object IS NOT NULL)
		  AND NOT EXISTS (SELECT 1 FROM mdd.job_item i WHERE i.object = ob.id)
		  AND NOT EXISTS (SELECT 1 FROM mdd.delivered d WHERE d.object = ob.id)
		  AND NOT EXISTS (SELECT 1 FROM mdd.copy cp WHERE cp.object = ob.id AND cp.state <> 'present')
		ORDER BY ob.id
		FOR UPDATE OF ob
	LOOP
		-- the rows go first: a blob whose row is gone is garbage, a row
		-- whose blob is gone would be a lost object
		FOR c IN SELECT cp.locator, s FROM mdd.copy cp JOIN mdd.storage s ON s.id = cp.storage
				 WHERE cp.object = o.id LOOP
			DELETE FROM mdd.copy cp WHERE cp.object = o.id AND cp.locator = c.locator;
			PERFORM mdd._delete(c.s, c.locator, true);
		END LOOP;
		UPDATE mdd.job_instance ji SET object = NULL WHERE ji.object = o.id;
		DELETE FROM mdd.object ob WHERE ob.id = o.id;
		UPDATE mdd.series se SET object_count = se.object_count - 1 WHERE se.id = o.series;
		UPDATE mdd.study st SET object_count = st.object_count - 1 WHERE st.id = o.study;
		IF NOT EXISTS (SELECT 1 FROM mdd.object x WHERE x.series = o.series) THEN
			DELETE FROM mdd.series se WHERE se.id = o.series;
			UPDATE mdd.study st
			SET series_count = st.series_count - 1,
				modalities = coalesce((SELECT array_agg(DISTINCT se.modality ORDER BY se.modality)
									   FROM mdd.series se WHERE se.study = st.id AND se.modality IS NOT NULL), '{}')
			WHERE st.id = o.study;
		END IF;
		IF NOT EXISTS (SELECT 1 FROM mdd.object x WHERE x.study = o.study) THEN
			DELETE FROM mdd.study st WHERE st.id = o.study;
		END IF;
		removed := removed + 1;
	END LOOP;
	IF removed > 0 THEN
		PERFORM mdd._audit('forward released', NULL, NULL,
						   format('%s objects fetched for forwarding removed (mdd.forward_keep off), jobs %s',
								  removed, array_to_string(jobs, ', ')));
	END IF;
	RETURN removed;
END;
$$;
