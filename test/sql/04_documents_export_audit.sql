-- mdd: documents, export, the audit trail, importing a directory, and
-- objects kept in a file storage.
SET client_min_messages = warning;

BEGIN;
SET LOCAL jit = off;  -- the tests' small queries do not pay for compilation
SELECT plan(79);

DO $$
BEGIN
	PERFORM set_config('mdd_test.pydicom',
		(SELECT trim(d) FROM unnest(string_to_array(current_setting('mdd.allowed_paths'), ',')) d
		 WHERE trim(d) ~ '/test_files/?$' LIMIT 1), true);
	-- a name no earlier run used: files written outside the transaction stay
	PERFORM set_config('mdd_test.tag', format('t04-%s-%s', txid_current(), pg_backend_pid()), true);
END;
$$;

CREATE FUNCTION pg_temp.td(name text) RETURNS text LANGUAGE sql STABLE
AS $$ SELECT current_setting('mdd_test.pydicom') || '/' || name $$;
CREATE FUNCTION pg_temp.w(name text) RETURNS text LANGUAGE sql STABLE
AS $$ SELECT current_setting('mdd_test.dir') || '/' || replace(name, '@', current_setting('mdd_test.tag')) $$;
CREATE FUNCTION pg_temp.pat(name text) RETURNS text LANGUAGE sql STABLE
AS $$ SELECT current_setting('mdd_test.dir') || '/allowed/patient/' || name $$;
CREATE FUNCTION pg_temp.los() RETURNS bigint LANGUAGE sql STABLE
AS $$ SELECT count(*) FROM pg_largeobject_metadata $$;
CREATE FUNCTION pg_temp.sh(cmd text) RETURNS void LANGUAGE plpgsql
AS $$ BEGIN EXECUTE format('COPY (SELECT 1 WHERE false) TO PROGRAM %L', cmd); END $$;
-- the regular files below a directory, recursively
CREATE FUNCTION pg_temp.files(dir text) RETURNS SETOF text LANGUAGE sql
AS $$
	WITH RECURSIVE t(path, isdir) AS (
		SELECT dir || '/' || e, (pg_stat_file(dir || '/' || e)).isdir FROM pg_ls_dir(dir) e
		UNION ALL
		SELECT t.path || '/' || e, (pg_stat_file(t.path || '/' || e)).isdir
		FROM t, pg_ls_dir(t.path) e WHERE t.isdir
	)
	SELECT path FROM t WHERE NOT isdir
$$;

CREATE TEMP TABLE f (name text PRIMARY KEY, data bytea NOT NULL);
GRANT SELECT ON f TO PUBLIC;
INSERT INTO f VALUES
	('document.pdf', pg_read_binary_file(pg_temp.pat('document.pdf'))),
	('rtplan.dcm', pg_read_binary_file(pg_temp.td('rtplan.dcm'))),
	('rtdose.dcm', pg_read_binary_file(pg_temp.td('rtdose.dcm'))),
	('CT_small.dcm', pg_read_binary_file(pg_temp.td('CT_small.dcm'))),
	('MR_small_bigendian.dcm', pg_read_binary_file(pg_temp.td('MR_small_bigendian.dcm'))),
	('image_dfl.dcm', pg_read_binary_file(pg_temp.td('image_dfl.dcm')));

CREATE ROLE mdd_t04_operator IN ROLE mdd_operator;
CREATE ROLE mdd_t04_reader IN ROLE mdd_reader;

---------------------------------------------------------------------------
-- documents

SELECT count(*) AS objects0 FROM mdd.objects \gset
SELECT pg_temp.los() AS los0 \gset
SELECT is((SELECT count(*) FROM mdd.patient WHERE patient_id = 'MDD0001'), 0::bigint,
		  'patient MDD0001 is not archived yet');
SELECT mdd.store_document('MDD0001', (SELECT data FROM f WHERE name = 'document.pdf'), 'document.pdf',
						  description => 'Treatment summary') AS doc_id \gset
SELECT results_eq(format($$SELECT kind, patient_id, content_type, filename, description, sop_instance_uid,
								  modality, tier, size, sha256
						   FROM mdd.objects WHERE id = %s$$, :doc_id),
				  $$SELECT 'document'::text, 'MDD0001'::text, 'application/pdf'::text, 'document.pdf'::text,
						   'Treatment summary'::text, NULL::text, NULL::text, 'online'::text,
						   octet_length(data)::bigint, encode(sha256(data), 'hex')
					FROM f WHERE name = 'document.pdf'$$,
				  'a stored PDF is catalogued as a document of its patient, type guessed from its bytes');
