-- mdd: the objects CREATE EXTENSION makes, their signatures (the public
-- contract of /work/shared/API.md) and who may use what.
SET client_min_messages = warning;

BEGIN;
SET LOCAL jit = off;  -- the tests' small queries do not pay for compilation
SELECT plan(88);

-- pydicom's test files: the entry of mdd.allowed_paths that ends in test_files
DO $$
BEGIN
	PERFORM set_config('mdd_test.pydicom',
		(SELECT trim(d) FROM unnest(string_to_array(current_setting('mdd.allowed_paths'), ',')) d
		 WHERE trim(d) ~ '/test_files/?$' LIMIT 1), true);
END;
$$;

-- true when some function mdd.<fname> can be called the way API.md says:
-- the API's arguments come first with the API's names and types, anything
-- added after them has a default, and the result type is the API's.
CREATE FUNCTION pg_temp.api_ok(fname text, argnames text[], argtypes regtype[],
							   required int, result text) RETURNS boolean
LANGUAGE sql AS $$
	SELECT EXISTS (
		SELECT 1 FROM pg_proc p
		WHERE p.pronamespace = 'mdd'::regnamespace
		  AND p.proname = fname
		  AND p.prokind = 'f'
		  AND p.pronargs >= cardinality(argtypes)
		  AND p.pronargs - p.pronargdefaults <= required
		  AND (string_to_array(p.proargtypes::text, ' ')::oid[])[1:cardinality(argtypes)]
			  = argtypes::oid[]
		  AND coalesce(p.proargnames[1:cardinality(argnames)], '{}') = argnames
		  AND pg_get_function_result(p.oid) = result)
$$;

-- may role r execute some function mdd.<fname>?
CREATE FUNCTION pg_temp.can_exec(r name, fname name) RETURNS boolean
LANGUAGE sql AS $$
	SELECT coalesce(bool_or(has_function_privilege(r, p.oid, 'EXECUTE')), false)
	FROM pg_proc p WHERE p.pronamespace = 'mdd'::regnamespace AND p.proname = fname
$$;

-- columns a relation of schema mdd lacks, of those given
CREATE FUNCTION pg_temp.missing_columns(rel text, cols text[]) RETURNS text[]
LANGUAGE sql AS $$
	SELECT coalesce(array_agg(c ORDER BY c), '{}')
	FROM unnest(cols) c
	WHERE NOT EXISTS (SELECT 1 FROM pg_attribute a
					  WHERE a.attrelid = ('mdd.' || rel)::regclass
						AND a.attname = c AND a.attnum > 0 AND NOT a.attisdropped)
$$;

---------------------------------------------------------------------------
-- the extension, its schema and roles

SELECT has_extension('mdd', 'extension mdd is installed');
SELECT has_schema('mdd', 'schema mdd exists');
SELECT has_role('mdd_reader', 'role mdd_reader exists');
SELECT has_role('mdd_operator', 'role mdd_operator exists');
SELECT has_role('mdd_admin', 'role mdd_admin exists');
SELECT ok(NOT rolcanlogin AND NOT rolsuper, format('role %s can neither log in nor is superuser', rolname))
FROM pg_roles WHERE rolname IN ('mdd_reader', 'mdd_operator', 'mdd_admin') ORDER BY rolname;

---------------------------------------------------------------------------
-- functions of the public contract

SELECT ok(pg_temp.api_ok('store', '{data,source}', '{bytea,text}', 1, 'bigint'),
		  'mdd.store(data bytea, source text DEFAULT NULL) RETURNS bigint');
SELECT ok(pg_temp.api_ok('store_file', '{path,source}', '{text,text}', 1, 'bigint'),
		  'mdd.store_file(path text, source text DEFAULT NULL) RETURNS bigint');
SELECT ok(pg_temp.api_ok('import', '{directory}', '{text}', 1,
						 'TABLE(path text, object_id bigint, error text)'),
		  'mdd.import(directory text) RETURNS TABLE(path text, object_id bigint, error text)');
