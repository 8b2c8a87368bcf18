-- mdd: mdd.send as SQL sees it: its signature (API.md, with the added
-- include_related), who may call it, the node option "send", and the job
-- and items a request queues.  Sending itself is tested against storescp
-- in test/t/66_send.t.
SET client_min_messages = warning;

BEGIN;
SET LOCAL jit = off;  -- the tests' small queries do not pay for compilation
SELECT plan(17);

SELECT ok(EXISTS (SELECT 1 FROM pg_proc p
				  WHERE p.pronamespace = 'mdd'::regnamespace AND p.proname = 'send'
					AND pg_get_function_arguments(p.oid)
						= 'object_ids bigint[], node text, include_related boolean DEFAULT false'
					AND pg_get_function_result(p.oid) = 'bigint'),
		  'mdd.send(object_ids bigint[], node text, include_related boolean DEFAULT false) RETURNS bigint');
SELECT matches((SELECT pg_get_expr(p.proargdefaults, 0) FROM pg_proc p
				WHERE p.pronamespace = 'mdd'::regnamespace AND p.proname = 'send'),
			   '^false$', 'mdd.send: include_related defaults to false');
SELECT ok(has_function_privilege('mdd_operator', 'mdd.send(bigint[], text, boolean)', 'EXECUTE'),
		  'mdd_operator may execute mdd.send');
SELECT ok(NOT has_function_privilege('mdd_reader', 'mdd.send(bigint[], text, boolean)', 'EXECUTE'),
		  'mdd_reader may not execute mdd.send');
SELECT ok(NOT has_function_privilege('mdd_admin', 'mdd._send_object(bytea, text, text, text)', 'EXECUTE')
		  AND NOT has_function_privilege('mdd_admin', 'mdd._send_step(mdd.job)', 'EXECUTE'),
		  'the internal send functions are the owner''s only');

-- the node option "send"
SELECT lives_ok($$SELECT mdd.add_node('t06tps', 'T06TPS', '127.0.0.1', 1)$$, 'a node with the default options');
SELECT lives_ok($$SELECT mdd.add_node('t06modality', 'T06MOD', '127.0.0.1', 2, '{"send": false}')$$,
				'a node with option send false');
SELECT results_eq($$SELECT name, may_send FROM mdd.nodes WHERE name LIKE 't06%' ORDER BY name$$,
				  $$VALUES ('t06modality'::text, false), ('t06tps', true)$$,
				  'mdd.nodes shows may_send');
SELECT throws_ok($$SELECT mdd.add_node('t06x', 'T06X', '127.0.0.1', 3, '{"send": "sometimes"}')$$,
				 '22P02', NULL, 'option send must be a boolean');

-- bad requests queue nothing
SELECT store_id AS obj FROM (SELECT mdd.store_file(current_setting('mdd_test.dir') || '/allowed/patient/rtplan.dcm')
							 AS store_id) s \gset
SELECT throws_ok(format('SELECT mdd.send(ARRAY[%s], %L)', :obj, 't06modality'), '42501',
				 'node "t06modality" may not receive objects from this archive',
				 'mdd.send to a node with option send false: 42501');
SELECT throws_ok(format('SELECT mdd.send(ARRAY[%s], %L)', :obj, 't06none'), '42704',
				 'node "t06none" does not exist', 'mdd.send to an unknown node: 42704');
SELECT throws_ok($$SELECT mdd.send('{}', 't06tps')$$, '22023', 'no object ids given',
				 'mdd.send of no objects: 22023');
SELECT throws_ok($$SELECT mdd.send('{-1}', 't06tps')$$, '42704', 'object -1 does not exist',
				 'mdd.send of an unknown object: 42704');
SELECT is((SELECT count(*) FROM mdd.job WHERE kind = 'send'), 0::bigint, 'no send job was queued');

-- a request: the job, its items, the audit row
SELECT mdd.send(ARRAY[:obj], 't06tps', include_related => true) AS job \gset
SELECT results_eq(format($$SELECT kind, state, total, done, failed, (SELECT name FROM mdd.node n WHERE n.id = j.node)
						  FROM mdd.job j WHERE id = %s$$, :job),
				  $$VALUES ('send'::text, 'queued'::text, 1 + (SELECT count(*)::int FROM mdd.related($$ || :obj || $$)),
							0, 0, 't06tps'::text)$$,
				  'the job: kind send, queued, the plan and what travels with it, to node t06tps');
SELECT is((SELECT array_agg(DISTINCT state) FROM mdd.job_item WHERE job = :job), '{pending}'::text[],
		  'its items are pending');
SELECT matches((SELECT detail FROM mdd.audit_log WHERE action = 'send requested' ORDER BY at DESC LIMIT 1),
			   format('^job %s: \d+ objects to node t06tps \(T06TPS at 127\.0\.0\.1:1\)$', :job),
			   'a ''send requested'' audit row names the job, the count and the node');

SELECT * FROM finish();
ROLLBACK;