SELECT is((SELECT count(*) FROM mdd.patient WHERE patient_id = 'MDD0001'), 1::bigint,
		  'storing a document for an unknown patient creates the patient');
SELECT is(pg_temp.los(), :los0::bigint + 1, 'the document''s bytes went into one large object');
SELECT is(mdd.store_document('MDD0001', (SELECT data FROM f WHERE name = 'document.pdf'), 'document.pdf'),
		  :doc_id::bigint, 'storing the same document again returns the same id');
SELECT is((SELECT count(*) FROM mdd.objects), :objects0::bigint + 1, 'storing it again adds no row');
SELECT is(pg_temp.los(), :los0::bigint + 1, 'storing it again keeps no second copy');
SELECT is(mdd.read(:doc_id), (SELECT data FROM f WHERE name = 'document.pdf'),
		  'mdd.read returns the document''s exact bytes');
SELECT is(mdd.read(:doc_id, verify => true), (SELECT data FROM f WHERE name = 'document.pdf'),
		  'mdd.read with verify returns the document''s exact bytes');
SELECT isnt(mdd.store_document('MDD0002', (SELECT data FROM f WHERE name = 'document.pdf'), 'document.pdf'),
			:doc_id::bigint, 'the same document for another patient is an object of its own');

SELECT mdd.store_document('MDD0001', convert_to('plain notes', 'UTF8'), 'notes.txt') AS txt_id,
	   mdd.store_document('MDD0001', convert_to('# notes', 'UTF8'), 'notes.md', 'text/markdown') AS md_id,
	   mdd.store_document('MDD0001', '\x00010203', 'blob.bin') AS bin_id \gset
SELECT is((SELECT content_type FROM mdd.objects WHERE id = :txt_id), 'text/plain',
		  'the content type of a .txt document is guessed from its name');
SELECT is((SELECT content_type FROM mdd.objects WHERE id = :md_id), 'text/markdown',
		  'a given content type is kept');
SELECT is((SELECT content_type FROM mdd.objects WHERE id = :bin_id), 'application/octet-stream',
		  'an unknown document is application/octet-stream');

-- a document for a patient the archive knows from DICOM
SELECT mdd.store((SELECT data FROM f WHERE name = 'rtplan.dcm')) AS plan_id \gset
SELECT mdd.store_document('id00001', convert_to('plan approval', 'UTF8'), 'approval.txt',
						  study_instance_uid => '1.22.333.4.555555.6.7777777777777777777777777777') AS doc2_id \gset
SELECT is((SELECT count(*) FROM mdd.patient WHERE patient_id = 'id00001'), 1::bigint,
		  'a document for an archived patient reuses the patient');
SELECT results_eq(format('SELECT patient_name, study_instance_uid FROM mdd.objects WHERE id = %s', :doc2_id),
				  $$VALUES ('Last^First^mid^pre'::text, '1.22.333.4.555555.6.7777777777777777777777777777'::text)$$,
				  'the document shows the patient''s name and the study it was filed in');

---------------------------------------------------------------------------
-- export

SELECT is(mdd.export(:doc_id, pg_temp.w('allowed/@-document.pdf')),
		  (SELECT octet_length(data)::bigint FROM f WHERE name = 'document.pdf'),
		  'mdd.export returns the number of bytes written');
SELECT is(pg_read_binary_file(pg_temp.w('allowed/@-document.pdf')), (SELECT data FROM f WHERE name = 'document.pdf'),
		  'the exported file holds the document''s exact bytes');
SELECT is(mdd.export(:plan_id, pg_temp.w('allowed/@-rtplan.dcm'), verify => true),
		  (SELECT octet_length(data)::bigint FROM f WHERE name = 'rtplan.dcm'),
		  'mdd.export with verify exports a DICOM object');
SELECT is(pg_read_binary_file(pg_temp.w('allowed/@-rtplan.dcm')), (SELECT data FROM f WHERE name = 'rtplan.dcm'),
		  'the exported DICOM file holds the object''s exact bytes');
