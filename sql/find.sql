-- mdd: query matching for the DICOM C-FIND service (Patient Root and Study
-- Root, levels PATIENT / STUDY / SERIES / IMAGE) over the catalog

-- The catalog expression, value representation and level of each query key.
CREATE FUNCTION mdd._find_attribute(keyword text, OUT expr text, OUT vr text, OUT lvl int)
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
	SELECT a.expr, a.vr, a.lvl FROM (VALUES
		('PatientID', 'p.patient_id', 'LO', 0),
		('PatientName', 'p.patient_name', 'PN', 0),
		('PatientBirthDate', 'p.birth_date', 'DA', 0),
		('PatientSex', 'p.sex', 'CS', 0),
		('NumberOfPatientRelatedStudies',
		 '(SELECT count(*) FROM mdd.study x WHERE x.patient = p.id)', 'IS', 0),
		('NumberOfPatientRelatedSeries',
		 '(SELECT sum(x.series_count) FROM mdd.study x WHERE x.patient = p.id)', 'IS', 0),
		('NumberOfPatientRelatedInstances',
		 '(SELECT sum(x.object_count) FROM mdd.study x WHERE x.patient = p.id)', 'IS', 0),
		('StudyInstanceUID', 'st.study_instance_uid', 'UI', 1),
		('StudyDate', 'st.study_date', 'DA', 1),
		('StudyTime', 'st.study_time', 'TM', 1),
		('AccessionNumber', 'st.accession_number', 'SH', 1),
		('StudyID', 'st.study_id', 'SH', 1),
		('StudyDescription', 'st.study_description', 'LO', 1),
		('ReferringPhysicianName', 'st.referring_physician', 'PN', 1),
		('ModalitiesInStudy', 'st.modalities', 'MODALITIES', 1),
		('NumberOfStudyRelatedSeries', 'st.series_count', 'IS', 1),
		('NumberOfStudyRelatedInstances', 'st.object_count', 'IS', 1),
		('SeriesInstanceUID', 'se.series_instance_uid', 'UI', 2),
		('Modality', 'se.modality', 'CS', 2),
		('SeriesNumber', 'se.series_number', 'IS', 2),
		('SeriesDescription', 'se.series_description', 'LO', 2),
		('SeriesDate', 'se.series_date', 'DA', 2),
		('BodyPartExamined', 'se.body_part_examined', 'CS', 2),
		('FrameOfReferenceUID', 'se.frame_of_reference_uid', 'UI', 2),
		('NumberOfSeriesRelatedInstances', 'se.object_count', 'IS', 2),
		('SOPInstanceUID', 'o.sop_instance_uid', 'UI', 3),
		('SOPClassUID', 'o.sop_class_uid', 'UI', 3),
		('InstanceNumber', 'o.instance_number', 'IS', 3),
		('NumberOfFrames', 'o.number_of_frames', 'IS', 3),
		('ContentDate', 'o.content_date', 'DA', 3)
	) AS a(keyword, expr, vr, lvl)
	WHERE a.keyword = _find_attribute.keyword
$$;

-- a DICOM date (YYYYMMDD, or YYYY.MM.DD) as an SQL date literal, or NULL
CREATE FUNCTION mdd._find_date(value text) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
	SELECT CASE WHEN replace(value, '.', '') ~ '^[0-9]{8}$'
				THEN quote_literal(to_date(replace(value, '.', ''), 'YYYYMMDD')::text) || '::date' END
$$;

-- a DICOM time (HH, HHMM, HHMMSS[.F]) as an SQL time literal, or NULL
CREATE FUNCTION mdd._find_time(value text) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
	SELECT CASE WHEN v ~ '^[0-9]{2}([0-9]{2}([0-9]{2}(\.[0-9]{1,6})?)?)?$'
				THEN quote_literal(substr(v, 1, 2) || ':' || coalesce(nullif(substr(v, 3, 2), ''), '00')
								   || ':' || coalesce(nullif(substr(v, 5), ''), '00')) || '::time' END
	FROM (SELECT replace(value, ':', '') AS v) x