SELECT ok(pg_temp.api_ok('store_document',
						 '{patient_id,data,filename,content_type,description,study_instance_uid}',
						 '{text,bytea,text,text,text,text}', 3, 'bigint'),
		  'mdd.store_document(patient_id, data, filename, content_type, description, study_instance_uid) RETURNS bigint');
SELECT ok(pg_temp.api_ok('read', '{object_id}', '{bigint}', 1, 'bytea'),
		  'mdd.read(object_id bigint) RETURNS bytea');
SELECT ok(pg_temp.api_ok('export', '{object_id,path}', '{bigint,text}', 2, 'bigint'),
		  'mdd.export(object_id bigint, path text) RETURNS bigint');
SELECT ok(pg_temp.api_ok('related', '{object_id}', '{bigint}', 1, 'SETOF bigint'),
		  'mdd.related(object_id bigint) RETURNS SETOF bigint');
SELECT ok(pg_temp.api_ok('add_storage', '{name,kind,tier,options}', '{text,text,text,jsonb}', 3, 'void'),
		  'mdd.add_storage(name text, kind text, tier text, options jsonb DEFAULT ''{}'') RETURNS void');
SELECT ok(pg_temp.api_ok('parse', '{data}', '{bytea}', 1, 'jsonb'),
		  'mdd.parse(data bytea) RETURNS jsonb');
SELECT ok(pg_temp.api_ok('find', '{patient_id,patient_name,study_date,modality,study_instance_uid,'
						 'accession_number,level,nodes,timeout}',
						 '{text,text,text,text,text,text,text,text[],interval}', 0,
						 'TABLE(location text, status text, level text, patient_id text, '
						 'patient_name text, study_instance_uid text, study_date text, '
						 'series_instance_uid text, sop_instance_uid text, modality text, '
						 'description text, instances integer)'),
		  'mdd.find(patient_id, patient_name, study_date, modality, study_instance_uid, '
		  'accession_number, level, nodes, timeout) RETURNS TABLE(location, status, level, ...)');
SELECT ok(EXISTS (SELECT 1 FROM pg_proc p
				  WHERE p.pronamespace = 'mdd'::regnamespace AND p.proname = 'patient_list'
					AND p.proargtypes::text = '25 16' AND p.pronargdefaults = 1
					AND p.proargnames[1:2] = '{patient_id,include_remote}'
					AND pg_get_function_result(p.oid) ~ '^TABLE\(location text'),
		  'mdd.patient_list(patient_id text, include_remote boolean DEFAULT false) RETURNS TABLE(location text, ...)');

-- defaults documented by API.md
SELECT matches((SELECT pg_get_expr(p.proargdefaults, 0) FROM pg_proc p
				WHERE p.pronamespace = 'mdd'::regnamespace AND p.proname = 'add_storage'),
			   '^''\{\}''::jsonb', 'mdd.add_storage: options defaults to ''{}''');
SELECT matches((SELECT pg_get_expr(p.proargdefaults, 0) FROM pg_proc p
				WHERE p.pronamespace = 'mdd'::regnamespace AND p.proname = 'store'),
			   '^NULL::text', 'mdd.store: source defaults to NULL');
SELECT is((SELECT pg_get_expr(p.proargdefaults, 0) FROM pg_proc p
		   WHERE p.pronamespace = 'mdd'::regnamespace AND p.proname = 'find'),
		  $$NULL::text, NULL::text, NULL::text, NULL::text, NULL::text, NULL::text, 'STUDY'::text, NULL::text[], '00:00:10'::interval$$,
		  'mdd.find: filters and nodes default to NULL, level to STUDY, timeout to 10 s');

-- SECURITY DEFINER functions cannot be hijacked through search_path
SELECT is(array(SELECT p.oid::regprocedure::text FROM pg_proc p
				WHERE p.pronamespace = 'mdd'::regnamespace AND p.prosecdef
				  AND NOT coalesce(p.proconfig::text ~ 'search_path=', false)
				ORDER BY 1),
		  '{}'::text[], 'every SECURITY DEFINER function of mdd sets its search_path');
