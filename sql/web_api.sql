-- mdd: the calls of the web viewer.  The HTTP service answers
-- GET/POST /api/<name> with SELECT mdd.web_api(name, params) run as the
-- authenticated role, so each call has exactly that role's rights: what
-- readers may see comes from the views (mdd.objects, mdd.patients,
-- mdd.jobs, mdd.rules, mdd.storages) and the reader functions (mdd.read,
-- mdd.related, mdd.dvh); archive, restore and cancel are the operators'
-- functions themselves, refused (42501) to a reader.  See docs/viewer.md.

-- One row per patient with counts kept ready in the catalog (studies and
-- their modalities) and the number of objects; for the viewer's patient
-- list and for reports.  The counts are subqueries, computed only for the
-- rows and columns a query asks for.
CREATE VIEW mdd.patients AS
SELECT p.patient_id,
	   p.patient_name,
	   p.birth_date,
	   p.sex,
	   (SELECT count(*) FROM mdd.study st WHERE st.patient = p.id) AS studies,
	   (SELECT max(st.study_date) FROM mdd.study st WHERE st.patient = p.id) AS last_study_date,
	   (SELECT coalesce(array_agg(DISTINCT m ORDER BY m), '{}')
		FROM mdd.study st, unnest(st.modalities) m WHERE st.patient = p.id) AS modalities,
	   (SELECT count(*) FROM mdd.object o WHERE o.patient = p.id) AS objects,
	   p.created_at
FROM mdd.patient p;

-- The calls of /api/<name>, with their parameters (a JSON object: the
-- query string's arguments merged with a JSON body; numbers and booleans
-- may come as text).  SECURITY INVOKER: the caller's rights apply.
CREATE FUNCTION mdd.web_api(name text, params jsonb DEFAULT '{}') RETURNS jsonb
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	p jsonb := coalesce(params, '{}');
	calls constant text[] := ARRAY['whoami', 'patients', 'patient', 'series', 'plan', 'dvh',
								   'object', 'jobs', 'rules', 'storages', 'archive', 'restore',
								   'cancel'];
	rt_plan constant text := '1.2.840.10008.5.1.4.1.1.481.5';
	rt_dose constant text := '1.2.840.10008.5.1.4.1.1.481.2';
	rt_struct constant text := '1.2.840.10008.5.1.4.1.1.481.3';
	lim integer;
	off integer;
	obj_id bigint;
	ids bigint[];
	uid text;
	words text[];
	result jsonb;
	hdr jsonb;
	ss_id bigint;
	job bigint;
