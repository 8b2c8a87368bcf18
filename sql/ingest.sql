-- mdd: ingest of DICOM objects and documents

-- Find or create the patient row for a Patient ID.
CREATE FUNCTION mdd._patient(pid text, pname text, pbirth date, psex text) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	found_id bigint;
BEGIN
	SELECT p.id INTO found_id FROM mdd.patient p WHERE p.patient_id = pid;
	IF FOUND THEN
		-- a patient first seen through a document learns its name from DICOM
		UPDATE mdd.patient p
		SET patient_name = coalesce(p.patient_name, pname),
			birth_date = coalesce(p.birth_date, pbirth),
			sex = coalesce(p.sex, psex)
		WHERE p.id = found_id
		  AND ((p.patient_name IS NULL AND pname IS NOT NULL)
			   OR (p.birth_date IS NULL AND pbirth IS NOT NULL)
			   OR (p.sex IS NULL AND psex IS NOT NULL));
		RETURN found_id;
	END IF;
	INSERT INTO mdd.patient (patient_id, patient_name, birth_date, sex)
	VALUES (pid, pname, pbirth, psex)
	ON CONFLICT (patient_id) DO NOTHING
	RETURNING patient.id INTO found_id;
	IF found_id IS NULL THEN		-- created meanwhile by another session
		SELECT p.id INTO found_id FROM mdd.patient p WHERE p.patient_id = pid;
	END IF;
	RETURN found_id;
END;
$$;

-- Find or create the study row of an object; the study must belong to
-- the same patient.
CREATE FUNCTION mdd._study(patient bigint, info jsonb) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	uid text := info->>'study_instance_uid';
	st mdd.study;
BEGIN
	IF uid IS NULL THEN
		RAISE EXCEPTION 'DICOM object lacks a required identifier'
			USING ERRCODE = '22004', DETAIL = 'It has no Study Instance UID (0020,000D).';
	END IF;
	SELECT * INTO st FROM mdd.study s WHERE s.study_instance_uid = uid;
	IF NOT FOUND THEN
		INSERT INTO mdd.study (patient, study_instance_uid, study_date, study_time,
							   study_description, study_id, accession_number,
							   referring_physician)
		VALUES (patient, uid, (info->>'study_date')::date, (info->>'study_time')::time,
				info->>'study_description', info->>'study_id', info->>'accession_number',
				info->>'referring_physician')
		ON CONFLICT (study_instance_uid) DO NOTHING
		RETURNING * INTO st;
		IF st.id IS NULL THEN
			SELECT * INTO st FROM mdd.study s WHERE s.study_instance_uid = uid;
		END IF;
	END IF;
	IF st.patient <> patient THEN
		RAISE EXCEPTION 'study % belongs to another patient', uid
			USING ERRCODE = '23000',
				  DETAIL = format('The archive holds it for Patient ID "%s"; this object says "%s".',
								  (SELECT p.patient_id FROM mdd.patient p WHERE p.id = st.patient),
								  (SELECT p.patient_id FROM mdd.patient p WHERE p.id = patient));
	END IF;
	RETURN st.id;
END;
$$;

-- Find or create the series row of an object; it must lie in the same study.
CREATE FUNCTION mdd._series(study bigint, info jsonb) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	uid text := info->>'series_instance_uid';
	se mdd.series;
BEGIN
	IF uid IS NULL THEN
		RAISE EXCEPTION 'DICOM object lacks a required identifier'
			USING ERRCODE = '22004', DETAIL = 'It has no Series Instance UID (0020,000E).';
	END IF;
	SELECT * INTO se FROM mdd.series s WHERE s.series_instance_uid = uid;
	IF NOT FOUND THEN
		INSERT INTO mdd.series (study, series_instance_uid, modality, series_number,
								series_description, series_date, body_part_examined,
								frame_of_reference_uid)
		VALUES (study, uid, info->>'modality', info->>'series_number',
				info->>'series_description', (info->>'series_date')::date,
				info->>'body_part_examined', info->>'frame_of_reference_uid')
		ON CONFLICT (series_instance_uid) DO NOTHING
		RETURNING * INTO se;
		IF se.id IS NULL THEN
			SELECT * INTO se FROM mdd.series s WHERE s.series_instance_uid = uid;
		ELSE
			UPDATE mdd.study s SET series_count = s.series_count + 1,
				modalities = CASE WHEN se.modality IS NULL OR se.modality = ANY (s.modalities)
								  THEN s.modalities ELSE s.modalities || se.modality END
			WHERE s.id = study;
		END IF;
	END IF;
	IF se.study <> study THEN
		RAISE EXCEPTION 'series % belongs to another study', uid USING ERRCODE = '23000';
	END IF;
	RETURN se.id;
END;
$$;

-- Store the bytes of a new object in the default storage and record the copy.
CREATE FUNCTION mdd._keep(obj bigint, digest bytea, data bytea) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	s mdd.storage := mdd._default_storage();
BEGIN
	INSERT INTO mdd.copy (object, storage, locator, state, size, sha256, verified_at)
	VALUES (obj, s.id, mdd._put(s, obj, digest, data), 'present', length(data), digest, now());
	IF s.tier <> 'online' THEN
		UPDATE mdd.object o SET tier = s.tier WHERE o.id = obj;
	END IF;