SELECT is_definer('mdd', 'store', ARRAY['bytea', 'text'], 'mdd.store runs as SECURITY DEFINER');

---------------------------------------------------------------------------
-- views

SELECT has_view('mdd', 'objects', 'view mdd.objects exists');
SELECT is(pg_temp.missing_columns('objects',
		  '{id,kind,patient_id,patient_name,study_instance_uid,series_instance_uid,sop_instance_uid,'
		  'sop_class_uid,modality,study_date,series_description,content_type,filename,size,sha256,'
		  'tier,ingested_at,archived_at,source}'),
		  '{}'::text[], 'mdd.objects has every column of API.md');
SELECT col_type_is('mdd', 'objects', 'id', 'bigint', 'mdd.objects.id is bigint');
SELECT col_type_is('mdd', 'objects', 'size', 'bigint', 'mdd.objects.size is bigint');
SELECT col_type_is('mdd', 'objects', 'sha256', 'text', 'mdd.objects.sha256 is text (hex)');
SELECT col_type_is('mdd', 'objects', 'ingested_at', 'timestamp with time zone',
				   'mdd.objects.ingested_at is timestamptz');
SELECT has_view('mdd', 'storages', 'view mdd.storages exists');
SELECT is(pg_temp.missing_columns('storages', '{name,kind,tier,objects,bytes}'),
		  '{}'::text[], 'mdd.storages has name, kind, tier, objects and bytes');
SELECT has_view('mdd', 'audit_log', 'view mdd.audit_log exists');
SELECT is(pg_temp.missing_columns('audit_log', '{at,role,action,object_id,patient_id,detail,client}'),
		  '{}'::text[], 'mdd.audit_log has at, role, action, object_id, patient_id, detail, client');

---------------------------------------------------------------------------
-- the storage every installation starts with, and the settings

SELECT results_eq($$SELECT kind, tier FROM mdd.storages WHERE name = 'online'$$,
				  $$VALUES ('large_object'::text, 'online'::text)$$,
				  'storage "online" of kind large_object and tier online exists');
SELECT is((SELECT receives_new_objects FROM mdd.storages WHERE name = 'online'), true,
		  'storage "online" receives new objects by default');
SELECT is(current_setting('mdd.default_storage'), 'online', 'mdd.default_storage defaults to online');
SELECT is(current_setting('mdd.superuser_any_path'), 'on', 'mdd.superuser_any_path defaults to on');
SELECT ok(current_setting('mdd_test.pydicom', true) IS NOT NULL,
		  'the pydicom test file directory is one of mdd.allowed_paths');

---------------------------------------------------------------------------
-- privileges, as declared

SELECT ok(has_schema_privilege('mdd_reader', 'mdd', 'USAGE'), 'mdd_reader may use schema mdd');
SELECT ok(NOT has_schema_privilege('public', 'mdd', 'CREATE'), 'PUBLIC may not create in schema mdd');
SELECT ok(has_table_privilege('mdd_reader', 'mdd.objects', 'SELECT'), 'mdd_reader may read mdd.objects');
SELECT ok(has_table_privilege('mdd_reader', 'mdd.storages', 'SELECT'), 'mdd_reader may read mdd.storages');
SELECT ok(NOT has_table_privilege('mdd_reader', 'mdd.objects', 'INSERT,UPDATE,DELETE'),
		  'mdd_reader may not change mdd.objects');
