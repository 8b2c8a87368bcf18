-- mdd: roles and the defences of SECURITY DEFINER functions.  Each role
-- can do exactly its part: every function of the interface is checked
-- against the least role that may call it, so that a new function needs a
-- decision here; internal functions are callable by no role; only
-- administrators see storage options; the audit trail cannot be changed by
-- anyone but its owner; and a malicious function planted earlier in the
-- search_path is never called by mdd's functions.
SET client_min_messages = warning;

BEGIN;
SET LOCAL jit = off;
SELECT plan(22);

-- the least role that may call each function of the interface
CREATE TEMP TABLE expected_role (function text PRIMARY KEY, role text NOT NULL);
INSERT INTO expected_role VALUES
	('read', 'mdd_reader'), ('related', 'mdd_reader'), ('parse', 'mdd_reader'), ('dvh', 'mdd_reader'),
	('find', 'mdd_reader'), ('patient_list', 'mdd_reader'), ('web_api', 'mdd_reader'),
	('dicom_search', 'mdd_reader'), ('dicom_search_ignored', 'mdd_reader'), ('dicom_instances', 'mdd_reader'),
	('store', 'mdd_operator'), ('store_file', 'mdd_operator'), ('import', 'mdd_operator'),
	('store_document', 'mdd_operator'), ('export', 'mdd_operator'), ('echo', 'mdd_operator'),
	('archive', 'mdd_operator'), ('restore', 'mdd_operator'), ('send', 'mdd_operator'),
	('retrieve', 'mdd_operator'), ('move', 'mdd_operator'),
	('wait', 'mdd_operator'), ('cancel', 'mdd_operator'), ('verify', 'mdd_operator'), ('verify_storage', 'mdd_operator'),
	('preview_rule', 'mdd_operator'), ('run_rule', 'mdd_operator'),
	('add_storage', 'mdd_admin'), ('alter_storage', 'mdd_admin'), ('drop_storage', 'mdd_admin'), ('add_node', 'mdd_admin'), ('alter_node', 'mdd_admin'), ('drop_node', 'mdd_admin'),
	('create_rule', 'mdd_admin'), ('drop_rule', 'mdd_admin'), ('purge_jobs', 'mdd_admin');

CREATE TEMP VIEW interface AS
SELECT p.oid, p.proname::text AS function FROM pg_proc p
WHERE p.pronamespace = 'mdd'::regnamespace AND p.proname !~ '^_';

SELECT is((SELECT array_agg(function ORDER BY function) FROM interface i
		   WHERE NOT EXISTS (SELECT 1 FROM expected_role e WHERE e.function = i.function)),
		  NULL, 'every function of the interface has a role decided in this test');
SELECT is((SELECT array_agg(i.oid::regprocedure::text ORDER BY 1) FROM interface i
		   JOIN expected_role e USING (function)
		   WHERE has_function_privilege(e.role, i.oid, 'EXECUTE') IS DISTINCT FROM true),
		  NULL, 'each role may call the functions of its part');
SELECT is((SELECT array_agg(format('%s by %s', i.oid::regprocedure, r.role) ORDER BY 1) FROM interface i
		   JOIN expected_role e USING (function)
		   CROSS JOIN (VALUES ('mdd_reader', 1), ('mdd_operator', 2), ('mdd_admin', 3)) r(role, rank)
		   WHERE r.rank < CASE e.role WHEN 'mdd_reader' THEN 1 WHEN 'mdd_operator' THEN 2 ELSE 3 END
			 AND has_function_privilege(r.role, i.oid, 'EXECUTE')),
		  NULL, 'and no lesser role may');
SELECT is((SELECT array_agg(p.oid::regprocedure::text ORDER BY 1) FROM pg_proc p
		   WHERE p.pronamespace = 'mdd'::regnamespace AND p.proname ~ '^_'
			 AND (has_function_privilege('mdd_admin', p.oid, 'EXECUTE')
				  OR has_function_privilege('public', p.oid, 'EXECUTE'))),
		  NULL, 'internal functions are callable by no role');
SELECT is((SELECT array_agg(p.oid::regprocedure::text ORDER BY 1) FROM pg_proc p
		   WHERE p.pronamespace = 'mdd'::regnamespace AND p.prosecdef
			 AND NOT EXISTS (SELECT 1 FROM unnest(p.proconfig) c
							 WHERE c = 'search_path=pg_catalog, pg_temp')),
		  NULL, 'every SECURITY DEFINER function pins search_path to pg_catalog, pg_temp');

-- views: readers see the catalog, not the tables
SELECT ok(has_table_privilege('mdd_reader', 'mdd.objects', 'SELECT')
		  AND has_table_privilege('mdd_reader', 'mdd.jobs', 'SELECT')
		  AND has_table_privilege('mdd_reader', 'mdd.rules', 'SELECT')
		  AND has_table_privilege('mdd_reader', 'mdd.storages', 'SELECT')
		  AND has_table_privilege('mdd_reader', 'mdd.nodes', 'SELECT'),
		  'a reader sees the catalog views');
SELECT ok(NOT has_table_privilege('mdd_operator', 'mdd.object', 'SELECT')
		  AND NOT has_table_privilege('mdd_operator', 'mdd.copy', 'SELECT')
		  AND NOT has_table_privilege('mdd_operator', 'mdd.audit_log', 'SELECT'),
		  'an operator sees neither the tables nor the audit trail');