BEGIN
	IF jsonb_typeof(p) IS DISTINCT FROM 'object' THEN
		RAISE EXCEPTION 'parameters of web API call "%" must be a JSON object', name
			USING ERRCODE = '22023';
	END IF;
	IF name IS NULL OR NOT name = ANY (calls) THEN
		RAISE EXCEPTION 'no web API call named "%"', coalesce(name, 'NULL')
			USING ERRCODE = 'P0002',
				  HINT = 'The calls are: ' || array_to_string(calls, ', ') || '.';
	END IF;

	-- the paging parameters of the list calls
	IF name IN ('patients', 'jobs') THEN
		lim := coalesce((p->>'limit')::integer, 50);
		off := coalesce((p->>'offset')::integer, 0);
		IF lim < 1 OR lim > 1000 OR off < 0 THEN
			RAISE EXCEPTION 'limit % or offset % out of range', lim, off
				USING ERRCODE = '22023', HINT = 'limit is 1 to 1000, offset 0 or more.';
		END IF;
	END IF;
	-- calls about one object
	IF name IN ('plan', 'object') THEN
		obj_id := (p->>'id')::bigint;
		IF obj_id IS NULL THEN
			RAISE EXCEPTION 'parameter "id" of web API call "%" is required', name
				USING ERRCODE = '22023';
		END IF;
	END IF;

	CASE name
	WHEN 'whoami' THEN
		RETURN jsonb_build_object(
			'user', current_user::text,
			'reader', pg_has_role(current_user, 'mdd_reader', 'USAGE'),
			'operator', pg_has_role(current_user, 'mdd_operator', 'USAGE'),
			'admin', pg_has_role(current_user, 'mdd_admin', 'USAGE'));

	WHEN 'patients' THEN
		-- every word of q must be in the patient ID or the name (any case;
		-- the name's ^ separators count as spaces)
		SELECT coalesce(array_agg('%' || replace(replace(replace(w, '\', '\\'), '%', '\%'), '_', '\_') || '%'),
						'{}')
		INTO words
		FROM regexp_split_to_table(btrim(coalesce(p->>'q', '')), '\s+') w WHERE w <> '';
		-- the counts of mdd.patients are computed for the page only
		WITH hit AS (
			SELECT x.patient_id FROM mdd.patients x
			WHERE (SELECT bool_and(x.patient_id ILIKE w
								   OR translate(coalesce(x.patient_name, ''), '^', ' ') ILIKE w)
				   FROM unnest(words) w) IS NOT false
		)
		SELECT jsonb_build_object(
				   'total', (SELECT count(*) FROM hit),
				   'limit', lim, 'offset', off,
				   'patients', coalesce((
					   SELECT jsonb_agg(to_jsonb(x) - 'created_at' ORDER BY x.patient_id)
					   FROM (SELECT h.patient_id FROM hit h ORDER BY h.patient_id LIMIT lim OFFSET off) page
					   JOIN mdd.patients x ON x.patient_id = page.patient_id),
					   '[]'))
		INTO result;
		RETURN result;

	WHEN 'patient' THEN
		uid := p->>'patient_id';
		IF uid IS NULL THEN
			RAISE EXCEPTION 'parameter "patient_id" of web API call "patient" is required'
				USING ERRCODE = '22023';
		END IF;
		SELECT to_jsonb(x) - 'created_at' INTO result FROM mdd.patients x WHERE x.patient_id = uid;
		IF result IS NULL THEN
			RAISE EXCEPTION 'patient "%" does not exist', uid USING ERRCODE = 'P0002';
		END IF;
		WITH o AS (
			SELECT o.id, o.kind, o.study_instance_uid, o.study_date, o.study_time,
				   o.study_description, o.accession_number, o.series_instance_uid, o.modality,
				   o.series_number, o.series_description, o.sop_instance_uid, o.sop_class_uid,
				   o.instance_number, o.tier, o.size, o.filename, o.description, o.content_type,
				   o.frame_of_reference_uid, o.image_type, o.header
			FROM mdd.objects o WHERE o.patient_id = uid
		), se AS (
			SELECT o.study_instance_uid, o.series_instance_uid,
				   min(o.modality) AS modality, min(o.series_number) AS series_number,
				   min(o.series_description) AS series_description,
				   min(o.frame_of_reference_uid) AS frame_of_reference_uid,
				   min(o.image_type) AS image_type,
				   count(*) AS objects, sum(o.size) AS bytes, min(o.id) AS first_object,
				   array_agg(DISTINCT o.tier ORDER BY o.tier) AS tiers,
				   CASE WHEN count(*) <= 10 THEN
					   jsonb_agg(jsonb_build_object(
						   'id', o.id, 'sop_instance_uid', o.sop_instance_uid,
						   'sop_class_uid', o.sop_class_uid, 'instance_number', o.instance_number,
						   'tier', o.tier, 'size', o.size,
						   'label', coalesce(o.header->>'StructureSetLabel', o.header->>'RTPlanLabel',
											 o.header->>'DoseSummationType', o.header->>'ContentLabel'))
						   ORDER BY length(o.instance_number), o.instance_number, o.id) END AS object_list
			FROM o WHERE o.kind = 'dicom'
			GROUP BY o.study_instance_uid, o.series_instance_uid
		), se_related AS (
			SELECT se.*,
				   (SELECT coalesce(jsonb_agg(DISTINCT r.series_instance_uid), '[]')
					FROM mdd.related(se.first_object) rel(id)
					JOIN mdd.objects r ON r.id = rel.id
					WHERE r.series_instance_uid <> se.series_instance_uid) AS related_series
			FROM se
		), st AS (
			SELECT o.study_instance_uid, min(o.study_date) AS study_date, min(o.study_time) AS study_time,
				   min(o.study_description) AS study_description,
				   min(o.accession_number) AS accession_number
			FROM o WHERE o.study_instance_uid IS NOT NULL
			GROUP BY o.study_instance_uid
		)
		SELECT result || jsonb_build_object(
			'studies', coalesce((
				SELECT jsonb_agg(jsonb_build_object(
						   'study_instance_uid', st.study_instance_uid, 'study_date', st.study_date,
						   'study_time', st.study_time, 'study_description', st.study_description,
						   'accession_number', st.accession_number,
						   'series', coalesce((
							   SELECT jsonb_agg(jsonb_build_object(
										  'series_instance_uid', s.series_instance_uid,
										  'modality', s.modality, 'series_number', s.series_number,
										  'series_description', s.series_description,
										  'frame_of_reference_uid', s.frame_of_reference_uid,
										  'image_type', s.image_type,
										  'objects', s.objects, 'bytes', s.bytes,
										  'tiers', to_jsonb(s.tiers), 'first_object', s.first_object,
										  'object_list', s.object_list,
										  'related_series', s.related_series)
									  ORDER BY length(s.series_number), s.series_number, s.first_object)
							   FROM se_related s WHERE s.study_instance_uid = st.study_instance_uid),
							   '[]'),
						   'documents', coalesce((
							   SELECT jsonb_agg(jsonb_build_object(
										  'id', d.id, 'filename', d.filename, 'description', d.description,
										  'content_type', d.content_type, 'size', d.size, 'tier', d.tier)
									  ORDER BY d.id)
							   FROM o d WHERE d.kind = 'document'
										AND d.study_instance_uid = st.study_instance_uid),
							   '[]'))
					   ORDER BY st.study_date, st.study_time, st.study_instance_uid)
				FROM st), '[]'),
			'documents', coalesce((
				SELECT jsonb_agg(jsonb_build_object(
						   'id', d.id, 'filename', d.filename, 'description', d.description,
						   'content_type', d.content_type, 'size', d.size, 'tier', d.tier)
					   ORDER BY d.id)
				FROM o d WHERE d.kind = 'document' AND d.study_instance_uid IS NULL), '[]'))
		INTO result;
		RETURN result;

	WHEN 'series' THEN
		-- an image series as a volume: its geometry, the instances to ask
		-- WADO-RS for, and the RT objects that travel with it
		uid := p->>'series_instance_uid';
		IF uid IS NULL THEN
			RAISE EXCEPTION 'parameter "series_instance_uid" of web API call "series" is required'
				USING ERRCODE = '22023';
		END IF;
		SELECT o.header, o.id INTO hdr, obj_id
		FROM mdd.objects o WHERE o.series_instance_uid = uid ORDER BY o.id LIMIT 1;
		IF obj_id IS NULL THEN
			RAISE EXCEPTION 'series "%" does not exist', uid USING ERRCODE = 'P0002';
		END IF;
		SELECT jsonb_build_object(
				   'patient_id', min(o.patient_id),
				   'study_instance_uid', min(o.study_instance_uid),
				   'series_instance_uid', uid,
				   'modality', min(o.modality),
				   'series_description', min(o.series_description),
				   'frame_of_reference_uid', min(o.frame_of_reference_uid),
				   'rows', hdr->'Rows', 'columns', hdr->'Columns',
				   'pixel_spacing', hdr->'PixelSpacing',
				   'orientation', hdr->'ImageOrientationPatient',
				   'bits_allocated', hdr->'BitsAllocated',
				   'pixel_representation', hdr->'PixelRepresentation',
				   'photometric_interpretation', hdr->'PhotometricInterpretation',
				   'samples_per_pixel', hdr->'SamplesPerPixel',
				   'rescale_slope', coalesce(hdr->'RescaleSlope', '1'),
				   'rescale_intercept', coalesce(hdr->'RescaleIntercept', '0'),
				   'window_center', hdr->'WindowCenter', 'window_width', hdr->'WindowWidth',
				   'patient_position', hdr->'PatientPosition',
				   'instances', jsonb_agg(jsonb_build_object(
									'id', o.id, 'sop_instance_uid', o.sop_instance_uid,
									'instance_number', o.instance_number, 'tier', o.tier,
									'frames', coalesce(o.number_of_frames, 1),
									'position', o.header->'ImagePositionPatient')
								ORDER BY o.id),
				   'rt', (SELECT jsonb_build_object(
								 'structure_sets', coalesce(jsonb_agg(r.x ORDER BY r.id) FILTER (WHERE r.sop_class_uid = rt_struct), '[]'),
								 'plans', coalesce(jsonb_agg(r.x ORDER BY r.id) FILTER (WHERE r.sop_class_uid = rt_plan), '[]'),
								 'doses', coalesce(jsonb_agg(r.x ORDER BY r.id) FILTER (WHERE r.sop_class_uid = rt_dose), '[]'))
						  FROM (SELECT r.id, r.sop_class_uid,
									   jsonb_build_object('id', r.id, 'sop_instance_uid', r.sop_instance_uid,
														  'series_instance_uid', r.series_instance_uid,
														  'study_instance_uid', r.study_instance_uid,
														  'label', coalesce(r.header->>'StructureSetLabel',
																			r.header->>'RTPlanLabel',
																			r.header->>'DoseSummationType'),
														  'tier', r.tier) AS x
								FROM mdd.related(obj_id) rel(id) JOIN mdd.objects r ON r.id = rel.id) r))
		INTO result
		FROM mdd.objects o WHERE o.series_instance_uid = uid;
		RETURN result;

	WHEN 'plan' THEN
		-- the beams of an RT Plan (or RT Ion Plan) from its header
		SELECT o.header INTO hdr FROM mdd.objects o WHERE o.id = obj_id AND o.kind = 'dicom';
		IF NOT FOUND THEN
			RAISE EXCEPTION 'object % does not exist', obj_id USING ERRCODE = 'P0002';
		END IF;
		IF NOT (hdr ? 'BeamSequence' OR hdr ? 'IonBeamSequence') THEN
			RAISE EXCEPTION 'object % is not an RT plan with beams', obj_id USING ERRCODE = '22023';
		END IF;
		WITH fg AS (
			SELECT hdr->'FractionGroupSequence'->0 AS g
		), refs AS (
			SELECT (r->>'ReferencedBeamNumber')::integer AS number,
				   (r->>'BeamMeterset')::double precision AS mu,
				   (r->>'BeamDose')::double precision AS dose
			FROM fg, jsonb_array_elements(coalesce(fg.g->'ReferencedBeamSequence', '[]')) r
		), beams AS (
			SELECT b,
				   coalesce(b->'ControlPointSequence', b->'IonControlPointSequence') AS cps,
				   ord
			FROM jsonb_array_elements(coalesce(hdr->'BeamSequence', hdr->'IonBeamSequence'))
				 WITH ORDINALITY AS x(b, ord)
		)
		SELECT jsonb_build_object(
				   'id', obj_id,
				   'label', hdr->>'RTPlanLabel', 'name', hdr->>'RTPlanName',
				   'intent', hdr->>'PlanIntent', 'geometry', hdr->>'RTPlanGeometry',
				   'patient_position', hdr->'PatientSetupSequence'->0->>'PatientPosition',
				   'fractions', (SELECT (g->>'NumberOfFractionsPlanned')::integer FROM fg),
				   'prescription_gy', coalesce(
					   (SELECT max((d->>'TargetPrescriptionDose')::double precision)
						FROM jsonb_array_elements(coalesce(hdr->'DoseReferenceSequence', '[]')) d),
					   (SELECT sum(r.dose) * (SELECT (g->>'NumberOfFractionsPlanned')::integer FROM fg)
						FROM refs r)),
				   'structure_set_uid', hdr->'ReferencedStructureSetSequence'->0->>'ReferencedSOPInstanceUID',
				   'beams', coalesce(jsonb_agg(jsonb_build_object(
						'number', (x.b->>'BeamNumber')::integer,
						'name', x.b->>'BeamName',
						'description', x.b->>'BeamDescription',
						'machine', x.b->>'TreatmentMachineName',
						'type', x.b->>'BeamType',
						'radiation', x.b->>'RadiationType',
						'delivery', x.b->>'TreatmentDeliveryType',
						'energy', coalesce(x.cps->0->'NominalBeamEnergy', 'null'),
						'gantry', x.cps->0->'GantryAngle',
						'gantry_end', (SELECT cp->'GantryAngle'
									   FROM jsonb_array_elements(x.cps) WITH ORDINALITY c(cp, k)
									   WHERE cp ? 'GantryAngle' ORDER BY k DESC LIMIT 1),
						'collimator', x.cps->0->'BeamLimitingDeviceAngle',
						'couch', x.cps->0->'PatientSupportAngle',
						'isocenter', x.cps->0->'IsocenterPosition',
						'ssd', x.cps->0->'SourceToSurfaceDistance',
						'sad', coalesce(x.b->'SourceAxisDistance', x.b->'VirtualSourceAxisDistances'->0),
						'control_points', jsonb_array_length(coalesce(x.cps, '[]')),
						'mu', (SELECT r.mu FROM refs r WHERE r.number = (x.b->>'BeamNumber')::integer),
						'beam_dose_gy', (SELECT r.dose FROM refs r WHERE r.number = (x.b->>'BeamNumber')::integer))
					ORDER BY x.ord), '[]'))
		INTO result
		FROM beams x;
		RETURN result;

	WHEN 'dvh' THEN
		-- mdd.dvh of a dose and a structure set (by default the one its
		-- plan references), with each ROI's display colour
		obj_id := (p->>'dose_id')::bigint;
		IF obj_id IS NULL THEN
			RAISE EXCEPTION 'parameter "dose_id" of web API call "dvh" is required'
				USING ERRCODE = '22023';
		END IF;
		ss_id := (p->>'structure_set_id')::bigint;
		IF ss_id IS NULL THEN
			SELECT ss.id INTO ss_id
			FROM mdd.objects d
			JOIN mdd.objects pl ON pl.sop_instance_uid = d.header->'ReferencedRTPlanSequence'->0->>'ReferencedSOPInstanceUID'
			JOIN mdd.objects ss ON ss.sop_instance_uid = pl.header->'ReferencedStructureSetSequence'->0->>'ReferencedSOPInstanceUID'
			WHERE d.id = obj_id;
			IF ss_id IS NULL THEN
				RAISE EXCEPTION 'dose % has no plan with a structure set in the archive', obj_id
					USING ERRCODE = '22023', HINT = 'Name the structure set (structure_set_id).';
			END IF;
		END IF;
		SELECT o.header INTO hdr FROM mdd.objects o WHERE o.id = ss_id;
		SELECT jsonb_build_object(
				   'dose_id', obj_id, 'structure_set_id', ss_id,
				   'bin_width_gy', coalesce((p->>'bin_width_gy')::double precision, 0.1),
				   'rois', coalesce(jsonb_agg(jsonb_build_object(
						'roi_number', d.roi_number, 'roi_name', d.roi_name,
						'color', (SELECT c->'ROIDisplayColor'
								  FROM jsonb_array_elements(coalesce(hdr->'ROIContourSequence', '[]')) c
								  WHERE (c->>'ReferencedROINumber')::integer = d.roi_number LIMIT 1),
						'type', (SELECT c->>'RTROIInterpretedType'
								 FROM jsonb_array_elements(coalesce(hdr->'RTROIObservationsSequence', '[]')) c
								 WHERE (c->>'ReferencedROINumber')::integer = d.roi_number LIMIT 1),
						'volume_cc', d.volume_cc, 'voxels', d.voxels,
						'min_gy', d.min_gy, 'mean_gy', d.mean_gy, 'max_gy', d.max_gy,
						'd95_gy', d.d95_gy, 'd98_gy', d.d98_gy, 'd50_gy', d.d50_gy, 'd2_gy', d.d2_gy,
						'v20_pct', d.v20_pct,
						'dose_gy', to_jsonb(d.dose_gy), 'volume_pct', to_jsonb(d.volume_pct))
					ORDER BY d.roi_number), '[]'))
		INTO result
		FROM mdd.dvh(obj_id, ss_id, coalesce((p->>'bin_width_gy')::double precision, 0.1)) d;
		RETURN result;

	WHEN 'object' THEN
		-- the stored bytes of an object (a document to show, an RT object
		-- to read), base64; large objects belong to WADO-RS
		SELECT jsonb_build_object('id', o.id, 'kind', o.kind, 'size', o.size, 'sha256', o.sha256,
								  'content_type', coalesce(o.content_type, 'application/dicom'),
								  'filename', o.filename, 'sop_class_uid', o.sop_class_uid,
								  'modality', o.modality, 'tier', o.tier)
		INTO result FROM mdd.objects o WHERE o.id = obj_id;
		IF result IS NULL THEN
			RAISE EXCEPTION 'object % does not exist', obj_id USING ERRCODE = 'P0002';
		END IF;
		IF (result->>'size')::bigint > 64 * 1024 * 1024 THEN
			RAISE EXCEPTION 'object % is too large for /api/object (% bytes)', obj_id, result->>'size'
				USING ERRCODE = '54000', HINT = 'Read it with WADO-RS or mdd.read.';
		END IF;
		RETURN result || jsonb_build_object('data', translate(encode(mdd.read(obj_id), 'base64'), E'\n', ''));

	WHEN 'jobs' THEN
		SELECT jsonb_build_object(
				   'limit', lim, 'offset', off,
				   'active', (SELECT count(*) FROM mdd.jobs j WHERE j.state IN ('queued', 'running')),
				   'jobs', coalesce(jsonb_agg(to_jsonb(j) || jsonb_build_object(
						'progress', CASE WHEN j.total > 0 THEN round((j.done + j.failed) * 100.0 / j.total, 1)
										 WHEN j.state = 'done' THEN 100 ELSE 0 END)
					ORDER BY j.id DESC), '[]'))
		INTO result
		FROM (SELECT * FROM mdd.jobs j
			  WHERE (p->>'id' IS NULL OR j.id = (p->>'id')::bigint)
				AND (p->>'state' IS NULL OR j.state = p->>'state')
			  ORDER BY j.id DESC LIMIT lim OFFSET off) j;
		RETURN result;

	WHEN 'rules' THEN
		RETURN jsonb_build_object('rules', coalesce(
			(SELECT jsonb_agg(to_jsonb(r) ORDER BY r.name) FROM mdd.rules r), '[]'));

	WHEN 'storages' THEN
		-- usage only: where a storage keeps its blobs is for administrators
		-- (mdd.storages), not for the page
		RETURN jsonb_build_object('storages', coalesce(
			(SELECT jsonb_agg(to_jsonb(s) - 'options' ORDER BY s.name) FROM mdd.storages s), '[]'));

	WHEN 'archive', 'restore' THEN
		-- a series (by UID) or objects (by id), with what travels with them
		-- unless include_related is false
		uid := p->>'series_instance_uid';
		IF uid IS NOT NULL THEN
			SELECT array_agg(o.id ORDER BY o.id) INTO ids
			FROM mdd.objects o WHERE o.series_instance_uid = uid;
			IF ids IS NULL THEN
				RAISE EXCEPTION 'series "%" does not exist', uid USING ERRCODE = 'P0002';
			END IF;
		ELSIF jsonb_typeof(p->'object_ids') = 'array' THEN
			SELECT array_agg(x::bigint) INTO ids FROM jsonb_array_elements_text(p->'object_ids') x;
		ELSIF p ? 'id' THEN
			ids := ARRAY[(p->>'id')::bigint];
		ELSE
			RAISE EXCEPTION 'web API call "%" needs series_instance_uid, object_ids or id', name
				USING ERRCODE = '22023';
		END IF;
		IF name = 'archive' THEN
			job := mdd.archive(ids, p->>'storage', coalesce((p->>'include_related')::boolean, true));
		ELSE
			job := mdd.restore(ids, coalesce((p->>'include_related')::boolean, true));
		END IF;
		SELECT to_jsonb(j) INTO result FROM mdd.jobs j WHERE j.id = job;
		RETURN jsonb_build_object('job', job, 'objects', result->'total');

	WHEN 'cancel' THEN
		job := (p->>'job')::bigint;
		IF job IS NULL THEN
			RAISE EXCEPTION 'parameter "job" of web API call "cancel" is required'
				USING ERRCODE = '22023';
		END IF;
		PERFORM mdd.cancel(job);
		RETURN jsonb_build_object('job', job);
	END CASE;
EXCEPTION WHEN undefined_object THEN
	-- what mdd's functions do not find (a job, a storage) is not found
	-- here either: P0002, which the HTTP service answers with 404
	RAISE EXCEPTION USING ERRCODE = 'P0002', MESSAGE = SQLERRM;
END;
$$;
COMMENT ON FUNCTION mdd.web_api(text, jsonb) IS
	'The calls of the web viewer (/api/<name> of the HTTP service), with the caller''s rights';