SELECT is(mdd.export(:plan_id, pg_temp.w('allowed/@-document.pdf'), overwrite => true),
		  (SELECT octet_length(data)::bigint FROM f WHERE name = 'rtplan.dcm'),
		  'mdd.export with overwrite replaces an existing file');
SELECT is(pg_read_binary_file(pg_temp.w('allowed/@-document.pdf')), (SELECT data FROM f WHERE name = 'rtplan.dcm'),
		  'the replaced file holds the new bytes, and only them');
SELECT is(mdd.store_file(pg_temp.w('allowed/@-rtplan.dcm')), :plan_id::bigint,
		  'an exported object stored again is the same object');

---------------------------------------------------------------------------
-- the audit trail

SELECT set_eq(format($$SELECT action, role::text COLLATE "default", patient_id FROM mdd.audit_log WHERE object_id = %s$$, :doc_id),
			  $$VALUES ('store', 'postgres', 'MDD0001'), ('read', 'postgres', 'MDD0001'),
					   ('export', 'postgres', 'MDD0001')$$,
			  'storing, reading and exporting the document are audited, with role and patient');
SELECT is((SELECT count(*) FROM mdd.audit_log WHERE object_id = :doc_id AND action = 'read'), 2::bigint,
		  'every read is audited');
SELECT is((SELECT detail FROM mdd.audit_log WHERE object_id = :doc_id AND action = 'export'),
		  pg_temp.w('allowed/@-document.pdf'), 'an export''s audit entry names the file written');
SELECT ok((SELECT bool_and(at IS NOT NULL AND client IS NOT NULL) FROM mdd.audit_log WHERE object_id = :doc_id),
		  'audit entries have a time and a client');

-- the role recorded is the caller's, not the owner of mdd's functions
SET LOCAL ROLE mdd_t04_operator;
SELECT mdd.store((SELECT data FROM f WHERE name = 'CT_small.dcm')) AS op_id \gset
SELECT is(mdd.read(:op_id), (SELECT data FROM f WHERE name = 'CT_small.dcm'), 'an operator reads an object');
SELECT is(mdd.export(:op_id, pg_temp.w('allowed/@-op.dcm')),
		  (SELECT octet_length(data)::bigint FROM f WHERE name = 'CT_small.dcm'),
		  'an operator exports an object inside the allowed directories');
SELECT mdd.store_document('1CT1', convert_to('referral', 'UTF8'), 'referral.txt') AS op_doc_id \gset
RESET ROLE;
SET LOCAL ROLE mdd_t04_reader;
SELECT is(mdd.read(:op_id, true), (SELECT data FROM f WHERE name = 'CT_small.dcm'), 'a reader reads the object');
RESET ROLE;
SELECT set_eq(format($$SELECT action, role::text COLLATE "default" FROM mdd.audit_log WHERE object_id = %s$$, :op_id),
			  $$VALUES ('store', 'mdd_t04_operator'), ('read', 'mdd_t04_operator'),
					   ('export', 'mdd_t04_operator'), ('read', 'mdd_t04_reader')$$,
			  'the audit trail records the calling roles, not the functions'' owner');
SELECT results_eq(format($$SELECT action, role::text COLLATE "default", patient_id FROM mdd.audit_log WHERE object_id = %s$$, :op_doc_id),
				  $$VALUES ('store'::text, 'mdd_t04_operator'::text, '1CT1'::text)$$,
				  'a document stored by an operator is audited with the operator''s role');
SELECT is(pg_read_binary_file(pg_temp.w('allowed/@-op.dcm')), (SELECT data FROM f WHERE name = 'CT_small.dcm'),
		  'the operator''s export holds the object''s exact bytes');

---------------------------------------------------------------------------
-- importing the synthetic patient's directory

CREATE TEMP TABLE imp AS SELECT * FROM mdd.import(pg_temp.pat(''));
SELECT set_eq('SELECT path FROM imp', format('SELECT pg_temp.files(%L)', rtrim(pg_temp.pat(''), '/')),
			  'mdd.import returns one row per file below the directory');
SELECT is((SELECT count(*) FROM imp), (SELECT count(DISTINCT path) FROM imp), 'mdd.import lists each file once');
SELECT ok((SELECT count(*) FROM imp WHERE path ~ '\.dcm$') >= 60, 'the directory holds the DICOM files');
SELECT is(array(SELECT regexp_replace(path, '^.*/', '') FROM imp WHERE object_id IS NULL ORDER BY 1),
		  '{document.pdf,manifest.json}'::text[], 'the PDF and manifest.json are not stored');
