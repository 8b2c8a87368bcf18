-- mdd: the calls of the web viewer (mdd.web_api) and mdd.patients, on the
-- synthetic patient: what each call answers, that bad calls and bad
-- parameters fail with their SQLSTATE and change nothing, and that each
-- call has exactly the caller's rights (a reader reads but cannot archive,
-- restore or cancel; a role that is no reader gets nothing).
SET client_min_messages = warning;

BEGIN;
SET LOCAL jit = off;
SELECT plan(52);

SELECT count(*) AS objects0 FROM mdd.objects \gset
SELECT count(*) AS jobs0 FROM mdd.jobs \gset
SELECT count(object_id) AS imported
FROM mdd.import(current_setting('mdd_test.dir') || '/allowed/patient') \gset
SELECT mdd.store_document('MDD0001', '\x255044462d312e340a'::bytea, 't08.pdf',
						  description => 'Treatment summary') AS doc \gset
SELECT lives_ok($$SELECT mdd.add_storage('vault08', 'file', 'archive',
	jsonb_build_object('root', current_setting('mdd_test.dir') || '/allowed'))$$,
	'an archive-tier storage');

SELECT id AS ct_first, series_instance_uid AS ct_series FROM mdd.objects
WHERE patient_id = 'MDD0001' AND modality = 'CT' AND series_description LIKE 'Planning CT%'
ORDER BY id LIMIT 1 \gset
SELECT id AS plan_id FROM mdd.objects WHERE patient_id = 'MDD0001' AND modality = 'RTPLAN' \gset
SELECT id AS dose_id FROM mdd.objects WHERE patient_id = 'MDD0001' AND modality = 'RTDOSE' \gset
SELECT id AS ss_id FROM mdd.objects WHERE patient_id = 'MDD0001' AND modality = 'RTSTRUCT' \gset

CREATE ROLE mdd_t08_reader IN ROLE mdd_reader;
CREATE ROLE mdd_t08_operator IN ROLE mdd_operator;
CREATE ROLE mdd_t08_nobody;

-- the function itself
SELECT ok(NOT p.prosecdef AND p.proconfig @> '{"search_path=pg_catalog, pg_temp"}',
		  'mdd.web_api runs with the caller''s rights and a pinned search_path')
FROM pg_proc p WHERE p.oid = 'mdd.web_api(text, jsonb)'::regprocedure;
SELECT ok(has_function_privilege('mdd_reader', 'mdd.web_api(text, jsonb)', 'EXECUTE')
		  AND has_table_privilege('mdd_reader', 'mdd.patients', 'SELECT')
		  AND NOT has_function_privilege('mdd_t08_nobody', 'mdd.web_api(text, jsonb)', 'EXECUTE')
		  AND NOT has_table_privilege('mdd_t08_nobody', 'mdd.patients', 'SELECT'),
		  'readers may call it and see mdd.patients; other roles may not');

-- mdd.patients
SELECT is((SELECT format('%s %s %s %s', patient_name, studies, objects, modalities)
		   FROM mdd.patients WHERE patient_id = 'MDD0001'),
		  format('Demo^Patient 2 %s {CT,RTDOSE,RTPLAN,RTSTRUCT}', :imported + 1),
		  'mdd.patients: one row per patient with its studies, objects and modalities');

-- everything below as a reader
SET LOCAL ROLE mdd_t08_reader;

SELECT is(mdd.web_api('whoami'),
		  '{"user": "mdd_t08_reader", "reader": true, "operator": false, "admin": false}'::jsonb,
		  'whoami: the role and what it may do');

-- patients: search by every word, paging
SELECT is(mdd.web_api('patients', '{"q": "demo patient"}')->'patients'->0->>'patient_id', 'MDD0001',
		  'patients: found by the words of the name');
SELECT is(mdd.web_api('patients', '{"q": "mdd0001"}')->'patients'->0->>'patient_name', 'Demo^Patient',
		  'and by the patient ID in any case');
SELECT is(mdd.web_api('patients', '{"q": "demo nosuchword"}')->>'total', '0',
		  'every word must match');
SELECT is(mdd.web_api('patients', '{"q": "%"}')->>'total', '0', 'LIKE wildcards are taken literally');
SELECT is(mdd.web_api('patients', '{"limit": "1", "offset": 0}')->'limit', '1',
		  'limit may come as text');
SELECT throws_ok($$SELECT mdd.web_api('patients', '{"limit": 0}')$$, '22023', NULL,
				 'a limit out of range is refused');
SELECT throws_ok($$SELECT mdd.web_api('patients', '{"offset": -1}')$$, '22023', NULL,
				 'as is a negative offset');