SELECT ok(has_table_privilege('mdd_admin', 'mdd.audit_log', 'SELECT'), 'an administrator reads the audit trail');

-- the audit trail is append-only for every role
SELECT is((SELECT array_agg(format('%s %s', r, p) ORDER BY 1)
		   FROM unnest(ARRAY['mdd_reader', 'mdd_operator', 'mdd_admin']) r,
				unnest(ARRAY['INSERT', 'UPDATE', 'DELETE', 'TRUNCATE']) p
		   WHERE has_table_privilege(r, 'mdd.audit', p)),
		  NULL, 'no role may write, change or remove audit rows directly');
CREATE ROLE mdd_t07_admin IN ROLE mdd_admin;
SET LOCAL ROLE mdd_t07_admin;
SELECT throws_ok($$UPDATE mdd.audit SET detail = 'nothing happened'$$, '42501', NULL,
				 'not even an administrator may change the audit trail');
SELECT throws_ok($$DELETE FROM mdd.audit$$, '42501', NULL, 'nor remove from it');
RESET ROLE;

-- storage options: only administrators see them, and nobody the credentials
SELECT lives_ok($$SELECT mdd.add_storage('t07dav', 'http', 'archive',
	'{"url": "http://127.0.0.1:9/dav/", "username": "u", "password": "secret07"}')$$,
	'a storage with credentials');
CREATE ROLE mdd_t07_reader IN ROLE mdd_reader;
CREATE ROLE mdd_t07_operator IN ROLE mdd_operator;
SET LOCAL ROLE mdd_t07_reader;
SELECT is((SELECT options FROM mdd.storages WHERE name = 't07dav'), NULL, 'a reader sees no storage options');
SET LOCAL ROLE mdd_t07_operator;
SELECT is((SELECT options FROM mdd.storages WHERE name = 't07dav'), NULL, 'nor does an operator');
SET LOCAL ROLE mdd_t07_admin;
SELECT is((SELECT options - 'fanout' - 'timeout' FROM mdd.storages WHERE name = 't07dav'),
		  '{"url": "http://127.0.0.1:9/dav/", "username": "u"}'::jsonb,
		  'an administrator sees them, without the password');
-- what each role may do, tried for real
SET LOCAL ROLE mdd_t07_reader;
SELECT throws_ok($$SELECT mdd.archive(ARRAY[1::bigint])$$, '42501', NULL, 'a reader cannot archive');
SET LOCAL ROLE mdd_t07_operator;
SELECT throws_ok($$SELECT mdd.add_storage('t07x', 'file', 'archive', '{"root": "/tmp"}')$$, '42501', NULL,
				 'an operator cannot add storages');
SELECT throws_ok($$SELECT mdd.add_node('t07x', 'T07X', '127.0.0.1', 104)$$, '42501', NULL,
				 'nor nodes');
SELECT throws_ok($$SELECT mdd.create_rule('t07x', 'true')$$, '42501', NULL, 'nor rules');
RESET ROLE;

-- a malicious search_path: functions named like those mdd uses, planted
-- in a schema searched before pg_catalog, are never called
CREATE SCHEMA t07_evil;
CREATE TABLE t07_evil.calls (what text);
GRANT ALL ON SCHEMA t07_evil TO PUBLIC;
GRANT ALL ON t07_evil.calls TO PUBLIC;
CREATE FUNCTION t07_evil.sha256(bytea) RETURNS bytea LANGUAGE sql
AS $$ INSERT INTO t07_evil.calls VALUES ('sha256') RETURNING '\x00'::bytea $$;
CREATE FUNCTION t07_evil.length(bytea) RETURNS integer LANGUAGE sql
AS $$ INSERT INTO t07_evil.calls VALUES ('length') RETURNING 0 $$;
CREATE FUNCTION t07_evil.format(text, VARIADIC text[]) RETURNS text LANGUAGE sql
AS $$ INSERT INTO t07_evil.calls VALUES ('format') RETURNING 'x' $$;
CREATE FUNCTION t07_evil.host(inet) RETURNS text LANGUAGE sql
AS $$ INSERT INTO t07_evil.calls VALUES ('host') RETURNING 'x' $$;
CREATE FUNCTION t07_evil.encode(bytea, text) RETURNS text LANGUAGE sql
AS $$ INSERT INTO t07_evil.calls VALUES ('encode') RETURNING 'x' $$;
CREATE FUNCTION t07_evil.now() RETURNS timestamptz LANGUAGE sql
AS $$ INSERT INTO t07_evil.calls VALUES ('now') RETURNING '2000-01-01'::timestamptz $$;
SET LOCAL search_path = t07_evil, pg_catalog, public;
SET LOCAL ROLE mdd_t07_operator;
SELECT mdd.store_document('T07', '\x255044462d312e340a'::bytea, 'evil.pdf') AS doc \gset
SELECT ok(mdd.read(:doc, true) = '\x255044462d312e340a'::bytea, 'store and read with a planted search_path');
SELECT lives_ok(format('SELECT mdd.archive(ARRAY[%s::bigint], %L)', :doc, 't07dav'),
				'archive with a planted search_path');
RESET ROLE;
SELECT is((SELECT array_agg(DISTINCT what) FROM t07_evil.calls), NULL,
		  'no planted function was called by mdd');

SELECT * FROM finish();
ROLLBACK;
