-- mdd: every bad input is refused with its SQLSTATE and leaves nothing
-- behind: no catalog row, no large object, no file in a file storage.
SET client_min_messages = warning;

BEGIN;
SET LOCAL jit = off;  -- the tests' small queries do not pay for compilation
SELECT plan(126);

DO $$
BEGIN
	PERFORM set_config('mdd_test.pydicom',
		(SELECT trim(d) FROM unnest(string_to_array(current_setting('mdd.allowed_paths'), ',')) d
		 WHERE trim(d) ~ '/test_files/?$' LIMIT 1), true);
	-- a name no earlier run used: files written outside the transaction stay
	PERFORM set_config('mdd_test.tag', format('t03-%s-%s', txid_current(), pg_backend_pid()), true);
END;
$$;

CREATE FUNCTION pg_temp.td(name text) RETURNS text LANGUAGE sql STABLE
AS $$ SELECT current_setting('mdd_test.pydicom') || '/' || name $$;
CREATE FUNCTION pg_temp.w(name text) RETURNS text LANGUAGE sql STABLE
AS $$ SELECT current_setting('mdd_test.dir') || '/' || replace(name, '@', current_setting('mdd_test.tag')) $$;
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

-- what a refused input must not change
CREATE FUNCTION pg_temp.state() RETURNS text LANGUAGE sql
AS $$
	SELECT format('objects=%s patients=%s studies=%s series=%s references=%s copies=%s los=%s audit=%s files=%s',
				  (SELECT count(*) FROM mdd.object), (SELECT count(*) FROM mdd.patient),
				  (SELECT count(*) FROM mdd.study), (SELECT count(*) FROM mdd.series),
				  (SELECT count(*) FROM mdd.reference), (SELECT count(*) FROM mdd.copy),
				  (SELECT count(*) FROM pg_largeobject_metadata),
				  (SELECT count(*) FROM mdd.audit),
				  (SELECT count(*) FROM pg_temp.files(pg_temp.w('allowed/@-disk'))))
$$;

CREATE TEMP TABLE f (name text PRIMARY KEY, data bytea NOT NULL);
GRANT SELECT ON f TO PUBLIC;
INSERT INTO f
SELECT n, pg_read_binary_file(pg_temp.td(n))
FROM unnest('{rtplan.dcm,rtdose.dcm,rtdose_1frame.dcm,CT_small.dcm,MR_truncated.dcm,'
			'rtplan_truncated.dcm,meta_missing_tsyntax.dcm,README.txt}'::text[]) n;
-- data with one text replaced by another of the same length
CREATE FUNCTION pg_temp.sub(data bytea, old text, new text) RETURNS bytea LANGUAGE sql
AS $$ SELECT decode(replace(encode(data, 'hex'), encode(convert_to(old, 'UTF8'), 'hex'),
							encode(convert_to(new, 'UTF8'), 'hex')), 'hex') $$;
-- the study of rtplan.dcm, another patient and instance
INSERT INTO f
SELECT 'rtplan_other_patient',
	   pg_temp.sub(pg_temp.sub(data, 'id00001', 'id00002'), '20030903150023', '20030903150024')
FROM f WHERE name = 'rtplan.dcm';
-- the series of rtplan.dcm in another study, another instance
INSERT INTO f
SELECT 'rtplan_other_study',
	   pg_temp.sub(pg_temp.sub(data, '1.22.333.4.555555.6.7777777777777777777777777777',
							   '1.22.333.4.555555.6.7777777777777777777777777778'),
				   '20030903150023', '20030903150025')
FROM f WHERE name = 'rtplan.dcm';
INSERT INTO f VALUES
	('garbage', convert_to(repeat('this is not a DICOM file. ', 40), 'UTF8')),
	('dicm_garbage', decode(repeat('00', 128), 'hex') || convert_to('DICM', 'UTF8')
					 || decode(repeat('fe', 300), 'hex'));

CREATE ROLE mdd_t03_operator IN ROLE mdd_operator;
CREATE ROLE mdd_t03_admin IN ROLE mdd_admin;