-- patient: the study tree
SELECT mdd.web_api('patient', '{"patient_id": "MDD0001"}') AS tree \gset
SELECT is(jsonb_array_length(:'tree'::jsonb->'studies'), 2, 'patient: its two studies');
SELECT is((SELECT string_agg(s->>'modality', ',' ORDER BY s->>'series_number')
		   FROM jsonb_array_elements(:'tree'::jsonb->'studies'->0->'series') s),
		  'CT,RTSTRUCT,RTPLAN,RTDOSE', 'the planning study''s series, in series order');
SELECT is((SELECT (s->>'objects')::integer FROM jsonb_array_elements(:'tree'::jsonb->'studies'->0->'series') s
		   WHERE s->>'modality' = 'CT'), 20, 'with the number of objects of each');
SELECT is((SELECT jsonb_array_length(s->'related_series')
		   FROM jsonb_array_elements(:'tree'::jsonb->'studies'->0->'series') s WHERE s->>'modality' = 'CT'),
		  3, 'the CT names the structure set, plan and dose that travel with it');
SELECT is(:'tree'::jsonb->'documents'->0->>'filename', 't08.pdf', 'documents outside studies');
SELECT throws_ok($$SELECT mdd.web_api('patient', '{"patient_id": "NOSUCH"}')$$, 'P0002', NULL,
				 'an unknown patient is not found');
SELECT throws_ok($$SELECT mdd.web_api('patient')$$, '22023', NULL, 'patient_id is required');

-- series: the volume's geometry and RT objects
SELECT mdd.web_api('series', jsonb_build_object('series_instance_uid', :'ct_series')) AS series \gset
SELECT is(jsonb_array_length(:'series'::jsonb->'instances'), 20, 'series: every instance');
SELECT ok((:'series'::jsonb->>'rows')::integer > 0 AND jsonb_array_length(:'series'::jsonb->'pixel_spacing') = 2
		  AND jsonb_array_length(:'series'::jsonb->'instances'->0->'position') = 3,
		  'its geometry: rows, spacing and each slice''s position');
SELECT is(ARRAY[(:'series'::jsonb->'rt'->'structure_sets'->0->>'id')::bigint,
				(:'series'::jsonb->'rt'->'plans'->0->>'id')::bigint,
				(:'series'::jsonb->'rt'->'doses'->0->>'id')::bigint],
		  ARRAY[:ss_id, :plan_id, :dose_id]::bigint[], 'and its structure set, plan and dose');
SELECT throws_ok($$SELECT mdd.web_api('series', '{"series_instance_uid": "1.2.3"}')$$, 'P0002', NULL,
				 'an unknown series is not found');

-- plan: the beams
SELECT mdd.web_api('plan', jsonb_build_object('id', :plan_id)) AS plan \gset
SELECT is((SELECT string_agg(format('%s %s %s', b->>'name', b->>'energy', b->>'gantry'), ',' ORDER BY b->>'number')
		   FROM jsonb_array_elements(:'plan'::jsonb->'beams') b),
		  'G200 6 200,G250 6 250,G290 6 290,G330 6 330,G020 6 20', 'plan: each beam''s name, energy and gantry angle');
SELECT ok((SELECT bool_and((b->>'mu')::float8 > 0 AND (b->>'couch')::float8 = 0)
		   FROM jsonb_array_elements(:'plan'::jsonb->'beams') b), 'its MU and couch angle');
SELECT is((:'plan'::jsonb->>'prescription_gy')::float8, 60::float8, 'the prescription');
SELECT throws_ok(format('SELECT mdd.web_api(''plan'', ''{"id": %s}'')', :dose_id), '22023', NULL,
				 'a dose is no plan');
SELECT throws_ok($$SELECT mdd.web_api('plan', '{"id": "x"}')$$, '22P02', NULL, 'an id must be a number');

-- dvh: mdd.dvh with the ROI colours, structure set found through the plan
SELECT mdd.web_api('dvh', jsonb_build_object('dose_id', :dose_id)) AS dvh \gset
SELECT is((:'dvh'::jsonb->>'structure_set_id')::bigint, :ss_id::bigint, 'dvh: the structure set the plan names');
SELECT is((SELECT string_agg(format('%s %s', r->>'roi_name', r->>'color'), ',' ORDER BY (r->>'roi_number')::int)
		   FROM jsonb_array_elements(:'dvh'::jsonb->'rois') r),
		  'BODY [0, 255, 0],PTV [255, 0, 0],SpinalCord [255, 255, 0],Lung_L [0, 128, 255]',
		  'each ROI with its display colour');
