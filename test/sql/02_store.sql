-- mdd: storing DICOM objects, the catalog rows they make, reading them
-- back byte for byte, what travels with what (mdd.related), and how the
-- chunks of their large objects are compressed.
SET client_min_messages = warning;

BEGIN;
SET LOCAL jit = off;  -- the tests' small queries do not pay for compilation
SELECT plan(71);

DO $$
BEGIN
	PERFORM set_config('mdd_test.pydicom',
		(SELECT trim(d) FROM unnest(string_to_array(current_setting('mdd.allowed_paths'), ',')) d
		 WHERE trim(d) ~ '/test_files/?$' LIMIT 1), true);
END;
$$;

-- path of one of pydicom's test files, of a file of the synthetic patient
CREATE FUNCTION pg_temp.td(name text) RETURNS text LANGUAGE sql STABLE
AS $$ SELECT current_setting('mdd_test.pydicom') || '/' || name $$;
CREATE FUNCTION pg_temp.pat(name text) RETURNS text LANGUAGE sql STABLE
AS $$ SELECT current_setting('mdd_test.dir') || '/allowed/patient/' || name $$;
CREATE FUNCTION pg_temp.los() RETURNS bigint LANGUAGE sql STABLE
AS $$ SELECT count(*) FROM pg_largeobject_metadata $$;

CREATE TEMP TABLE f (name text PRIMARY KEY, data bytea NOT NULL);
INSERT INTO f
SELECT n, pg_read_binary_file(pg_temp.td(n))
FROM unnest('{rtplan.dcm,rtdose.dcm,rtdose_1frame.dcm,image_dfl.dcm,MR_small_bigendian.dcm,'
			'ExplVR_BigEndNoMeta.dcm,rtstruct.dcm,CT_small.dcm}'::text[]) n;

SELECT count(*) AS objects0 FROM mdd.objects \gset
SELECT pg_temp.los() AS los0 \gset

---------------------------------------------------------------------------
-- one object, its catalog row

SELECT mdd.store((SELECT data FROM f WHERE name = 'rtplan.dcm'), 'test') AS plan_id \gset

SELECT isnt(:plan_id::bigint, NULL, 'mdd.store returns an object id');
SELECT is((SELECT count(*) FROM mdd.objects), :objects0::bigint + 1, 'mdd.store adds one row to mdd.objects');
SELECT is(pg_temp.los(), :los0::bigint + 1, 'the bytes went into one large object (storage "online")');
SELECT results_eq(
	format($$SELECT kind, patient_id, patient_name, modality, sop_class_uid, sop_instance_uid,
					study_instance_uid, series_instance_uid, study_date, content_type, tier,
					storage, source, transfer_syntax_uid
			 FROM mdd.objects WHERE id = %s$$, :plan_id),
	$$VALUES ('dicom'::text, 'id00001'::text, 'Last^First^mid^pre'::text, 'RTPLAN'::text,
			  '1.2.840.10008.5.1.4.1.1.481.5'::text, '1.2.777.777.77.7.7777.7777.20030903150023'::text,
			  '1.22.333.4.555555.6.7777777777777777777777777777'::text,
			  '1.2.333.444.55.6.7777.8888'::text, '2003-07-16'::date, 'application/dicom'::text,
			  'online'::text, 'online'::text, 'test'::text, '1.2.840.10008.1.2'::text)$$,
	'mdd.objects describes the stored RT plan');
SELECT is((SELECT size FROM mdd.objects WHERE id = :plan_id),
		  (SELECT octet_length(data)::bigint FROM f WHERE name = 'rtplan.dcm'),
		  'mdd.objects.size is the number of bytes stored');
SELECT is((SELECT sha256 FROM mdd.objects WHERE id = :plan_id),
		  (SELECT encode(sha256(data), 'hex') FROM f WHERE name = 'rtplan.dcm'),
		  'mdd.objects.sha256 is the hex SHA-256 of the bytes');