-- a file storage root, a file outside the allowed directories, and
-- symbolic links from inside to outside
SELECT mdd.store((SELECT data FROM f WHERE name = 'rtplan.dcm')) AS plan_id \gset
SELECT mdd.export(:plan_id, pg_temp.w('outside/@.dcm')) AS exported \gset
DO $$
BEGIN
	PERFORM pg_temp.sh(format('mkdir %L', pg_temp.w('allowed/@-disk')));
	PERFORM pg_temp.sh(format('mkdir %L', pg_temp.w('allowed/@-import')));
	PERFORM pg_temp.sh(format('ln -s %L %L', pg_temp.w('outside/@.dcm'), pg_temp.w('allowed/@-link.dcm')));
	PERFORM pg_temp.sh(format('ln -s %L %L', pg_temp.w('outside'), pg_temp.w('allowed/@-linkdir')));
	PERFORM pg_temp.sh(format('ln -s %L %L', pg_temp.w('outside/@.dcm'), pg_temp.w('allowed/@-import/evil.dcm')));
	PERFORM pg_temp.sh(format('cp %L %L', pg_temp.td('CT_small.dcm'), pg_temp.w('allowed/@-import/good.dcm')));
END;
$$;

SELECT pg_temp.state() AS state0 \gset

---------------------------------------------------------------------------
-- DICOM bytes

SELECT throws_ok('SELECT mdd.store(NULL)', '22004', NULL, 'mdd.store(NULL) raises 22004');
SELECT throws_ok($$SELECT mdd.store('')$$, '22023', NULL, 'mdd.store of empty bytes raises 22023');
SELECT throws_ok($$SELECT mdd.store((SELECT data FROM f WHERE name = 'garbage'))$$, '22P03', NULL,
				 'mdd.store of text raises 22P03');
SELECT throws_ok($$SELECT mdd.store('\xdeadbeef')$$, '22P03', NULL,
				 'mdd.store of four random bytes raises 22P03');
SELECT throws_ok($$SELECT mdd.store((SELECT data FROM f WHERE name = 'dicm_garbage'))$$, '22P03', NULL,
				 'mdd.store of a DICM preamble followed by garbage raises 22P03');
SELECT throws_ok($$SELECT mdd.store((SELECT data FROM f WHERE name = 'README.txt'))$$, '22P03', NULL,
				 'mdd.store of README.txt raises 22P03');
SELECT throws_ok($$SELECT mdd.store((SELECT data FROM f WHERE name = 'MR_truncated.dcm'))$$, '22P03', NULL,
				 'mdd.store of MR_truncated.dcm raises 22P03');
SELECT throws_ok($$SELECT mdd.store((SELECT data FROM f WHERE name = 'rtplan_truncated.dcm'))$$, '22P03', NULL,
				 'mdd.store of rtplan_truncated.dcm raises 22P03');
SELECT throws_ok($$SELECT mdd.store(substr((SELECT data FROM f WHERE name = 'CT_small.dcm'), 1, 20000))$$,
				 '22P03', NULL, 'mdd.store of a CT cut in the middle of its pixel data raises 22P03');
SELECT throws_ok($$SELECT mdd.store((SELECT data FROM f WHERE name = 'meta_missing_tsyntax.dcm'))$$,
				 '22004', NULL, 'mdd.store of an object without SOP Instance UID raises 22004');
SELECT throws_ok($$SELECT mdd.store((SELECT data FROM f WHERE name = 'rtdose_1frame.dcm'))
				   + mdd.store((SELECT data FROM f WHERE name = 'rtdose.dcm'))$$, '23505', NULL,
				 'two versions of one instance in one statement raise 23505');
SELECT is((SELECT mdd.parse(data)->>'study_instance_uid' || ' ' || (mdd.parse(data)->>'patient_id')
		   FROM f WHERE name = 'rtplan_other_patient'),
		  '1.22.333.4.555555.6.7777777777777777777777777777 id00002',
		  'rtplan_other_patient: the study of rtplan.dcm for patient id00002');
SELECT throws_ok($$SELECT mdd.store((SELECT data FROM f WHERE name = 'rtplan_other_patient'))$$,
				 '23000', NULL, 'an object in a study archived for another patient raises 23000');
