-- mdd: the catalog views users query

CREATE VIEW mdd.objects AS
SELECT o.id,
	   o.kind,
	   p.patient_id,
	   p.patient_name,
	   p.birth_date AS patient_birth_date,
	   p.sex AS patient_sex,
	   st.study_instance_uid,
	   se.series_instance_uid,
	   o.sop_instance_uid,
	   o.sop_class_uid,
	   se.modality,
	   st.study_date,
	   st.study_time,
	   st.study_description,
	   st.accession_number,
	   se.series_number,
	   se.series_description,
	   o.instance_number,
	   o.image_type,
	   o.manufacturer,
	   o.station_name,
	   o.frame_of_reference_uid,
	   o.transfer_syntax_uid,
	   o.number_of_frames,
	   o.content_type,
	   o.filename,
	   o.description,
	   o.size,
	   encode(o.sha256, 'hex') AS sha256,
	   o.tier,
	   (SELECT string_agg(s.name, ',' ORDER BY s.id) FROM mdd.copy c
		JOIN mdd.storage s ON s.id = c.storage
		WHERE c.object = o.id AND c.state = 'present') AS storage,
	   o.ingested_at,
	   o.archived_at,
	   o.source,
	   o.header
FROM mdd.object o
JOIN mdd.patient p ON p.id = o.patient
LEFT JOIN mdd.study st ON st.id = o.study
LEFT JOIN mdd.series se ON se.id = o.series;

-- Storages with what they hold.  Options (where the blobs are) are shown
-- to administrators only, and never the credentials.
CREATE VIEW mdd.storages AS
SELECT s.name,
	   s.kind,
	   s.tier,
	   CASE WHEN pg_catalog.pg_has_role('mdd_admin', 'USAGE')
			THEN s.options - ARRAY['password', 'secret_key', 'secret_access_key', 'access_key',
								   'access_key_id', 'token', 'credentials'] END AS options,
	   s.read_only,
	   count(c.object) AS objects,
	   coalesce(sum(c.size), 0)::bigint AS bytes,
	   s.name = coalesce(nullif(current_setting('mdd.default_storage', true), ''), 'online')
		   AS receives_new_objects
FROM mdd.storage s
LEFT JOIN mdd.copy c ON c.storage = s.id AND c.state = 'present'
GROUP BY s.id;