SELECT ok((SELECT bool_and(error IS NOT NULL AND error <> '') FROM imp WHERE object_id IS NULL),
		  'each file not stored has an error');
SELECT ok((SELECT bool_and(object_id IS NOT NULL AND error IS NULL) FROM imp WHERE path ~ '\.dcm$'),
		  'each DICOM file has an object id and no error');
SELECT is((SELECT count(DISTINCT object_id) FROM imp), (SELECT count(*) FROM imp WHERE path ~ '\.dcm$'),
		  'each DICOM file is an object of its own');
SELECT is((SELECT count(*) FROM mdd.objects o JOIN imp ON imp.object_id = o.id
		   WHERE o.source = 'import' AND o.filename = regexp_replace(imp.path, '^.*/', '') AND o.patient_id = 'MDD0001'),
		  (SELECT count(*) FROM imp WHERE object_id IS NOT NULL),
		  'imported objects are catalogued with source, file name and patient');
SELECT is((SELECT count(*) FROM mdd.objects o JOIN imp ON imp.object_id = o.id
		   WHERE mdd.read(o.id) = pg_read_binary_file(imp.path)),
		  (SELECT count(*) FROM imp WHERE object_id IS NOT NULL),
		  'every imported object reads back as its file');
SELECT is((SELECT count(*) FROM mdd.objects o JOIN imp ON imp.object_id = o.id
		   WHERE o.patient_name = 'Demo^Patient'),
		  (SELECT count(*) FROM imp WHERE object_id IS NOT NULL),
		  'imported objects show the patient''s name, though a document created the patient first');
SELECT set_eq(format('SELECT mdd.related(%s)', (SELECT object_id FROM imp WHERE path ~ '/ct/CT_0001\.dcm$')),
			  $$SELECT object_id FROM imp WHERE path ~ '/(rtstruct|rtplan|rtdose)\.dcm$'$$,
			  'imported: structure set, plan and dose travel with the first CT slice');
SELECT ok((SELECT detail ~ 'files' FROM mdd.audit_log WHERE action = 'import' ORDER BY at DESC LIMIT 1),
		  'an import is audited with what it did');
SELECT count(*) AS objects_imported FROM mdd.objects \gset
SELECT set_eq(format('SELECT object_id FROM mdd.import(%L) WHERE object_id IS NOT NULL', pg_temp.pat('')),
			  'SELECT object_id FROM imp WHERE object_id IS NOT NULL',
			  'importing the directory again returns the same ids');
SELECT is((SELECT count(*) FROM mdd.objects), :objects_imported::bigint, 'importing again adds no object');

---------------------------------------------------------------------------
-- a file storage receiving new objects

DO $$
BEGIN
	PERFORM pg_temp.sh(format('mkdir %L %L', pg_temp.w('allowed/@-disk'), pg_temp.w('allowed/@-cold')));
END;
$$;
SELECT lives_ok(format('SELECT mdd.add_storage(%L, %L, %L, %L)', 't04disk', 'file', 'online',
					   jsonb_build_object('root', pg_temp.w('allowed/@-disk'))),
				'a file storage is added');
SELECT lives_ok(format('SELECT mdd.add_storage(%L, %L, %L, %L)', 't04cold', 'file', 'archive',
					   jsonb_build_object('root', pg_temp.w('allowed/@-cold'), 'fanout', 0)),
				'an archive-tier file storage is added');
SELECT lives_ok($$SELECT mdd.add_storage('t04lo', 'large_object', 'archive')$$,
				'a second large object storage is added');
SELECT results_eq($$SELECT name, kind, tier, objects, bytes, receives_new_objects, options->>'fanout'
					FROM mdd.storages WHERE name LIKE 't04%' ORDER BY name$$,
				  $$VALUES ('t04cold'::text, 'file'::text, 'archive'::text, 0::bigint, 0::bigint, false, '0'::text),
						   ('t04disk', 'file', 'online', 0, 0, false, '2'),
						   ('t04lo', 'large_object', 'archive', 0, 0, false, NULL)$$,
				  'mdd.storages lists the new storages, empty');