SELECT ok(pg_temp.can_exec('mdd_reader', 'read'), 'mdd_reader may execute mdd.read');
SELECT ok(pg_temp.can_exec('mdd_reader', 'related'), 'mdd_reader may execute mdd.related');
SELECT ok(NOT pg_temp.can_exec('mdd_reader', 'store'), 'mdd_reader may not execute mdd.store');
SELECT ok(pg_temp.can_exec('mdd_reader', 'find'), 'mdd_reader may execute mdd.find');
SELECT ok(pg_temp.can_exec('mdd_reader', 'patient_list'), 'mdd_reader may execute mdd.patient_list');
SELECT ok(NOT pg_temp.can_exec('mdd_reader', 'store_file'), 'mdd_reader may not execute mdd.store_file');
SELECT ok(NOT pg_temp.can_exec('mdd_reader', 'export'), 'mdd_reader may not execute mdd.export');
SELECT ok(NOT pg_temp.can_exec('mdd_reader', 'import'), 'mdd_reader may not execute mdd.import');
SELECT is(array(SELECT c.relname::text FROM pg_class c
				WHERE c.relnamespace = 'mdd'::regnamespace AND c.relkind IN ('r', 'p')
				  AND has_table_privilege('mdd_reader', c.oid, 'SELECT')
				ORDER BY 1),
		  '{}'::text[], 'mdd_reader may read none of the tables of mdd');
SELECT ok(pg_temp.can_exec('mdd_operator', 'store'), 'mdd_operator may execute mdd.store');
SELECT ok(pg_temp.can_exec('mdd_operator', 'store_file'), 'mdd_operator may execute mdd.store_file');
SELECT ok(pg_temp.can_exec('mdd_operator', 'import'), 'mdd_operator may execute mdd.import');
SELECT ok(pg_temp.can_exec('mdd_operator', 'store_document'), 'mdd_operator may execute mdd.store_document');
SELECT ok(pg_temp.can_exec('mdd_operator', 'export'), 'mdd_operator may execute mdd.export');
SELECT ok(pg_temp.can_exec('mdd_operator', 'read'), 'mdd_operator may execute mdd.read');
SELECT ok(NOT pg_temp.can_exec('mdd_operator', 'add_storage'), 'mdd_operator may not execute mdd.add_storage');
SELECT ok(pg_temp.can_exec('mdd_admin', 'add_storage'), 'mdd_admin may execute mdd.add_storage');
SELECT ok(pg_temp.can_exec('mdd_admin', 'store'), 'mdd_admin may execute mdd.store');
SELECT ok(has_table_privilege('mdd_admin', 'mdd.audit_log', 'SELECT'), 'mdd_admin may read mdd.audit_log');
SELECT ok(NOT has_table_privilege('mdd_operator', 'mdd.audit', 'INSERT')
		  AND NOT has_table_privilege('mdd_admin', 'mdd.audit', 'INSERT,UPDATE,DELETE,TRUNCATE'),
		  'nobody but the owner may write or erase the audit trail');
SELECT is(array(SELECT p.oid::regprocedure::text FROM pg_proc p
				WHERE p.pronamespace = 'mdd'::regnamespace AND p.proname LIKE '\_%'
				  AND has_function_privilege('public', p.oid, 'EXECUTE')
				ORDER BY 1),
		  '{}'::text[], 'PUBLIC may execute no internal function of mdd');
SELECT is(array(SELECT p.oid::regprocedure::text FROM pg_proc p
				WHERE p.pronamespace = 'mdd'::regnamespace AND p.proname LIKE '\_%'
				  AND has_function_privilege('mdd_admin', p.oid, 'EXECUTE')
				ORDER BY 1),
		  '{}'::text[], 'not even mdd_admin may execute internal functions of mdd');
SELECT ok(NOT pg_temp.can_exec('public', '_file_put'), 'PUBLIC may not execute mdd._file_put');
SELECT ok(NOT pg_temp.can_exec('public', '_read_file'), 'PUBLIC may not execute mdd._read_file');
SELECT ok(NOT pg_temp.can_exec('public', 'store'), 'PUBLIC may not execute mdd.store');

---------------------------------------------------------------------------
-- privileges, as they work for roles of the clinic