END;
$$;

-- The common path of mdd.store and mdd.store_file.
CREATE FUNCTION mdd._store_dicom(data bytea, source text, origin text, client text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	info jsonb;
	digest bytea;
	uid text;
	existing mdd.object;
	pat bigint;
	stu bigint;
	ser bigint;
	obj bigint;
BEGIN
	IF data IS NULL THEN
		RAISE EXCEPTION 'DICOM data must not be NULL' USING ERRCODE = '22004';
	END IF;
	info := mdd.parse(data);
	digest := sha256(data);
	uid := info->>'sop_instance_uid';

	SELECT * INTO existing FROM mdd.object o WHERE o.sop_instance_uid = uid;
	IF FOUND THEN
		IF existing.sha256 = digest THEN
			RETURN existing.id;
		END IF;
		RAISE EXCEPTION 'SOP instance % is already archived with other content', uid
			USING ERRCODE = '23505',
				  DETAIL = format('Object %s holds %s bytes with SHA-256 %s; the new data has %s bytes with SHA-256 %s.',
								  existing.id, existing.size, encode(existing.sha256, 'hex'),
								  length(data), encode(digest, 'hex')),
				  HINT = 'The archive keeps the first version; send a corrected object with a new SOP Instance UID.';
	END IF;

	-- most objects join a series already archived: one lookup suffices
	SELECT se.id, st.id, p.id INTO ser, stu, pat
	FROM mdd.series se
	JOIN mdd.study st ON st.id = se.study
	JOIN mdd.patient p ON p.id = st.patient
	WHERE se.series_instance_uid = info->>'series_instance_uid'
	  AND st.study_instance_uid = info->>'study_instance_uid'
	  AND p.patient_id = coalesce(info->>'patient_id', '')
	  AND (p.patient_name IS NOT NULL OR info->>'patient_name' IS NULL)
	  AND (p.birth_date IS NOT NULL OR info->>'patient_birth_date' IS NULL)
	  AND (p.sex IS NOT NULL OR info->>'patient_sex' IS NULL);
	IF NOT FOUND THEN
		pat := mdd._patient(coalesce(info->>'patient_id', ''), info->>'patient_name',
							(info->>'patient_birth_date')::date, info->>'patient_sex');
		stu := mdd._study(pat, info);
		ser := mdd._series(stu, info);
	END IF;

	INSERT INTO mdd.object (kind, patient, study, series, sop_instance_uid, sop_class_uid,
							instance_number, image_type, manufacturer, manufacturer_model_name,
							station_name, frame_of_reference_uid, transfer_syntax_uid,
							number_of_frames, content_date, content_type, filename,
							size, sha256, header, source)
	VALUES ('dicom', pat, stu, ser, uid, info->>'sop_class_uid',
			info->>'instance_number', info->>'image_type', info->>'manufacturer',
			info->>'manufacturer_model_name', info->>'station_name',
			info->>'frame_of_reference_uid', info->>'transfer_syntax_uid',
			CASE WHEN info->>'number_of_frames' ~ '^\s*[0-9]{1,9}\s*$'
				 THEN (info->>'number_of_frames')::int END,
			(info->>'content_date')::date, 'application/dicom',
			CASE WHEN origin IS NOT NULL THEN regexp_replace(origin, '^.*/', '') END,
			length(data), digest, info->'header', source)
	ON CONFLICT (sop_instance_uid) DO NOTHING
	RETURNING id INTO obj;

	IF obj IS NULL THEN
		-- stored by a concurrent session meanwhile: same rules as above
		SELECT * INTO existing FROM mdd.object o WHERE o.sop_instance_uid = uid;
		IF existing.sha256 = digest THEN
			RETURN existing.id;
		END IF;
		RAISE EXCEPTION 'SOP instance % is already archived with other content', uid
			USING ERRCODE = '23505';
	END IF;

	INSERT INTO mdd.reference (object, kind, uid, sop_class_uid, via)
	SELECT obj, r->>'kind', r->>'uid', r->>'sop_class_uid', r->>'via'
	FROM jsonb_array_elements(info->'references') r
	ON CONFLICT DO NOTHING;

	PERFORM mdd._tally(ser, stu);
	PERFORM mdd._keep(obj, digest, data);
	PERFORM mdd._audit('store', obj, info->>'patient_id',
					   coalesce(origin, format('%s bytes', length(data))), client);
	RETURN obj;
END;
$$;

CREATE FUNCTION mdd.store(data bytea, source text DEFAULT NULL) RETURNS bigint
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT mdd._store_dicom(data, source, NULL) $$;
COMMENT ON FUNCTION mdd.store(bytea, text) IS
	'Archive one DICOM object given as bytes; returns its object id';

CREATE FUNCTION mdd.store_file(path text, source text DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	resolved text := mdd._check_path(path, false);
BEGIN
	RETURN mdd._store_dicom(mdd._read_file(resolved), coalesce(source, 'file'), resolved);
END;
$$;
COMMENT ON FUNCTION mdd.store_file(text, text) IS
	'Archive one DICOM file from the server''s file system (under mdd.allowed_paths)';

CREATE FUNCTION mdd.import(directory text)
RETURNS TABLE(path text, object_id bigint, error text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	every int := coalesce(nullif(current_setting('mdd.import_progress_every', true), '')::int, 1000);
	files int := 0;
	stored int := 0;
	failed int := 0;
	started timestamptz := clock_timestamp();
BEGIN
	FOR path IN SELECT f FROM mdd._list_files(directory) f LOOP
		BEGIN
			object_id := mdd.store_file(path, 'import');
			error := NULL;
			stored := stored + 1;
		EXCEPTION WHEN OTHERS THEN
			object_id := NULL;
			error := SQLERRM;
			failed := failed + 1;
		END;
		files := files + 1;
		IF files % every = 0 THEN
			RAISE NOTICE 'mdd.import: % files done (% stored, % failed) in %',
				files, stored, failed, date_trunc('second', clock_timestamp() - started);
		END IF;
		RETURN NEXT;
	END LOOP;
	PERFORM mdd._audit('import', NULL, NULL,
					   format('%s: %s files, %s stored, %s failed', directory, files, stored, failed));
END;
$$;
COMMENT ON FUNCTION mdd.import(text) IS
	'Archive every file below a directory, recursively; one row per file, errors included';

-- the media type of a document, from its first bytes or its file name
CREATE FUNCTION mdd._guess_content_type(data bytea, filename text) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
	SELECT CASE
		WHEN substr(data, 1, 5) = '\x255044462d'::bytea THEN 'application/pdf'
		WHEN lower(filename) ~ '\.docx$' THEN 'application/vnd.openxmlformats-officedocument.wordprocessingml.document'
		WHEN lower(filename) ~ '\.xlsx$' THEN 'application/vnd.openxmlformats-officedocument.spreadsheetml.sheet'
		WHEN lower(filename) ~ '\.doc$' THEN 'application/msword'
		WHEN lower(filename) ~ '\.xls$' THEN 'application/vnd.ms-excel'
		WHEN lower(filename) ~ '\.(txt|log)$' THEN 'text/plain'
		WHEN lower(filename) ~ '\.csv$' THEN 'text/csv'
		WHEN lower(filename) ~ '\.xml$' THEN 'application/xml'
		WHEN lower(filename) ~ '\.json$' THEN 'application/json'
		WHEN lower(filename) ~ '\.zip$' OR substr(data, 1, 4) = '\x504b0304'::bytea THEN 'application/zip'
		WHEN lower(filename) ~ '\.(jpg|jpeg)$' THEN 'image/jpeg'
		WHEN lower(filename) ~ '\.png$' THEN 'image/png'
		ELSE 'application/octet-stream'
	END
$$;

CREATE FUNCTION mdd.store_document(patient_id text, data bytea, filename text,
								   content_type text DEFAULT NULL,
								   description text DEFAULT NULL,
								   study_instance_uid text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	digest bytea;
	pat bigint;
	stu bigint;
	obj bigint;
BEGIN
	IF coalesce(patient_id, '') = '' THEN
		RAISE EXCEPTION 'patient_id must be given' USING ERRCODE = '22004';
	END IF;
	IF data IS NULL THEN
		RAISE EXCEPTION 'document data must not be NULL' USING ERRCODE = '22004';
	END IF;
	IF length(data) = 0 THEN
		RAISE EXCEPTION 'document data is empty' USING ERRCODE = '22023';
	END IF;
	IF coalesce(filename, '') = '' OR filename ~ '[/\\]' THEN
		RAISE EXCEPTION 'invalid document file name "%"', coalesce(filename, '')
			USING ERRCODE = '22023', HINT = 'Give the file''s name without a directory.';
	END IF;
	digest := sha256(data);
	pat := mdd._patient(patient_id, NULL, NULL, NULL);

	SELECT o.id INTO obj FROM mdd.object o
	WHERE o.patient = pat AND o.kind = 'document' AND o.sha256 = digest
	  AND o.filename = store_document.filename;
	IF FOUND THEN
		RETURN obj;
	END IF;

	IF study_instance_uid IS NOT NULL THEN
		stu := mdd._study(pat, jsonb_build_object('study_instance_uid', study_instance_uid));
	END IF;

	INSERT INTO mdd.object (kind, patient, study, content_type, filename, description,
							size, sha256, source)
	VALUES ('document', pat, stu,
			coalesce(content_type, mdd._guess_content_type(data, filename)),
			filename, description, length(data), digest, 'document')
	RETURNING id INTO obj;

	PERFORM mdd._keep(obj, digest, data);
	PERFORM mdd._audit('store', obj, patient_id, filename);
	RETURN obj;
END;
$$;
COMMENT ON FUNCTION mdd.store_document(text, bytea, text, text, text, text) IS
	'Archive a non-DICOM file (PDF, Word, planning export) for a patient; returns its object id';