SELECT is((SELECT options->>'root' FROM mdd.storages WHERE name = 't04disk'), pg_temp.w('allowed/@-disk'),
		  'mdd.storages shows a file storage''s root');

SELECT objects AS online_objects, bytes AS online_bytes FROM mdd.storages WHERE name = 'online' \gset
SELECT pg_temp.los() AS los1 \gset
SET LOCAL mdd.default_storage = 't04disk';
SELECT is((SELECT array_agg(name) FROM mdd.storages WHERE receives_new_objects), '{t04disk}'::text[],
		  'mdd.storages shows which storage receives new objects');

CREATE TEMP TABLE disk AS
SELECT name, mdd.store(data) AS id FROM f
WHERE name IN ('rtdose.dcm', 'MR_small_bigendian.dcm', 'image_dfl.dcm');
INSERT INTO disk
SELECT 'notes.txt', mdd.store_document('MDD0001', convert_to('notes kept on disk', 'UTF8'), 'disk-notes.txt');
SELECT is((SELECT count(*) FROM disk WHERE id IS NOT NULL), 4::bigint, 'objects are stored in the file storage');
SELECT is(pg_temp.los(), :los1::bigint, 'no large object was made for them');
SELECT is((SELECT count(*) FROM pg_temp.files(pg_temp.w('allowed/@-disk'))), 4::bigint,
		  'the file storage holds one file per object');
SELECT ok((SELECT bool_and(o.storage = 't04disk' AND o.tier = 'online') FROM mdd.objects o JOIN disk USING (id)),
		  'mdd.objects shows the objects in the file storage, tier online');
SELECT is((SELECT count(*) FROM disk JOIN f USING (name) WHERE mdd.read(disk.id) = f.data), 3::bigint,
		  'DICOM objects read back from the file storage byte for byte');
SELECT is((SELECT count(*) FROM disk JOIN f USING (name) WHERE mdd.read(disk.id, verify => true) = f.data), 3::bigint,
		  'DICOM objects read back from the file storage with verify');
SELECT is(mdd.read((SELECT id FROM disk WHERE name = 'notes.txt'), true), convert_to('notes kept on disk', 'UTF8'),
		  'a document reads back from the file storage');
SELECT is(mdd.read(:plan_id, true), (SELECT data FROM f WHERE name = 'rtplan.dcm'),
		  'objects stored before still read back from storage "online"');
SELECT is((SELECT sum(size)::bigint FROM mdd.objects o JOIN disk USING (id)),
		  (SELECT sum(octet_length(data))::bigint FROM f
		   WHERE name IN ('rtdose.dcm', 'MR_small_bigendian.dcm', 'image_dfl.dcm'))
		  + octet_length(convert_to('notes kept on disk', 'UTF8')),
		  'the catalogued sizes are the sizes of the bytes stored');
SELECT results_eq($$SELECT objects, bytes FROM mdd.storages WHERE name = 't04disk'$$,
				  $$SELECT count(*), sum(o.size)::bigint FROM mdd.objects o JOIN disk USING (id)$$,
				  'mdd.storages counts the objects and bytes of the file storage');
SELECT results_eq($$SELECT objects, bytes FROM mdd.storages WHERE name = 'online'$$,
				  format('VALUES (%s::bigint, %s::bigint)', :online_objects, :online_bytes),
				  'mdd.storages: storage "online" holds what it held before');
SELECT is(mdd.store((SELECT data FROM f WHERE name = 'rtdose.dcm')), (SELECT id FROM disk WHERE name = 'rtdose.dcm'),
		  'storing an object kept in the file storage again returns its id');
SELECT is((SELECT count(*) FROM pg_temp.files(pg_temp.w('allowed/@-disk'))), 4::bigint,
		  'and writes no second file');
SELECT is(mdd.export((SELECT id FROM disk WHERE name = 'image_dfl.dcm'), pg_temp.w('allowed/@-dfl.dcm'), verify => true),
		  (SELECT octet_length(data)::bigint FROM f WHERE name = 'image_dfl.dcm'),
		  'an object in the file storage is exported');
SELECT is(pg_read_binary_file(pg_temp.w('allowed/@-dfl.dcm')), (SELECT data FROM f WHERE name = 'image_dfl.dcm'),
		  'the export from the file storage holds the exact bytes');