SELECT is((SELECT mdd.parse(data)->>'series_instance_uid' || ' ' || (mdd.parse(data)->>'study_instance_uid')
		   FROM f WHERE name = 'rtplan_other_study'),
		  '1.2.333.444.55.6.7777.8888 1.22.333.4.555555.6.7777777777777777777777777778',
		  'rtplan_other_study: the series of rtplan.dcm in another study');
SELECT throws_ok($$SELECT mdd.store((SELECT data FROM f WHERE name = 'rtplan_other_study'))$$,
				 '23000', NULL, 'an object in a series archived for another study raises 23000');
SELECT is(pg_temp.state(), :'state0', 'refused DICOM bytes left nothing behind');

---------------------------------------------------------------------------
-- files and paths

SELECT throws_ok($$SELECT mdd.store_file(NULL)$$, '22004', NULL, 'mdd.store_file(NULL) raises 22004');
SELECT throws_ok($$SELECT mdd.store_file('')$$, '22023', NULL, 'mdd.store_file('''') raises 22023');
SELECT throws_ok($$SELECT mdd.store_file('allowed/patient/rtplan.dcm')$$, '22023', NULL,
				 'mdd.store_file of a relative path raises 22023');
SELECT throws_ok(format('SELECT mdd.store_file(%L)', pg_temp.td('README.txt')), '22P03', NULL,
				 'mdd.store_file of README.txt raises 22P03');
SELECT throws_ok(format('SELECT mdd.store_file(%L)', pg_temp.td('MR_truncated.dcm')), '22P03', NULL,
				 'mdd.store_file of MR_truncated.dcm raises 22P03');
SELECT throws_ok(format('SELECT mdd.store_file(%L)', pg_temp.td('rtplan_truncated.dcm')), '22P03', NULL,
				 'mdd.store_file of rtplan_truncated.dcm raises 22P03');
SELECT throws_ok(format('SELECT mdd.store_file(%L)', pg_temp.td('meta_missing_tsyntax.dcm')), '22004', NULL,
				 'mdd.store_file of an object without SOP Instance UID raises 22004');
SELECT throws_ok(format('SELECT mdd.store_file(%L)', pg_temp.w('allowed/@-no-such-file.dcm')), '58P01', NULL,
				 'mdd.store_file of a missing file raises 58P01');
SELECT throws_ok(format('SELECT mdd.store_file(%L)', pg_temp.w('allowed/patient')), '42809', NULL,
				 'mdd.store_file of a directory raises 42809');
-- a FIFO with a writer that only turns up after 2 seconds (and gives up after 5)
DO $$
BEGIN
	PERFORM pg_temp.sh(format('mkdir %L && mkfifo %L && (timeout 5 sh -c %L </dev/null >/dev/null 2>&1 &)',
							  pg_temp.w('allowed/@-fifo'), pg_temp.w('allowed/@-fifo/pipe.dcm'),
							  format('sleep 2; echo x > %s', pg_temp.w('allowed/@-fifo/pipe.dcm'))));
	PERFORM set_config('mdd_test.t0', clock_timestamp()::text, true);
END;
$$;
SELECT throws_ok(format('SELECT mdd.store_file(%L)', pg_temp.w('allowed/@-fifo/pipe.dcm')), '42809', NULL,
				 'mdd.store_file of a FIFO raises 42809');
SELECT cmp_ok(clock_timestamp() - current_setting('mdd_test.t0')::timestamptz, '<', interval '1 s',
			  'mdd.store_file of a FIFO does not block waiting for a writer (an uncancellable open())');
SELECT throws_ok(format('SELECT * FROM mdd.import(%L)', pg_temp.w('allowed/patient/rtplan.dcm')), '42809', NULL,
				 'mdd.import of a file raises 42809');
SELECT throws_ok(format('SELECT * FROM mdd.import(%L)', pg_temp.w('allowed/@-no-such-dir')), '58P01', NULL,
				 'mdd.import of a missing directory raises 58P01');
SELECT throws_ok($$SELECT * FROM mdd.import('allowed/patient')$$, '22023', NULL,
				 'mdd.import of a relative path raises 22023');
SELECT throws_ok($$SELECT * FROM mdd.import(NULL)$$, '22004', NULL, 'mdd.import(NULL) raises 22004');

-- a superuser is held to mdd.allowed_paths too once mdd.superuser_any_path is off
SET LOCAL mdd.superuser_any_path = off;
SELECT throws_ok(format('SELECT mdd.store_file(%L)', pg_temp.w('outside/@.dcm')), '42501', NULL,
				 'with mdd.superuser_any_path off, a superuser may not store a file outside the allowed directories');
RESET mdd.superuser_any_path;
SELECT is(pg_temp.state(), :'state0', 'refused files left nothing behind');

-- a role of the clinic is held to mdd.allowed_paths
SET LOCAL ROLE mdd_t03_operator;
SELECT throws_ok(format('SELECT mdd.store_file(%L)', pg_temp.w('outside/@.dcm')), '42501', NULL,
				 'an operator may not store a file outside the allowed directories');
SELECT throws_ok(format('SELECT mdd.store_file(%L)', pg_temp.w('allowed/../outside/@.dcm')), '42501', NULL,
				 'an operator may not climb out of the allowed directories with ".."');
SELECT throws_ok(format('SELECT mdd.store_file(%L)', pg_temp.w('allowed/@-link.dcm')), '42501', NULL,
				 'an operator may not follow a symbolic link out of the allowed directories');
SELECT throws_ok(format('SELECT mdd.store_file(%L)', pg_temp.w('allowed/@-linkdir/@.dcm')), '42501', NULL,
				 'an operator may not go through a linked directory out of the allowed directories');
SELECT throws_ok($$SELECT mdd.store_file('/etc/passwd')$$, '42501', NULL,
				 'an operator may not read /etc/passwd');
SELECT throws_ok(format('SELECT mdd.store_file(%L)', pg_temp.w('outside/@-no-such-file.dcm')), '42501', NULL,
				 'an operator learns nothing about missing files outside the allowed directories (42501, not 58P01)');
SELECT throws_ok(format('SELECT * FROM mdd.import(%L)', pg_temp.w('outside')), '42501', NULL,
				 'an operator may not import a directory outside the allowed directories');
SELECT throws_ok(format('SELECT * FROM mdd.import(%L)', pg_temp.w('allowed/@-linkdir')), '42501', NULL,
				 'an operator may not import a linked directory outside the allowed directories');
SELECT results_eq(format($$SELECT regexp_replace(path, '^.*/', ''), object_id IS NOT NULL,
								  coalesce(error ~ 'outside the allowed directories', false)
						   FROM mdd.import(%L) ORDER BY path$$, pg_temp.w('allowed/@-import')),
				  $$VALUES ('evil.dcm', false, true), ('good.dcm', true, false)$$,
				  'an operator''s import skips a symbolic link out of the allowed directories, with an error row');
SELECT throws_ok(format('SELECT mdd.store_file(%L)', pg_temp.td('README.txt')), '22P03', NULL,
				 'an operator storing README.txt gets 22P03');
SELECT throws_ok(format('SELECT mdd.store_file(%L)', pg_temp.w('allowed/@-no-such-file.dcm')), '58P01', NULL,
				 'an operator storing a missing file inside the allowed directories gets 58P01');
RESET ROLE;
SELECT is((SELECT count(*) FROM mdd.objects WHERE sop_instance_uid = '1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322'),
		  1::bigint, 'the operator''s import stored the good file');
SELECT ok(NOT EXISTS (SELECT 1 FROM mdd.objects WHERE source = 'import' AND filename = 'evil.dcm'),
		  'the operator''s import did not store the linked file');

-- forget the operator's import for the checks that follow
SELECT pg_temp.state() AS state0 \gset

---------------------------------------------------------------------------
-- reading and exporting

SELECT throws_ok('SELECT mdd.read(-1)', '42704', NULL, 'mdd.read of a missing object raises 42704');
SELECT throws_ok('SELECT mdd.read(NULL)', '22004', NULL, 'mdd.read(NULL) raises 22004');
SELECT throws_ok(format('SELECT mdd.export(-1, %L)', pg_temp.w('allowed/@-missing.dcm')), '42704', NULL,
				 'mdd.export of a missing object raises 42704');
SELECT ok(NOT EXISTS (SELECT 1 FROM pg_ls_dir(pg_temp.w('allowed')) e WHERE e = current_setting('mdd_test.tag') || '-missing.dcm'),
		  'mdd.export of a missing object writes no file');
SELECT throws_ok(format('SELECT mdd.export(%s, %L)', :plan_id, pg_temp.w('outside/@.dcm')), '58P02', NULL,
				 'mdd.export onto an existing file raises 58P02');
SELECT throws_ok(format('SELECT mdd.export(%s, %L, overwrite => false)', :plan_id, pg_temp.w('outside/@.dcm')),
				 '58P02', NULL, 'mdd.export onto an existing file with overwrite => false raises 58P02');
SELECT throws_ok(format('SELECT mdd.export(%s, %L)', :plan_id, pg_temp.w('allowed/patient')), '42809', NULL,
				 'mdd.export onto a directory raises 42809');
SELECT throws_ok(format('SELECT mdd.export(%s, %L)', :plan_id, pg_temp.w('allowed/@-no-such-dir/x.dcm')),
				 '58P01', NULL, 'mdd.export into a missing directory raises 58P01');
SELECT throws_ok(format('SELECT mdd.export(%s, %L)', :plan_id, 'allowed/x.dcm'), '22023', NULL,
				 'mdd.export to a relative path raises 22023');
SELECT throws_ok(format('SELECT mdd.export(%s, %L)', :plan_id, pg_temp.w('allowed/')), '42809', NULL,
				 'mdd.export to a path ending in "/" raises 42809');
SELECT throws_ok(format('SELECT mdd.export(%s, NULL)', :plan_id), '22004', NULL,
				 'mdd.export to NULL raises 22004');

SET LOCAL ROLE mdd_t03_operator;
SELECT throws_ok(format('SELECT mdd.export(%s, %L)', :plan_id, pg_temp.w('outside/@-op.dcm')), '42501', NULL,
				 'an operator may not export outside the allowed directories');
SELECT throws_ok(format('SELECT mdd.export(%s, %L)', :plan_id, pg_temp.w('allowed/../outside/@-op.dcm')),
				 '42501', NULL, 'an operator may not export out of the allowed directories with ".."');
SELECT throws_ok(format('SELECT mdd.export(%s, %L)', :plan_id, pg_temp.w('allowed/@-linkdir/@-op.dcm')),
				 '42501', NULL, 'an operator may not export through a linked directory');
SELECT throws_ok(format('SELECT mdd.export(%s, %L, overwrite => true)', :plan_id, pg_temp.w('allowed/@-link.dcm')),
				 '42501', NULL, 'an operator may not overwrite a file outside through a symbolic link');
SELECT throws_ok(format('SELECT mdd.export(%s, %L)', :plan_id, '/' || current_setting('mdd_test.tag') || '/x.dcm'),
				 '42501', NULL,
				 'an operator learns nothing about missing directories outside the allowed directories (42501, not 58P01)');
RESET ROLE;
SELECT ok(NOT EXISTS (SELECT 1 FROM pg_ls_dir(pg_temp.w('outside')) e WHERE e = current_setting('mdd_test.tag') || '-op.dcm'),
		  'the operator''s refused exports wrote nothing outside');
SELECT is(pg_read_binary_file(pg_temp.w('outside/@.dcm')), (SELECT data FROM f WHERE name = 'rtplan.dcm'),
		  'the file the operator tried to overwrite through a link is unchanged');

---------------------------------------------------------------------------
-- documents

SELECT throws_ok($$SELECT mdd.store_document(NULL, 'abc', 'a.txt')$$, '22004', NULL,
				 'mdd.store_document without patient id raises 22004');
SELECT throws_ok($$SELECT mdd.store_document('', 'abc', 'a.txt')$$, '22004', NULL,
				 'mdd.store_document with an empty patient id raises 22004');
SELECT throws_ok($$SELECT mdd.store_document('P03', NULL, 'a.txt')$$, '22004', NULL,
				 'mdd.store_document without data raises 22004');
SELECT throws_ok($$SELECT mdd.store_document('P03', '', 'a.txt')$$, '22023', NULL,
				 'mdd.store_document of empty data raises 22023');
SELECT throws_ok($$SELECT mdd.store_document('P03', 'abc', 'dir/a.txt')$$, '22023', NULL,
				 'mdd.store_document with a "/" in the file name raises 22023');
SELECT throws_ok($$SELECT mdd.store_document('P03', 'abc', 'dir\a.txt')$$, '22023', NULL,
				 'mdd.store_document with a "\" in the file name raises 22023');
SELECT throws_ok($$SELECT mdd.store_document('P03', 'abc', '')$$, '22023', NULL,
				 'mdd.store_document with an empty file name raises 22023');
SELECT throws_ok($$SELECT mdd.store_document('P03', 'abc', NULL)$$, '22023', NULL,
				 'mdd.store_document without file name raises 22023');
SELECT throws_ok($$SELECT mdd.store_document('P03', 'abc', 'a.txt',
											 study_instance_uid => '1.22.333.4.555555.6.7777777777777777777777777777')$$,
				 '23000', NULL, 'mdd.store_document into a study of another patient raises 23000');
SELECT is(pg_temp.state(), :'state0', 'refused documents, reads and exports left nothing behind');

---------------------------------------------------------------------------
-- storages

SELECT throws_ok($$SELECT mdd.add_storage('t03', 'tape', 'archive')$$, '22023', NULL,
				 'mdd.add_storage of an unknown kind raises 22023');
SELECT throws_ok($$SELECT mdd.add_storage('t03', 'large_object', 'cold')$$, '22023', NULL,
				 'mdd.add_storage of an unknown tier raises 22023');
SELECT throws_ok($$SELECT mdd.add_storage('t03', 'file', 'archive')$$, '22023', NULL,
				 'mdd.add_storage of a file storage without root raises 22023');
SELECT throws_ok($$SELECT mdd.add_storage('t03', 'file', 'archive', '{"root": "relative/dir"}')$$, '22023', NULL,
				 'mdd.add_storage of a file storage with a relative root raises 22023');
SELECT throws_ok(format('SELECT mdd.add_storage(%L, %L, %L, %L)', 't03', 'file', 'archive',
						jsonb_build_object('root', pg_temp.w('allowed/@-no-such-dir'))),
				 '58P01', NULL, 'mdd.add_storage of a file storage with a missing root raises 58P01');
SELECT throws_ok(format('SELECT mdd.add_storage(%L, %L, %L, %L)', 'x03-file-root', 'file', 'archive',
						jsonb_build_object('root', pg_temp.w('allowed/patient/rtplan.dcm'))),
				 '42809', NULL, 'mdd.add_storage of a file storage whose root is a file raises 42809');
SELECT throws_ok(format('SELECT mdd.add_storage(%L, %L, %L, %L)', 'x03-read-only-root', 'file', 'archive',
						jsonb_build_object('root', current_setting('mdd_test.pydicom'))),
				 '42501', NULL, 'mdd.add_storage of a file storage whose root the server cannot write raises 42501');
SELECT throws_ok(format('SELECT mdd.add_storage(%L, %L, %L, %L)', 't03', 'file', 'archive',
						jsonb_build_object('root', pg_temp.w('allowed/@-disk'), 'fanout', 9)),
				 '22023', NULL, 'mdd.add_storage of a file storage with fanout 9 raises 22023');
SELECT throws_ok($$SELECT mdd.add_storage('online', 'large_object', 'online')$$, '42710', NULL,
				 'mdd.add_storage of an existing name raises 42710');
SELECT throws_ok($$SELECT mdd.add_storage('t03', 'http', 'archive', '{"url": "http://mdd:pw@localhost/"}')$$, '22023', NULL,
				 'mdd.add_storage of an http storage with credentials in its url raises 22023');
SELECT throws_ok($$SELECT mdd.add_storage('t03', 's3', 'archive', '{"bucket": "b"}')$$, '22023', NULL,
				 'mdd.add_storage of an s3 storage without endpoint and keys raises 22023');
SELECT throws_ok($$SELECT mdd.add_storage('bad name/1', 'large_object', 'archive')$$, '22023', NULL,
				 'mdd.add_storage of an invalid name raises 22023');
SELECT throws_ok($$SELECT mdd.add_storage(NULL, 'large_object', 'archive')$$, '22004', NULL,
				 'mdd.add_storage without name raises 22004');
SELECT throws_ok($$SELECT mdd.add_storage('t03', 'large_object', 'archive', '[1, 2]')$$, '22023', NULL,
				 'mdd.add_storage with options that are not an object raises 22023');
SET LOCAL ROLE mdd_t03_admin;
SELECT throws_ok(format('SELECT mdd.add_storage(%L, %L, %L, %L)', 't03', 'file', 'archive',
						jsonb_build_object('root', pg_temp.w('outside'))),
				 '42501', NULL, 'an administrator may not put a file storage outside the allowed directories');
RESET ROLE;
SELECT is((SELECT count(*) FROM mdd.storages WHERE name LIKE 't03%'), 0::bigint,
		  'refused storages were not added');

SET LOCAL mdd.default_storage = 't03-no-such-storage';
SELECT throws_ok($$SELECT mdd.store((SELECT data FROM f WHERE name = 'rtdose.dcm'))$$, '42704', NULL,
				 'storing while mdd.default_storage names no storage raises 42704');
RESET mdd.default_storage;
SELECT is(pg_temp.state(), :'state0', 'refused storages left nothing behind');

---------------------------------------------------------------------------
-- the same with a file storage receiving new objects: no file may stay

SELECT lives_ok($$SELECT mdd.add_storage('t03disk', 'file', 'online',
										jsonb_build_object('root', pg_temp.w('allowed/@-disk')))$$,
				'a file storage with its root inside the allowed directories is added');
SET LOCAL mdd.default_storage = 't03disk';
SELECT pg_temp.state() AS state1 \gset

SELECT throws_ok('SELECT mdd.store(NULL)', '22004', NULL, 'file storage: mdd.store(NULL) raises 22004');
SELECT is(pg_temp.state(), :'state1', 'file storage: mdd.store(NULL) left nothing');
SELECT throws_ok($$SELECT mdd.store('')$$, '22023', NULL, 'file storage: empty bytes raise 22023');
SELECT is(pg_temp.state(), :'state1', 'file storage: empty bytes left nothing');
SELECT throws_ok($$SELECT mdd.store((SELECT data FROM f WHERE name = 'garbage'))$$, '22P03', NULL,
				 'file storage: garbage raises 22P03');
SELECT is(pg_temp.state(), :'state1', 'file storage: garbage left nothing');
SELECT throws_ok(format('SELECT mdd.store_file(%L)', pg_temp.td('README.txt')), '22P03', NULL,
				 'file storage: README.txt raises 22P03');
SELECT is(pg_temp.state(), :'state1', 'file storage: README.txt left nothing');
SELECT throws_ok(format('SELECT mdd.store_file(%L)', pg_temp.td('MR_truncated.dcm')), '22P03', NULL,
				 'file storage: MR_truncated.dcm raises 22P03');
SELECT is(pg_temp.state(), :'state1', 'file storage: MR_truncated.dcm left nothing');
SELECT throws_ok(format('SELECT mdd.store_file(%L)', pg_temp.td('rtplan_truncated.dcm')), '22P03', NULL,
				 'file storage: rtplan_truncated.dcm raises 22P03');
SELECT is(pg_temp.state(), :'state1', 'file storage: rtplan_truncated.dcm left nothing');
SELECT throws_ok(format('SELECT mdd.store_file(%L)', pg_temp.td('meta_missing_tsyntax.dcm')), '22004', NULL,
				 'file storage: an object without SOP Instance UID raises 22004');
SELECT is(pg_temp.state(), :'state1', 'file storage: an object without SOP Instance UID left nothing');
SELECT throws_ok($$SELECT mdd.store((SELECT data FROM f WHERE name = 'rtplan_other_patient'))$$, '23000', NULL,
				 'file storage: an object in another patient''s study raises 23000');
SELECT is(pg_temp.state(), :'state1', 'file storage: an object in another patient''s study left nothing');
SELECT throws_ok($$SELECT mdd.store((SELECT data FROM f WHERE name = 'rtplan_other_study'))$$, '23000', NULL,
				 'file storage: an object in another study''s series raises 23000');
SELECT is(pg_temp.state(), :'state1', 'file storage: an object in another study''s series left nothing');
SELECT throws_ok($$SELECT mdd.store_document('P03', '', 'a.txt')$$, '22023', NULL,
				 'file storage: an empty document raises 22023');
SELECT is(pg_temp.state(), :'state1', 'file storage: an empty document left nothing');

-- objects stored, then undone by an error later in the same statement
SELECT throws_ok($$SELECT mdd.store(data) FROM f WHERE name IN ('rtdose.dcm', 'README.txt')$$,
				 '22P03', NULL, 'file storage: a statement storing a good and a bad object raises 22P03');
SELECT is(pg_temp.state(), :'state1', 'file storage: the good object''s file went with the failed statement');
SELECT throws_ok($$SELECT mdd.store((SELECT data FROM f WHERE name = 'rtdose_1frame.dcm')) / 0$$, '22012', NULL,
				 'file storage: an error after a successful store raises its own SQLSTATE');
SELECT is(pg_temp.state(), :'state1', 'file storage: a store undone by a later error left no file');
SELECT throws_ok($$SELECT mdd.store_document('P03', 'some notes', 'notes.txt') / 0$$, '22012', NULL,
				 'file storage: an error after a successful store_document raises its own SQLSTATE');
SELECT is(pg_temp.state(), :'state1', 'file storage: a document undone by a later error left no file');
SELECT results_eq(format($$SELECT regexp_replace(path, '^.*/', ''), object_id IS NOT NULL,
								  coalesce(error ~ 'not a DICOM', false)
						   FROM mdd.import(%L) WHERE path ~ '/(document\.pdf|manifest\.json)$' ORDER BY path$$,
						 pg_temp.w('allowed/patient')),
				  $$VALUES ('document.pdf', false, true), ('manifest.json', false, true)$$,
				  'file storage: mdd.import reports the files that are not DICOM');
SELECT is((SELECT count(*) FROM pg_temp.files(pg_temp.w('allowed/@-disk'))),
		  (SELECT count(*) FROM mdd.copy c JOIN mdd.storage s ON s.id = c.storage WHERE s.name = 't03disk'),
		  'file storage: after an import with failures, every file in the storage is a copy of an object');
SELECT ok(NOT EXISTS (SELECT 1 FROM pg_temp.files(pg_temp.w('allowed/@-disk')) p WHERE p ~ '\.tmp\.'),
		  'file storage: no temporary file is left in the storage');

-- a savepoint rolled back takes its blobs with it
SELECT pg_temp.state() AS state2 \gset
SAVEPOINT before_store;
SELECT mdd.store((SELECT data FROM f WHERE name = 'rtdose.dcm')) AS sp_id \gset
SELECT count(*) AS files_inside FROM pg_temp.files(pg_temp.w('allowed/@-disk')) \gset
ROLLBACK TO SAVEPOINT before_store;
SELECT is(:files_inside::bigint, (SELECT count(*) FROM pg_temp.files(pg_temp.w('allowed/@-disk'))) + 1,
		  'file storage: a store in a savepoint wrote one file');
SELECT is(pg_temp.state(), :'state2', 'file storage: rolling back to the savepoint removed it');

-- a successful store does leave its file (so the checks above can fail)
SELECT mdd.store((SELECT data FROM f WHERE name = 'rtdose.dcm')) AS ok_id \gset
SELECT is((SELECT count(*) FROM pg_temp.files(pg_temp.w('allowed/@-disk')))
		  - (SELECT count(*) FROM mdd.copy c JOIN mdd.storage s ON s.id = c.storage WHERE s.name = 't03disk'),
		  0::bigint, 'file storage: a successful store leaves exactly its file');
SELECT is((SELECT pg_read_binary_file(p) FROM pg_temp.files(pg_temp.w('allowed/@-disk')) p
		   WHERE p ~ ('/' || :ok_id || '-[0-9a-f]+$')),
		  (SELECT data FROM f WHERE name = 'rtdose.dcm'),
		  'file storage: the file holds the object''s bytes');

SELECT * FROM finish();
ROLLBACK;
