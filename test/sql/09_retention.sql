-- mdd: mdd.purge_jobs removes the history of jobs that ended long ago, and
-- nothing else: not a job still running or with copies to undo, not a
-- rule's last run, never an object; what a rule moved stays counted.
SET client_min_messages = warning;

BEGIN;
SET LOCAL jit = off;
SELECT plan(15);

-- two DICOM objects of the generated patient to hang job items on
CREATE TEMP TABLE t09 (name text PRIMARY KEY, id bigint);
INSERT INTO t09 SELECT f, mdd.store(pg_read_binary_file(current_setting('mdd_test.dir') || '/allowed/patient/' || f || '.dcm'))
FROM unnest(ARRAY['rtplan', 'rtstruct']) f;
CREATE FUNCTION pg_temp.doc(n text) RETURNS bigint LANGUAGE sql AS $$ SELECT id FROM t09 WHERE name = n $$;

SELECT mdd.create_rule('t09-rule', 'false', 'restore');
SELECT mdd.add_node('t09tps', 'T09TPS', '127.0.0.1', 1);
SELECT mdd.create_rule('t09-send', format('o.id IN (%s, %s)', pg_temp.doc('rtplan'), pg_temp.doc('rtstruct')),
					   'send', node => 't09tps');

-- jobs by hand: (label, state, ended how long ago, items in which state, of the rule?)
CREATE TEMP TABLE t09_job (label text PRIMARY KEY, id bigint);
CREATE FUNCTION pg_temp.job(label text, state text, ended interval, item_state text, of_rule boolean,
							done integer DEFAULT 0, bytes bigint DEFAULT 0, kind text DEFAULT 'restore')
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
	j bigint;
BEGIN
	INSERT INTO mdd.job (kind, node, state, created_by, created_at, finished_at, done, bytes, rule)
	VALUES (kind, CASE WHEN kind = 'send' THEN (SELECT id FROM mdd.node WHERE name = 't09tps') END, state, current_user, now() - coalesce(ended, '0') - interval '1 hour',
			CASE WHEN ended IS NULL THEN NULL ELSE now() - ended END, done, bytes,
			CASE WHEN of_rule THEN (SELECT id FROM mdd.rule WHERE name = 't09-rule') END)
	RETURNING id INTO j;
	INSERT INTO mdd.job_item (job, object, state) VALUES (j, pg_temp.doc('rtplan'), item_state);
	INSERT INTO t09_job VALUES (label, j);
END;
$$;
SELECT pg_temp.job('old done', 'done', '400 days', 'done', false);
SELECT pg_temp.job('old failed', 'failed', '400 days', 'failed', false);
SELECT pg_temp.job('old cancelled', 'cancelled', '400 days', 'pending', false);
SELECT pg_temp.job('old rule run', 'done', '400 days', 'done', true, 7, 7000);
SELECT pg_temp.job('old last rule run', 'done', '390 days', 'done', true, 5, 5000);
SELECT pg_temp.job('old send', 'done', '500 days', 'done', false, kind => 'send');
SELECT pg_temp.job('recent done', 'done', '10 days', 'done', false);
SELECT pg_temp.job('running', 'running', NULL, 'copying', false);
SELECT pg_temp.job('failed, undo pending', 'failed', NULL, 'copying', false);
UPDATE mdd.rule SET last_job = (SELECT id FROM t09_job WHERE label = 'old last rule run')
WHERE name = 't09-rule';

CREATE FUNCTION pg_temp.to_send() RETURNS bigint[] LANGUAGE sql AS $$
	SELECT mdd._rule_objects(r) FROM mdd.rule r WHERE r.name = 't09-send' $$;
SELECT is(pg_temp.to_send(), ARRAY[pg_temp.doc('rtstruct')], 'before: the send rule would send only what was not delivered');
SELECT is((SELECT (objects, bytes)::text FROM mdd.rules WHERE name = 't09-rule'), '(12,12000)',
		  'before: the rule counts what both its runs moved');

SELECT throws_ok($$SELECT mdd.purge_jobs(NULL)$$, '22023', NULL, 'a NULL age is refused');
SELECT throws_ok($$SELECT mdd.purge_jobs('-1 day')$$, '22023', NULL, 'a negative age is refused');

SELECT is(mdd.purge_jobs('1 year'), 5::bigint, 'five jobs ended over a year ago are purged');
SELECT is((SELECT array_agg(label ORDER BY label) FROM t09_job t
		   WHERE NOT EXISTS (SELECT 1 FROM mdd.job j WHERE j.id = t.id)),
		  ARRAY['old cancelled', 'old done', 'old failed', 'old rule run', 'old send'],
		  'the old ended jobs are gone');
SELECT is((SELECT array_agg(label ORDER BY label) FROM t09_job t
		   WHERE EXISTS (SELECT 1 FROM mdd.job j WHERE j.id = t.id)),
		  ARRAY['failed, undo pending', 'old last rule run', 'recent done', 'running'],
		  'kept: a recent job, a running job, a job with copies to undo, the rule''s last run');
SELECT is((SELECT count(*) FROM mdd.job_item i JOIN t09_job t ON t.id = i.job
		   WHERE t.label LIKE 'old %' AND t.label <> 'old last rule run'), 0::bigint,
		  'their items went with them');
SELECT is((SELECT (objects, bytes)::text FROM mdd.rules WHERE name = 't09-rule'), '(12,12000)',
		  'after: the rule still counts what both runs moved');
SELECT is((SELECT last_job FROM mdd.rules WHERE name = 't09-rule'),
		  (SELECT id FROM t09_job WHERE label = 'old last rule run'), 'mdd.rules still shows the last run');
SELECT is((SELECT count(*) FROM mdd.objects o WHERE o.id IN (SELECT id FROM t09)), 2::bigint,
		  'the objects are untouched');
SELECT is((SELECT detail FROM mdd.audit_log WHERE action = 'purge jobs' ORDER BY at DESC LIMIT 1),
		  format('5 jobs that ended before %s', now() - interval '1 year'), 'the purge is audited');
SELECT is((SELECT array_agg(object) FROM mdd.delivered d JOIN mdd.node n ON n.id = d.node
		   WHERE n.name = 't09tps'), ARRAY[pg_temp.doc('rtplan')], 'what the purged send job delivered is kept');
SELECT is(pg_temp.to_send(), ARRAY[pg_temp.doc('rtstruct')], 'after: the send rule still does not send it again');
SELECT is(mdd.purge_jobs('1 year'), 0::bigint, 'a second purge finds nothing more');

SELECT * FROM finish();
ROLLBACK;