SELECT ok((SELECT ingested_at IS NOT NULL AND archived_at IS NULL FROM mdd.objects WHERE id = :plan_id),
		  'a new object has ingested_at and no archived_at');
SELECT is((SELECT header->>'RTPlanLabel' FROM mdd.objects WHERE id = :plan_id), 'Plan1',
		  'the header jsonb holds the data set''s attributes');
SELECT is((SELECT header->'ReferencedStructureSetSequence'->0->>'ReferencedSOPInstanceUID'
		   FROM mdd.objects WHERE id = :plan_id),
		  '1.2.333.444.55.6.7777.88888', 'the header jsonb holds sequences');

-- reading back
SELECT is(mdd.read(:plan_id), (SELECT data FROM f WHERE name = 'rtplan.dcm'),
		  'mdd.read returns the exact bytes stored');
SELECT is(mdd.read(:plan_id, verify => true), (SELECT data FROM f WHERE name = 'rtplan.dcm'),
		  'mdd.read with verify returns the exact bytes stored');

---------------------------------------------------------------------------
-- the same instance again

SELECT is(mdd.store((SELECT data FROM f WHERE name = 'rtplan.dcm')), :plan_id::bigint,
		  'storing the same bytes again returns the existing id');
SELECT is(mdd.store_file(pg_temp.td('rtplan.dcm')), :plan_id::bigint,
		  'storing the same file with mdd.store_file returns the existing id');
SELECT is((SELECT count(*) FROM mdd.objects), :objects0::bigint + 1, 'storing again adds no row');
SELECT is(pg_temp.los(), :los0::bigint + 1, 'storing again keeps no second copy of the bytes');
SELECT is((SELECT source FROM mdd.objects WHERE id = :plan_id), 'test',
		  'storing again leaves the catalog row as it was');

-- same SOP Instance UID, other bytes (rtdose.dcm and rtdose_1frame.dcm share it)
SELECT is((SELECT mdd.parse(data)->>'sop_instance_uid' FROM f WHERE name = 'rtdose.dcm'),
		  (SELECT mdd.parse(data)->>'sop_instance_uid' FROM f WHERE name = 'rtdose_1frame.dcm'),
		  'rtdose.dcm and rtdose_1frame.dcm share their SOP Instance UID');
SELECT mdd.store((SELECT data FROM f WHERE name = 'rtdose.dcm')) AS dose_id \gset
SELECT count(*) AS objects1 FROM mdd.objects \gset
SELECT pg_temp.los() AS los1 \gset
SELECT throws_ok($$SELECT mdd.store((SELECT data FROM f WHERE name = 'rtdose_1frame.dcm'))$$,
				 '23505', NULL, 'the same SOP Instance UID with other bytes is refused (23505)');
SELECT is((SELECT count(*) FROM mdd.objects), :objects1::bigint, 'the refused object added no row');
SELECT is(pg_temp.los(), :los1::bigint, 'the refused object left no large object behind');
SELECT is(mdd.read(:dose_id), (SELECT data FROM f WHERE name = 'rtdose.dcm'),
		  'the first version of the instance is kept');
SELECT is((SELECT number_of_frames FROM mdd.objects WHERE id = :dose_id), 15,
		  'the first version''s attributes are kept');

-- references an object makes
SELECT results_eq(format($$SELECT kind, uid, sop_class_uid FROM mdd.reference WHERE object = %s$$, :dose_id),
				  $$VALUES ('instance'::text, '1.2.123.456.78.9.0123.4567.89012345678901'::text,
							'1.2.840.10008.5.1.4.1.1.481.5'::text)$$,
				  'the RT dose''s reference to its plan is recorded');
SELECT set_eq(format($$SELECT uid FROM mdd.reference WHERE object = %s AND kind = 'instance'$$, :plan_id),
			  ARRAY['1.2.333.444.55.6.7777.88888', '1.9.999.999.99.9.9999.9999.20030903145128'],
			  'the RT plan''s references to its structure set and predecessor plan are recorded');