$$;

-- The SQL condition for one key of a C-FIND identifier (NULL: matches all).
CREATE FUNCTION mdd._find_condition(expr text, vr text, value text) RETURNS text
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	lo text;
	hi text;
	pattern text;
	conv text;
BEGIN
	value := btrim(value);
	IF value IS NULL OR value = '' OR value = '*' OR vr = 'IS' AND expr ~ '^\(' THEN
		RETURN NULL;
	END IF;
	CASE vr
	WHEN 'UI' THEN
		RETURN format('%s = ANY (%L::text[])', expr, string_to_array(value, '\'));
	WHEN 'DA', 'TM' THEN
		conv := CASE vr WHEN 'DA' THEN 'mdd._find_date' ELSE 'mdd._find_time' END;
		IF position('-' IN value) > 0 THEN
			lo := nullif(split_part(value, '-', 1), '');
			hi := nullif(split_part(value, '-', 2), '');
			EXECUTE format('SELECT %s($1), %s($2)', conv, conv) INTO lo, hi USING lo, hi;
			RETURN concat_ws(' AND ', CASE WHEN lo IS NOT NULL THEN format('%s >= %s', expr, lo) END,
							 CASE WHEN hi IS NOT NULL THEN format('%s <= %s', expr, hi) END,
							 CASE WHEN lo IS NULL AND hi IS NULL THEN 'false' END);
		END IF;
		EXECUTE format('SELECT %s($1)', conv) INTO lo USING value;
		RETURN coalesce(format('%s = %s', expr, lo), 'false');
	WHEN 'MODALITIES' THEN
		RETURN format('%s && %L::text[]', expr, string_to_array(value, '\'));
	ELSE
		IF vr = 'IS' THEN
			RETURN format('%s::text = %L', expr, value);
		END IF;
		IF value ~ '[*?]' THEN
			pattern := replace(replace(replace(value, '\', '\\'), '%', '\%'), '_', '\_');
			pattern := replace(replace(pattern, '*', '%'), '?', '_');
			-- person names match without regard to case, as most archives do
			RETURN format('%s %s %L', expr, CASE WHEN vr = 'PN' THEN 'ILIKE' ELSE 'LIKE' END, pattern);
		END IF;
		IF vr = 'PN' THEN
			RETURN format('lower(%s) = lower(%L)', expr, value);
		END IF;
		RETURN format('%s = %L', expr, value);
	END CASE;
END;
$$;

-- The text a matched attribute is answered with.
CREATE FUNCTION mdd._find_output(expr text, vr text) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
	SELECT CASE vr
		WHEN 'DA' THEN format('to_char(%s, ''YYYYMMDD'')', expr)
		WHEN 'TM' THEN format('replace(%s::text, '':'', '''')', expr)
		WHEN 'MODALITIES' THEN format('array_to_string(%s, ''\'')', expr)
		ELSE format('%s::text', expr)
	END
$$;

-- The query of a C-FIND, C-MOVE or C-GET identifier: its level (0 PATIENT
-- to 3 IMAGE), the FROM and WHERE clauses over mdd.patient p, mdd.study st,
-- mdd.series se and mdd.object o down to that level, and the answers: the
-- keywords asked that the level has (and the level's unique key) and their
-- expressions.
-- model: 'PATIENT' (Patient Root) or 'STUDY' (Study Root).  With objects,
-- the joins go down to mdd.object o whatever the level.
CREATE FUNCTION mdd._match_query(model text, level text, keys jsonb, objects boolean,
								 OUT lvl int, OUT from_where text, OUT names text[],
								 OUT exprs text[])
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	conditions text[] := '{}';
	k text;
	v text;
	a record;
	c text;
BEGIN
	lvl := array_position(ARRAY['PATIENT', 'STUDY', 'SERIES', 'IMAGE'], level) - 1;
	names := '{}';
	exprs := '{}';
	IF lvl IS NULL THEN
		RAISE EXCEPTION 'unknown query/retrieve level "%"', coalesce(level, '')
			USING ERRCODE = '22023', HINT = 'Use PATIENT, STUDY, SERIES or IMAGE.';
	END IF;
	IF model = 'STUDY' AND lvl = 0 THEN
		RAISE EXCEPTION 'level PATIENT does not exist in the Study Root model' USING ERRCODE = '22023';
	END IF;
	FOR k, v IN SELECT key, value FROM jsonb_each_text(keys) LOOP
		SELECT * INTO a FROM mdd._find_attribute(k);
		IF a.expr IS NULL OR a.lvl > lvl THEN
			CONTINUE;			-- answered empty by the caller
		END IF;
		c := mdd._find_condition(a.expr, a.vr, v);
		IF c IS NOT NULL THEN
			conditions := conditions || c;
		END IF;
		names := names || k;
		exprs := exprs || mdd._find_output(a.expr, a.vr);
	END LOOP;
	-- the unique key of the level is always answered
	k := (ARRAY['PatientID', 'StudyInstanceUID', 'SeriesInstanceUID', 'SOPInstanceUID'])[lvl + 1];
	IF NOT keys ? k THEN
		SELECT * INTO a FROM mdd._find_attribute(k);
		names := names || k;
		exprs := exprs || mdd._find_output(a.expr, a.vr);
	END IF;

	from_where := 'FROM mdd.patient p';
	IF lvl >= 1 OR objects THEN
		from_where := from_where || ' JOIN mdd.study st ON st.patient = p.id';
	END IF;
	IF lvl >= 2 OR objects THEN
		from_where := from_where || ' JOIN mdd.series se ON se.study = st.id';
	END IF;
	IF lvl >= 3 OR objects THEN
		from_where := from_where || ' JOIN mdd.object o ON o.series = se.id';
	END IF;
	IF lvl = 0 THEN
		from_where := from_where || ' WHERE EXISTS (SELECT 1 FROM mdd.study x WHERE x.patient = p.id)';
	ELSE
		from_where := from_where || ' WHERE true';
	END IF;
	IF array_length(conditions, 1) > 0 THEN
		from_where := from_where || ' AND ' || array_to_string(conditions, ' AND ');
	END IF;
END;
$$;

-- mdd._dicom_find(model, level, keys): the C-FIND matches, as arrays of
-- text: first the keywords answered (those asked that the level has, and
-- the level's unique key), then one row of their values per match, in
-- catalog order.  Plain arrays rather than JSON: a query answering ten
-- thousand studies spends its time matching, not building documents.
CREATE FUNCTION mdd._dicom_find(model text, level text, keys jsonb) RETURNS SETOF text[]
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	q record := mdd._match_query(model, level, keys, false);
	names text[] := q.names;
	exprs text[] := q.exprs;
BEGIN
	-- where the matches can be retrieved from: this archive (the answers
	-- of spanned nodes name theirs, sql/span_wire.sql)
	IF keys ? 'RetrieveAETitle' THEN
		names := names || 'RetrieveAETitle'::text;
		exprs := exprs || quote_literal(current_setting('mdd.ae_title'));
	END IF;
	RETURN NEXT names;
	RETURN QUERY EXECUTE format('SELECT ARRAY[%s]::text[] %s ORDER BY %s',
								array_to_string(exprs, ', '), q.from_where,
								(ARRAY['p.id', 'st.id', 'se.id', 'o.id'])[q.lvl + 1]);
END;
$$;

-- A C-FIND served, in the audit trail: its model, level and keys and how
-- many matched, with the patient when the query names one (a PatientID
-- without wildcards or a list).
CREATE FUNCTION mdd._dicom_find_audit(model text, level text, keys jsonb, matches bigint,
									  calling_ae text, peer text) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
	INSERT INTO mdd.audit (role, action, patient_id, detail, client)
	VALUES (mdd._caller(), 'c-find',
			CASE WHEN keys->>'PatientID' <> '' AND keys->>'PatientID' !~ '[*?\\]' THEN keys->>'PatientID' END,
			format('C-FIND %s root, level %s %s: %s matches', model, level, keys, matches),
			format('%s@%s', calling_ae, peer))
$$;