-- an archive-tier storage without fan-out
SET LOCAL mdd.default_storage = 't04cold';
SELECT mdd.store_document('MDD0001', convert_to('cold notes', 'UTF8'), 'cold.txt') AS cold_id \gset
SELECT is((SELECT array_agg(pg_read_binary_file(pg_temp.w('allowed/@-cold/') || e)) FROM pg_ls_dir(pg_temp.w('allowed/@-cold')) e),
		  ARRAY[convert_to('cold notes', 'UTF8')],
		  'without fan-out the object''s file lies in the storage root itself');
SELECT results_eq(format('SELECT storage, tier FROM mdd.objects WHERE id = %s', :cold_id),
				  $$VALUES ('t04cold'::text, 'archive'::text)$$,
				  'an object only an archive-tier storage holds is in tier archive');
SELECT is(mdd.read(:cold_id, true), convert_to('cold notes', 'UTF8'), 'it reads back');

-- a second large object storage
SET LOCAL mdd.default_storage = 't04lo';
SELECT mdd.store_document('MDD0001', convert_to('lo notes', 'UTF8'), 'lo.txt') AS lo_id \gset
SELECT is(pg_temp.los(), :los1::bigint + 1, 'a large object storage keeps the bytes in a large object');
SELECT results_eq($$SELECT objects, bytes FROM mdd.storages WHERE name = 't04lo'$$,
				  format('VALUES (1::bigint, %s::bigint)', octet_length(convert_to('lo notes', 'UTF8'))),
				  'mdd.storages counts each large object storage apart');
SELECT is(mdd.read(:lo_id, true), convert_to('lo notes', 'UTF8'), 'it reads back');

---------------------------------------------------------------------------
-- damaged copies are noticed

-- four bytes overwritten in the middle of a file of the file storage
DO $$
BEGIN
	PERFORM pg_temp.sh(format('printf XXXX | dd of=%L bs=1 seek=200 conv=notrunc status=none', p))
	FROM pg_temp.files(pg_temp.w('allowed/@-disk')) p
	WHERE pg_read_binary_file(p) = (SELECT data FROM f WHERE name = 'rtdose.dcm');
	-- bytes appended to another
	PERFORM pg_temp.sh(format('printf XXXX >> %L', p))
	FROM pg_temp.files(pg_temp.w('allowed/@-disk')) p
	WHERE pg_read_binary_file(p) = (SELECT data FROM f WHERE name = 'MR_small_bigendian.dcm');
	-- and four bytes overwritten in the large object of an object of storage "online"
	PERFORM lo_put(m.oid, 200, '\x58585858')
	FROM pg_largeobject_metadata m WHERE lo_get(m.oid) = (SELECT data FROM f WHERE name = 'rtplan.dcm');
END;
$$;
SELECT throws_ok(format('SELECT mdd.read(%s, verify => true)', (SELECT id FROM disk WHERE name = 'rtdose.dcm')),
				 'XX001', NULL, 'mdd.read with verify notices a damaged file (XX001)');
SELECT throws_ok(format('SELECT mdd.export(%s, %L, verify => true)', (SELECT id FROM disk WHERE name = 'rtdose.dcm'),
						pg_temp.w('allowed/@-damaged.dcm')),
				 'XX001', NULL, 'mdd.export with verify refuses a damaged file (XX001)');
SELECT ok(NOT EXISTS (SELECT 1 FROM pg_ls_dir(pg_temp.w('allowed')) e
					  WHERE e = current_setting('mdd_test.tag') || '-damaged.dcm'),
		  'the refused export wrote no file');
SELECT throws_ok(format('SELECT mdd.read(%s)', (SELECT id FROM disk WHERE name = 'MR_small_bigendian.dcm')),
				 'XX001', NULL, 'mdd.read notices a file of the wrong size even without verify (XX001)');
SELECT throws_ok(format('SELECT mdd.read(%s, verify => true)', :plan_id),
				 'XX001', NULL, 'mdd.read with verify notices a damaged large object (XX001)');
SELECT is(mdd.read((SELECT id FROM disk WHERE name = 'image_dfl.dcm'), verify => true),
		  (SELECT data FROM f WHERE name = 'image_dfl.dcm'), 'undamaged objects still read back');

SELECT * FROM finish();
ROLLBACK;