---------------------------------------------------------------------------
-- encodings: every transfer syntax is kept byte for byte

SELECT mdd.store((SELECT data FROM f WHERE name = 'image_dfl.dcm')) AS dfl_id \gset
SELECT mdd.store((SELECT data FROM f WHERE name = 'MR_small_bigendian.dcm')) AS be_id \gset
SELECT mdd.store((SELECT data FROM f WHERE name = 'ExplVR_BigEndNoMeta.dcm')) AS raw_id \gset
SELECT is((SELECT source FROM mdd.objects WHERE id = :dfl_id), NULL, 'mdd.store without source records none');
SELECT is((SELECT transfer_syntax_uid FROM mdd.objects WHERE id = :dfl_id), '1.2.840.10008.1.2.1.99',
		  'a deflated object is stored with its transfer syntax');
SELECT is(mdd.read(:dfl_id, true), (SELECT data FROM f WHERE name = 'image_dfl.dcm'),
		  'a deflated object reads back as stored (still deflated)');
SELECT is((SELECT modality FROM mdd.objects WHERE id = :dfl_id), 'OT',
		  'the attributes of a deflated object are read');
SELECT is((SELECT transfer_syntax_uid FROM mdd.objects WHERE id = :be_id), '1.2.840.10008.1.2.2',
		  'a big endian object is stored with its transfer syntax');
SELECT is((SELECT patient_id || ' ' || modality FROM mdd.objects WHERE id = :be_id), '4MR1 MR',
		  'the attributes of a big endian object are read');
SELECT is(mdd.read(:be_id, true), (SELECT data FROM f WHERE name = 'MR_small_bigendian.dcm'),
		  'a big endian object reads back as stored');
SELECT is((SELECT transfer_syntax_uid FROM mdd.objects WHERE id = :raw_id), '1.2.840.10008.1.2.2',
		  'a raw data set without meta information gets its detected transfer syntax');
SELECT is((SELECT sop_instance_uid || ' ' || modality FROM mdd.objects WHERE id = :raw_id),
		  '1.2.333.4444.5.6.7.8 RTPLAN', 'the attributes of a raw data set are read');
SELECT is((SELECT patient_id FROM mdd.objects WHERE id = :raw_id), '',
		  'an object without Patient ID belongs to patient ''''');
SELECT is(mdd.read(:raw_id, true), (SELECT data FROM f WHERE name = 'ExplVR_BigEndNoMeta.dcm'),
		  'a raw data set reads back as stored');

---------------------------------------------------------------------------
-- mdd.parse describes without storing

SELECT count(*) AS objects2 FROM mdd.objects \gset
SELECT ok(mdd.parse((SELECT data FROM f WHERE name = 'CT_small.dcm'))
		  ?& ARRAY['sop_instance_uid', 'sop_class_uid', 'patient_id', 'patient_name',
				   'study_instance_uid', 'series_instance_uid', 'modality', 'transfer_syntax_uid',
				   'references', 'header'],
		  'mdd.parse returns the catalog attributes, references and header');
SELECT is(mdd.parse((SELECT data FROM f WHERE name = 'CT_small.dcm'))->>'sop_instance_uid',
		  '1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322', 'mdd.parse reads the SOP Instance UID');
SELECT is(jsonb_typeof(mdd.parse((SELECT data FROM f WHERE name = 'CT_small.dcm'))->'header'), 'object',
		  'mdd.parse returns the header as a JSON object');
SELECT is(jsonb_typeof(mdd.parse((SELECT data FROM f WHERE name = 'rtdose.dcm'))->'references'), 'array',
		  'mdd.parse returns the references as a JSON array');
SELECT is((SELECT count(*) FROM mdd.objects), :objects2::bigint, 'mdd.parse stores nothing');

---------------------------------------------------------------------------
-- character sets: names are decoded into UTF-8

SELECT is(mdd.parse(pg_read_binary_file(regexp_replace(current_setting('mdd_test.pydicom'),
													   'test_files/?$', 'charset_files/chrFren.dcm')))
		  ->>'patient_name',
		  'Buc^Jérôme', 'a Latin-1 (ISO_IR 100) patient name is decoded');

---------------------------------------------------------------------------
-- mdd.store_file: file name and source

SELECT mdd.store_file(pg_temp.td('CT_small.dcm')) AS ct_small_id \gset
SELECT results_eq(format('SELECT filename, source FROM mdd.objects WHERE id = %s', :ct_small_id),
				  $$VALUES ('CT_small.dcm'::text, 'file'::text)$$,
				  'mdd.store_file records the file name and source ''file''');
