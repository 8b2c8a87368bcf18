-- mdd: DICOMweb (PS3.18) in SQL: the search of QIDO-RS over the catalog,
-- with the matching of the C-FIND service (mdd._match_query), and the
-- objects a WADO-RS retrieval sends.  The HTTP worker (bgworker/dicomweb*.c)
-- turns the answers into DICOM JSON and multipart bodies.

-- The query keys the catalog answers (those of mdd._find_attribute):
-- keyword, catalog expression, value representation and level (0 PATIENT
-- to 3 IMAGE).
CREATE FUNCTION mdd._find_attributes(OUT keyword text, OUT expr text, OUT vr text, OUT lvl int)
RETURNS SETOF record
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
	SELECT k, a.expr, a.vr, a.lvl
	FROM unnest(ARRAY['PatientID', 'PatientName', 'PatientBirthDate', 'PatientSex',
					  'NumberOfPatientRelatedStudies', 'NumberOfPatientRelatedSeries',
					  'NumberOfPatientRelatedInstances', 'StudyInstanceUID', 'StudyDate', 'StudyTime',
					  'AccessionNumber', 'StudyID', 'StudyDescription', 'ReferringPhysicianName',
					  'ModalitiesInStudy', 'NumberOfStudyRelatedSeries', 'NumberOfStudyRelatedInstances',
					  'SeriesInstanceUID', 'Modality', 'SeriesNumber', 'SeriesDescription', 'SeriesDate',
					  'BodyPartExamined', 'FrameOfReferenceUID', 'NumberOfSeriesRelatedInstances',
					  'SOPInstanceUID', 'SOPClassUID', 'InstanceNumber', 'NumberOfFrames',
					  'ContentDate']) AS k
	CROSS JOIN LATERAL mdd._find_attribute(k) a
	WHERE a.expr IS NOT NULL
$$;