CREATE ROLE mdd_t01_reader IN ROLE mdd_reader;
CREATE ROLE mdd_t01_operator IN ROLE mdd_operator;
CREATE ROLE mdd_t01_nobody;
CREATE TEMP TABLE t01 (name text PRIMARY KEY, data bytea, id bigint);
GRANT SELECT ON t01 TO PUBLIC;
INSERT INTO t01 (name, data)
SELECT f, pg_read_binary_file(current_setting('mdd_test.pydicom') || '/' || f)
FROM unnest('{rtplan.dcm,CT_small.dcm}'::text[]) f;
UPDATE t01 SET id = mdd.store(data) WHERE name = 'rtplan.dcm';

SET LOCAL ROLE mdd_t01_reader;
SELECT is((SELECT count(*) FROM mdd.objects o JOIN t01 ON t01.id = o.id), 1::bigint,
		  'a reader sees stored objects in mdd.objects');
SELECT is(sha256(mdd.read((SELECT id FROM t01 WHERE name = 'rtplan.dcm'))),
		  sha256((SELECT data FROM t01 WHERE name = 'rtplan.dcm')),
		  'a reader reads an object''s bytes with mdd.read');
SELECT ok(EXISTS (SELECT 1 FROM mdd.storages), 'a reader sees mdd.storages');
SELECT throws_ok($$SELECT mdd.store((SELECT data FROM t01 WHERE name = 'CT_small.dcm'))$$,
				 '42501', NULL, 'a reader may not store');
SELECT throws_ok($$SELECT count(*) FROM mdd.object$$, '42501', NULL, 'a reader may not read table mdd.object');
SELECT throws_ok($$SELECT count(*) FROM mdd.patient$$, '42501', NULL, 'a reader may not read table mdd.patient');
SELECT throws_ok($$SELECT count(*) FROM mdd.copy$$, '42501', NULL, 'a reader may not read table mdd.copy');
SELECT throws_ok($$SELECT mdd._read_file('/etc/passwd')$$, '42501', NULL,
				 'a reader may not call mdd._read_file');
SELECT throws_ok($$SELECT mdd._file_put('/tmp', 'x', '\x00')$$, '42501', NULL,
				 'a reader may not call mdd._file_put');
SELECT throws_ok($$SELECT mdd._audit('read', 1, 'x', 'forged')$$, '42501', NULL,
				 'a reader may not forge audit entries');
RESET ROLE;

SET LOCAL ROLE mdd_t01_nobody;
SELECT throws_ok($$SELECT count(*) FROM mdd.objects$$, '42501', NULL,
				 'a role without an mdd role may not read mdd.objects');
SELECT throws_ok($$SELECT mdd.read((SELECT id FROM t01 WHERE name = 'rtplan.dcm'))$$, '42501', NULL,
				 'a role without an mdd role may not call mdd.read');
RESET ROLE;

SET LOCAL ROLE mdd_t01_operator;
SELECT lives_ok($$SELECT mdd.store((SELECT data FROM t01 WHERE name = 'CT_small.dcm'))$$,
				'an operator may store');
SELECT throws_ok($$SELECT mdd.add_storage('t01', 'large_object', 'archive')$$, '42501', NULL,
				 'an operator may not add storages');
SELECT throws_ok($$SET LOCAL mdd.allowed_paths = '/'$$, '42501', NULL,
				 'an operator may not widen mdd.allowed_paths');
SELECT throws_ok($$SET LOCAL mdd.superuser_any_path = on$$, '42501', NULL,
				 'an operator may not change mdd.superuser_any_path');
SELECT throws_ok($$SET LOCAL mdd.default_storage = 'online'$$, '42501', NULL,
				 'an operator may not change mdd.default_storage');
SELECT throws_ok($$SELECT count(*) FROM mdd.audit_log$$, '42501', NULL,
				 'an operator may not read the audit trail');
RESET ROLE;

SELECT is((SELECT count(*) FROM mdd.objects o
		   WHERE o.sop_instance_uid = (mdd.parse((SELECT data FROM t01 WHERE name = 'CT_small.dcm'))
									   ->>'sop_instance_uid')),
		  1::bigint, 'the operator''s object was stored');

SELECT * FROM finish();
ROLLBACK;