SELECT is(mdd.read(:ct_small_id), (SELECT data FROM f WHERE name = 'CT_small.dcm'),
		  'a stored file reads back as it was');
SELECT mdd.store_file(pg_temp.td('rtstruct.dcm'), 'pacs') AS struct_id \gset
SELECT is((SELECT id FROM mdd.objects WHERE sop_instance_uid = '1.2.826.0.1.3680043.8.498.2010020400001'),
		  :struct_id::bigint, 'mdd.store_file returns the id of the object it stored');
SELECT is((SELECT source FROM mdd.objects WHERE id = :struct_id), 'pacs',
		  'mdd.store_file records a given source');

---------------------------------------------------------------------------
-- mdd.related: the synthetic patient, stored out of order: the dose before
-- the plan it references, the plan before its structure set, the structure
-- set before the images it was drawn on

SELECT mdd.store_file(pg_temp.pat('rtdose.dcm')) AS sdose \gset
SELECT is(array(SELECT mdd.related(:sdose)), '{}'::bigint[], 'nothing travels with a dose');
SELECT mdd.store_file(pg_temp.pat('rtplan.dcm')) AS splan \gset
SELECT is(array(SELECT mdd.related(:splan)), ARRAY[:sdose]::bigint[],
		  'a dose stored before its plan travels with the plan once the plan arrives');
SELECT mdd.store_file(pg_temp.pat('rtstruct.dcm')) AS sstruct \gset
SELECT set_eq(format('SELECT mdd.related(%s)', :sstruct), ARRAY[:splan, :sdose]::bigint[],
			  'plan and dose travel with the structure set');

CREATE TEMP TABLE ct AS
SELECT f AS name, mdd.store_file(pg_temp.pat('ct/' || f)) AS id
FROM pg_ls_dir(pg_temp.pat('ct')) f WHERE f ~ '^CT_\d+\.dcm$';
SELECT is((SELECT count(*) FROM ct), 20::bigint, 'the 20 CT slices are stored');
SELECT is((SELECT count(DISTINCT id) FROM ct), 20::bigint, 'each CT slice is an object of its own');
SELECT is((SELECT count(*) FROM mdd.objects o JOIN ct ON ct.id = o.id
		   WHERE o.patient_id = 'MDD0001' AND o.patient_name = 'Demo^Patient' AND o.modality = 'CT'
			 AND o.series_description = 'Planning CT 2.5mm'),
		  20::bigint, 'the CT slices are catalogued with patient, modality and series');
SELECT is((SELECT count(DISTINCT series_instance_uid) FROM mdd.objects o JOIN ct ON ct.id = o.id),
		  1::bigint, 'the CT slices form one series');
SELECT set_eq(format('SELECT mdd.related(%s)', (SELECT id FROM ct WHERE name = 'CT_0001.dcm')),
			  ARRAY[:sstruct, :splan, :sdose]::bigint[],
			  'structure set, plan and dose travel with the first CT slice');
SELECT set_eq(format('SELECT mdd.related(%s)', (SELECT id FROM ct ORDER BY name DESC LIMIT 1)),
			  ARRAY[:sstruct, :splan, :sdose]::bigint[],
			  'structure set, plan and dose travel with the last CT slice');