SELECT ok((SELECT abs((r->>'d95_gy')::float8 - d.d95_gy) < 1e-9
				  AND jsonb_array_length(r->'volume_pct') = cardinality(d.volume_pct)
		   FROM jsonb_array_elements(:'dvh'::jsonb->'rois') r
		   JOIN mdd.dvh(:dose_id, :ss_id, 0.1) d ON d.roi_number = (r->>'roi_number')::int
		   WHERE r->>'roi_name' = 'PTV'), 'and mdd.dvh''s figures and curve (0.1 Gy bins)');
SELECT throws_ok($$SELECT mdd.web_api('dvh')$$, '22023', NULL, 'dose_id is required');

-- object: the stored bytes
SELECT is(decode(mdd.web_api('object', jsonb_build_object('id', :doc))->>'data', 'base64'),
		  '\x255044462d312e340a'::bytea, 'object: a document''s bytes, base64');
SELECT is(mdd.web_api('object', jsonb_build_object('id', :doc))->>'content_type', 'application/pdf',
		  'with its content type');
SELECT throws_ok($$SELECT mdd.web_api('object', '{"id": -1}')$$, 'P0002', NULL, 'an unknown object is not found');

-- storages, rules, jobs
SELECT ok((SELECT s ? 'bytes' AND NOT s ? 'options'
		   FROM jsonb_array_elements(mdd.web_api('storages')->'storages') s WHERE s->>'name' = 'vault08'),
		  'storages: usage, not options');
SELECT ok(jsonb_typeof(mdd.web_api('rules')->'rules') = 'array', 'rules: a list');

-- a reader cannot change anything
SELECT throws_ok(format($$SELECT mdd.web_api('archive', '{"series_instance_uid": "%s", "storage": "vault08"}')$$, :'ct_series'),
				 '42501', NULL, 'a reader cannot archive');
SELECT throws_ok(format($$SELECT mdd.web_api('restore', '{"id": %s}')$$, :ct_first),
				 '42501', NULL, 'nor restore');

-- an operator archives a series with what travels with it
SET LOCAL ROLE mdd_t08_operator;
SELECT mdd.web_api('archive', jsonb_build_object('series_instance_uid', :'ct_series', 'storage', 'vault08')) AS arch \gset
SELECT is((:'arch'::jsonb->>'objects')::integer, 23, 'an operator archives a series and its RT objects: one job');
SELECT is((SELECT j->>'state' FROM jsonb_array_elements(mdd.web_api('jobs', jsonb_build_object('id', :'arch'::jsonb->'job'))->'jobs') j),
		  'queued', 'jobs: the new job, queued');
SELECT is((mdd.web_api('jobs', jsonb_build_object('id', :'arch'::jsonb->'job'))->'jobs'->0->>'progress')::numeric,
		  0::numeric, 'with its progress');
SELECT is(mdd.web_api('jobs')->>'active', ((:jobs0)::bigint + 1)::text, 'and counted as active');
SET LOCAL ROLE mdd_t08_reader;
SELECT throws_ok(format($$SELECT mdd.web_api('cancel', '{"job": %s}')$$, :'arch'::jsonb->'job'),
				 '42501', NULL, 'a reader cannot cancel it');
SET LOCAL ROLE mdd_t08_operator;
SELECT lives_ok(format($$SELECT mdd.web_api('cancel', '{"job": %s}')$$, :'arch'::jsonb->'job'),
				'an operator can');
SELECT throws_ok($$SELECT mdd.web_api('cancel', '{"job": 999999999}')$$, 'P0002', NULL,
				 'an unknown job is not found');
SELECT throws_ok($$SELECT mdd.web_api('archive', '{"series_instance_uid": "1.2.3"}')$$, 'P0002', NULL,
				 'nor an unknown series');
SELECT throws_ok($$SELECT mdd.web_api('archive', '{}')$$, '22023', NULL,
				 'archive needs something to archive');

-- bad calls
SELECT throws_ok($$SELECT mdd.web_api('drop_everything')$$, 'P0002', NULL, 'an unknown call is not found');
SELECT throws_ok($$SELECT mdd.web_api('whoami', '[1]')$$, '22023', NULL, 'parameters must be an object');
SET LOCAL ROLE mdd_t08_nobody;
SELECT throws_ok($$SELECT mdd.web_api('whoami')$$, '42501', NULL, 'a role that is no reader gets nothing');
RESET ROLE;
SELECT is((SELECT count(*) FROM mdd.objects), (:objects0 + :imported + 1)::bigint, 'the failed calls changed nothing');

SELECT * FROM finish();
ROLLBACK;