-- A value of the jsonb header as C-FIND text: strings and numbers as they
-- are, arrays of them joined by backslashes; NULL for sequences and nulls.
CREATE FUNCTION mdd._header_text(v jsonb) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
	SELECT CASE jsonb_typeof(v)
		WHEN 'string' THEN v #>> '{}'
		WHEN 'number' THEN v::text
		WHEN 'array' THEN
			CASE WHEN NOT EXISTS (SELECT 1 FROM jsonb_array_elements(v) e
								  WHERE jsonb_typeof(e) NOT IN ('string', 'number', 'null'))
				 THEN (SELECT string_agg(coalesce(e #>> '{}', ''), '\' ORDER BY n)
					   FROM jsonb_array_elements(v) WITH ORDINALITY AS x(e, n)) END
	END
$$;

-- The attributes a search answers by default at a level (1 STUDY, 2
-- SERIES, 3 IMAGE), after PS3.18's tables of study, series and instance
-- attributes; with parents, those of the levels above as well.  The UIDs
-- of the levels above are always there (retrieve URLs are built from
-- them).
CREATE FUNCTION mdd._dicomweb_default_keys(lvl int, parents boolean) RETURNS text[]
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
	SELECT CASE WHEN lvl = 1 OR parents THEN
			ARRAY['StudyDate', 'StudyTime', 'AccessionNumber', 'ModalitiesInStudy',
				  'ReferringPhysicianName', 'PatientName', 'PatientID', 'PatientBirthDate',
				  'PatientSex', 'StudyID', 'StudyDescription', 'NumberOfStudyRelatedSeries',
				  'NumberOfStudyRelatedInstances']
			ELSE '{}' END
		|| ARRAY['StudyInstanceUID']
		|| CASE WHEN lvl = 2 OR (lvl = 3 AND parents) THEN
			ARRAY['Modality', 'SeriesDescription', 'SeriesNumber', 'SeriesDate',
				  'BodyPartExamined', 'NumberOfSeriesRelatedInstances']
			ELSE '{}' END
		|| CASE WHEN lvl >= 2 THEN ARRAY['SeriesInstanceUID'] ELSE '{}' END
		|| CASE WHEN lvl = 3 THEN
			ARRAY['SOPClassUID', 'SOPInstanceUID', 'InstanceNumber', 'Rows', 'Columns',
				  'BitsAllocated', 'NumberOfFrames']
			ELSE '{}' END
		|| ARRAY['InstanceAvailability']
$$;

-- The SQL expression answering an attribute the catalog has no column for
-- at a level: InstanceAvailability from the tiers, other attributes from
-- the jsonb header of the object (IMAGE) or of the first object of the
-- series or study.  NULL when there is none (an attribute of a lower
-- level, or RetrieveURL, which the HTTP worker writes).
CREATE FUNCTION mdd._dicomweb_expression(keyword text, lvl int) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
	SELECT CASE
		WHEN keyword IN ('RetrieveURL', 'SpecificCharacterSet', 'all') THEN NULL
		WHEN keyword = 'InstanceAvailability' THEN
			CASE lvl
				WHEN 3 THEN 'CASE o.tier WHEN ''online'' THEN ''ONLINE'' ELSE ''NEARLINE'' END'
				WHEN 2 THEN 'CASE WHEN EXISTS (SELECT 1 FROM mdd.object x WHERE x.series = se.id'
							|| ' AND x.tier <> ''online'') THEN ''NEARLINE'' ELSE ''ONLINE'' END'
				ELSE 'CASE WHEN EXISTS (SELECT 1 FROM mdd.object x WHERE x.study = st.id'
					 || ' AND x.tier <> ''online'') THEN ''NEARLINE'' ELSE ''ONLINE'' END'
			END
		WHEN keyword !~ '^[A-Za-z][A-Za-z0-9]*$' THEN NULL
		WHEN lvl = 3 THEN format('mdd._header_text(o.header -> %L)', keyword)
		WHEN lvl = 2 THEN format('(SELECT mdd._header_text(x.header -> %L) FROM mdd.object x'
								 ' WHERE x.series = se.id ORDER BY x.id LIMIT 1)', keyword)
		ELSE format('(SELECT mdd._header_text(x.header -> %L) FROM mdd.object x'
					' WHERE x.study = st.id ORDER BY x.id LIMIT 1)', keyword)
	END
$$;

-- The level of a search (1 STUDY, 2 SERIES, 3 IMAGE or INSTANCE).
CREATE FUNCTION mdd._dicomweb_level(level text) RETURNS int
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	lvl int := array_position(ARRAY['STUDY', 'SERIES', 'IMAGE'],
							  CASE upper(level) WHEN 'INSTANCE' THEN 'IMAGE' ELSE upper(level) END);
BEGIN
	IF lvl IS NULL THEN
		RAISE EXCEPTION 'unknown search level "%"', coalesce(level, '')
			USING ERRCODE = '22023', HINT = 'Use STUDY, SERIES or INSTANCE.';
	END IF;
	RETURN lvl;
END;
$$;

-- mdd.dicom_search(level, filters, includefield, limit, offset, parents):
-- the DICOMweb search (QIDO-RS) over the catalog.  filters maps keywords
-- to values matched as C-FIND matches them (wildcards * and ?, date and
-- time ranges, lists of UIDs, modalities in study; an empty value only
-- asks for the attribute); includefield names more attributes to answer
-- ('all': every one the level has).  Each match is a jsonb object from
-- keyword to text (several values separated by backslashes) or null, in
-- catalog order.  Filters on attributes the catalog cannot match are
-- ignored (mdd.dicom_search_ignored lists them) but still answered.
CREATE FUNCTION mdd.dicom_search(level text, filters jsonb DEFAULT '{}', includefield text[] DEFAULT NULL,
								 match_limit integer DEFAULT NULL, match_offset integer DEFAULT 0,
								 parents boolean DEFAULT false)
RETURNS SETOF jsonb
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	lv int := mdd._dicomweb_level(level);
	keys jsonb := '{}';
	names text[] := '{}';
	exprs text[] := '{}';
	wanted text[];
	whole_header boolean := false;
	q record;
	parts text[] := '{}';
	pairs text[] := '{}';
BEGIN
	IF coalesce(match_limit, 0) < 0 OR coalesce(match_offset, 0) < 0 THEN
		RAISE EXCEPTION 'limit and offset must not be negative' USING ERRCODE = '22023';
	END IF;
	IF filters IS NOT NULL AND jsonb_typeof(filters) <> 'object' THEN
		RAISE EXCEPTION 'filters must be a JSON object of keywords and values' USING ERRCODE = '22023';
	END IF;
	wanted := mdd._dicomweb_default_keys(lv, coalesce(parents, false)) || coalesce(includefield, '{}');
	IF 'all' = ANY (coalesce(includefield, '{}')) THEN
		wanted := wanted || ARRAY(SELECT f.keyword FROM mdd._find_attributes() f
								  WHERE f.lvl <= lv AND (f.lvl = lv OR parents OR f.lvl <= 1));
		whole_header := lv = 3;
	END IF;
	-- in one pass over the attribute table (a call per key costs more than
	-- the search): the catalog's keys of the level match (a filter's value)
	-- or are answered (''); the others are answered from elsewhere
	WITH asked AS (
		SELECT f.key AS k, f.value AS v, 0 AS pri, f.n FROM jsonb_each_text(coalesce(filters, '{}'))
			WITH ORDINALITY AS f(key, value, n)
		UNION ALL
		SELECT w, '', 1, 1000000 + w.n FROM unnest(wanted) WITH ORDINALITY AS w(w, n)
	), attributes AS (
		SELECT * FROM mdd._find_attributes()
	), catalog AS (
		SELECT DISTINCT ON (a.k) a.k, coalesce(a.v, '') AS v
		FROM asked a JOIN attributes t ON t.keyword = a.k AND t.lvl <= lv
		ORDER BY a.k, a.pri
	), other AS (
		SELECT DISTINCT ON (a.k) a.k, a.n, mdd._dicomweb_expression(a.k, lv) AS e
		FROM asked a
		WHERE NOT EXISTS (SELECT 1 FROM attributes t WHERE t.keyword = a.k)
		ORDER BY a.k, a.n
	)
	SELECT (SELECT coalesce(jsonb_object_agg(c.k, c.v), '{}') FROM catalog c),
		   (SELECT coalesce(array_agg(o.k ORDER BY o.n), '{}') FROM other o WHERE o.e IS NOT NULL),
		   (SELECT coalesce(array_agg(o.e ORDER BY o.n), '{}') FROM other o WHERE o.e IS NOT NULL)
	INTO keys, names, exprs;

	q := mdd._match_query('STUDY', (ARRAY['STUDY', 'SERIES', 'IMAGE'])[lv], keys, false);
	names := q.names || names;
	exprs := q.exprs || exprs;
	-- jsonb_build_object takes at most 100 arguments: 40 attributes a call
	FOR i IN 1 .. coalesce(array_length(names, 1), 0) LOOP
		pairs := pairs || format('%L, %s', names[i], exprs[i]);
		IF array_length(pairs, 1) = 40 OR i = array_length(names, 1) THEN
			parts := parts || format('jsonb_build_object(%s)', array_to_string(pairs, ', '));
			pairs := '{}';
		END IF;
	END LOOP;
	IF whole_header THEN
		parts := ARRAY['coalesce((SELECT jsonb_object_agg(h.key, mdd._header_text(h.value))'
					   ' FROM jsonb_each(o.header) h WHERE mdd._header_text(h.value) IS NOT NULL), ''{}'')']
				 || parts;
	END IF;
	RETURN QUERY EXECUTE format('SELECT %s %s ORDER BY %s LIMIT %s OFFSET %s',
								array_to_string(parts, ' || '), q.from_where,
								(ARRAY['st.id', 'se.id', 'o.id'])[lv],
								coalesce(match_limit::text, 'ALL'), coalesce(match_offset, 0));
END;
$$;
COMMENT ON FUNCTION mdd.dicom_search(text, jsonb, text[], integer, integer, boolean) IS
	'DICOMweb search (QIDO-RS) over the catalog: one jsonb object of attributes per matching study, series or instance';

-- The filters of a search that mdd.dicom_search cannot match on at this
-- level (it ignores them), in the order given.
CREATE FUNCTION mdd.dicom_search_ignored(level text, filters jsonb) RETURNS text[]
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	lv int := mdd._dicomweb_level(level);
BEGIN
	RETURN ARRAY(
		SELECT f.key FROM jsonb_each_text(coalesce(filters, '{}')) WITH ORDINALITY AS f(key, value, n)
		LEFT JOIN LATERAL mdd._find_attribute(f.key) a ON true
		WHERE btrim(coalesce(f.value, '')) NOT IN ('', '*')
		  AND (a.expr IS NULL OR a.lvl > lv
			   OR (a.vr = 'IS' AND a.expr ~ '^\('))
		ORDER BY f.n);
END;
$$;
COMMENT ON FUNCTION mdd.dicom_search_ignored(text, jsonb) IS
	'The filters of a DICOMweb search that mdd.dicom_search does not match on at that level';

-- mdd.dicom_instances(study, series, instance): the DICOM objects of a
-- study, of one of its series, or one instance, in the order a WADO-RS
-- retrieval sends them (series by series, in the order they arrived).
CREATE FUNCTION mdd.dicom_instances(study text, series text DEFAULT NULL, instance text DEFAULT NULL)
RETURNS TABLE(object_id bigint, patient_id text, study_instance_uid text, series_instance_uid text,
			  sop_instance_uid text, sop_class_uid text, transfer_syntax_uid text, size bigint,
			  number_of_frames integer, tier text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
	SELECT o.id, p.patient_id, st.study_instance_uid, se.series_instance_uid, o.sop_instance_uid,
		   o.sop_class_uid, o.transfer_syntax_uid, o.size, o.number_of_frames, o.tier
	FROM mdd.study st
	JOIN mdd.patient p ON p.id = st.patient
	JOIN mdd.series se ON se.study = st.id
	JOIN mdd.object o ON o.series = se.id
	WHERE st.study_instance_uid = dicom_instances.study
	  AND (dicom_instances.series IS NULL OR se.series_instance_uid = dicom_instances.series)
	  AND (dicom_instances.instance IS NULL OR o.sop_instance_uid = dicom_instances.instance)
	  AND o.kind = 'dicom'
	ORDER BY se.id, o.id
$$;
COMMENT ON FUNCTION mdd.dicom_instances(text, text, text) IS
	'The DICOM objects of a study, a series of it, or one instance, in WADO-RS order';