SELECT set_eq(format('SELECT mdd.related(%s)', :sstruct), ARRAY[:splan, :sdose]::bigint[],
			  'plan and dose still travel with the structure set');
SELECT set_eq(format('SELECT mdd.related(%s)', :splan), ARRAY[:sdose]::bigint[],
			  'the dose travels with the plan');
SELECT is(array(SELECT mdd.related(:sdose)), '{}'::bigint[], 'still nothing travels with the dose');
SELECT ok(NOT EXISTS (SELECT 1 FROM ct WHERE ct.id IN (SELECT mdd.related(:splan))),
		  'images do not travel with the plan (references point one way)');

SELECT mdd.store_file(pg_temp.pat('cbct/CBCT_0001.dcm')) AS cbct \gset
SELECT is(array(SELECT mdd.related(:cbct)), '{}'::bigint[],
		  'nothing travels with a CBCT slice nothing references');
SELECT ok(:cbct NOT IN (SELECT mdd.related((SELECT id FROM ct WHERE name = 'CT_0001.dcm'))),
		  'a CBCT of another study does not travel with the planning CT');
SELECT is(array(SELECT mdd.related(:plan_id)), '{}'::bigint[],
		  'a dose that references another plan does not travel with this one');

SELECT throws_ok('SELECT mdd.related(-1)', '42704', NULL, 'mdd.related of an unknown id raises 42704');
SELECT throws_ok('SELECT mdd.related(NULL)', '22004', NULL, 'mdd.related of NULL raises 22004');

-- bytes of the synthetic objects come back unchanged
SELECT is(mdd.read(:sdose, true), pg_read_binary_file(pg_temp.pat('rtdose.dcm')),
		  'the synthetic dose reads back as stored');
SELECT is((SELECT count(*) FROM ct WHERE mdd.read(id) = pg_read_binary_file(pg_temp.pat('ct/' || name))),
		  20::bigint, 'every CT slice reads back as stored');

---------------------------------------------------------------------------
-- large-object chunks are compressed with lz4, whatever the session says

-- the methods of the compressed chunks (pg_largeobject rows) of an object
CREATE FUNCTION pg_temp.chunk_methods(obj bigint) RETURNS text[] LANGUAGE sql STABLE
AS $$
	SELECT coalesce(array_agg(DISTINCT pg_column_compression(l.data)), '{}')
	FROM mdd.copy c JOIN pg_largeobject l ON l.loid = c.locator::oid
	WHERE c.object = obj AND pg_column_compression(l.data) IS NOT NULL
$$;

SET LOCAL default_toast_compression = pglz;
SELECT mdd.store_file(pg_temp.pat('cbct/CBCT_0002.dcm')) AS cbct2 \gset
SELECT mdd.store_document('id00001', convert_to(repeat('Plan approved, no change. ', 4000), 'UTF8'),
						  'notes.txt') AS notes \gset
SELECT is(pg_temp.chunk_methods(:cbct2), '{lz4}',
		  'mdd.store_file compresses large-object chunks with lz4, not the session''s pglz');
SELECT is(pg_temp.chunk_methods(:notes), '{lz4}', 'and so does mdd.store_document');
SELECT is(current_setting('default_toast_compression'), 'pglz', 'the session''s own setting stays');
SELECT is(mdd.read(:notes), convert_to(repeat('Plan approved, no change. ', 4000), 'UTF8'),
		  'the compressed document reads back as stored');

---------------------------------------------------------------------------
-- the object count stays exact through all of it

SELECT is((SELECT count(*) FROM mdd.objects), :objects0::bigint + 33,
		  'every distinct instance is one row of mdd.objects');
SELECT is(pg_temp.los(), :los0::bigint + 33, 'every distinct instance is one large object');

SELECT * FROM finish();
ROLLBACK;
