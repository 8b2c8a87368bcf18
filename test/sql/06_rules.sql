-- mdd: archive rules in SQL.  A hand-built catalog and EMR (patients whose
-- courses ended 30, 95 and 400 days ago, open courses, no course; CBCT
-- marked by series description or by image type, planning CTs, MR, RT
-- objects, archived CBCTs); what mdd.preview_rule selects; how bad
-- predicates fail at mdd.create_rule with PostgreSQL's SQLSTATEs; that a
-- predicate runs with its owner's rights and cannot write; runs as jobs;
-- cron schedules and windows.
SET client_min_messages = warning;

BEGIN;
SET LOCAL jit = off;
SELECT plan(119);

-- the demo EMR (scripts/emr_demo.sql), as the tests and the demo use it
\ir ../../scripts/emr_demo.sql

SELECT lives_ok($$SELECT mdd.add_node('tps06', 'TPS06', '127.0.0.1', 1)$$, 'a planning system to send to');
SELECT lives_ok($$SELECT mdd.add_storage('vault06', 'file', 'archive',
	jsonb_build_object('root', current_setting('mdd_test.dir') || '/allowed'))$$,
	'an archive-tier storage to archive to');

-- ---------------------------------------------------------------------------
-- the hand-built catalog

CREATE TEMP TABLE expect (label text PRIMARY KEY, id bigint);
GRANT SELECT ON expect TO PUBLIC;

-- one object; label names it in the expectations
CREATE FUNCTION pg_temp.obj(label text, patient text, modality text, description text,
							image_type text DEFAULT 'ORIGINAL\PRIMARY\AXIAL', online boolean DEFAULT true)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
	p bigint;
	st bigint;
	se bigint;
	o bigint;
	n int := (SELECT count(*) FROM expect);
BEGIN
	INSERT INTO mdd.patient (patient_id, patient_name) VALUES (patient, patient || '^Test')
	ON CONFLICT (patient_id) DO UPDATE SET patient_name = excluded.patient_name RETURNING id INTO p;
	INSERT INTO mdd.study (patient, study_instance_uid, study_date)
	VALUES (p, '1.2.826.0.1.3680043.99.6.' || p, current_date - 200)
	ON CONFLICT (study_instance_uid) DO UPDATE SET study_date = excluded.study_date RETURNING id INTO st;
	INSERT INTO mdd.series (study, series_instance_uid, modality, series_description)
	VALUES (st, '1.2.826.0.1.3680043.99.6.' || p || '.' || n, modality, description) RETURNING id INTO se;
	INSERT INTO mdd.object (kind, patient, study, series, sop_instance_uid, sop_class_uid, image_type,
							size, sha256, tier)
	VALUES ('dicom', p, st, se, '1.2.826.0.1.3680043.99.6.' || p || '.' || n || '.1',
			'1.2.840.10008.5.1.4.1.1.2', image_type, 1000, sha256(label::bytea),
			CASE WHEN online THEN 'online' ELSE 'archive' END)
	RETURNING id INTO o;
	INSERT INTO mdd.copy (object, storage, locator, state, size, sha256)
	SELECT o, s.id, 'test-' || o, 'present', 1000, sha256(label::bytea)
	FROM mdd.storage s WHERE s.name = CASE WHEN online THEN 'online' ELSE 'vault06' END;
	INSERT INTO expect VALUES (label, o);
	RETURN o;
END;
$$;

CREATE FUNCTION pg_temp.course(mrn text, started_days_ago int, ended_days_ago int)
RETURNS void LANGUAGE sql AS $$
	INSERT INTO emr.patient (mrn, name) VALUES (mrn, mrn || '^Test') ON CONFLICT (mrn) DO NOTHING;
	INSERT INTO emr.course (patient, name, intent, start_date, end_date)
	SELECT p.id, 'C' || (SELECT count(*) + 1 FROM emr.course c WHERE c.patient = p.id), 'curative',
		   current_date - started_days_ago, current_date - ended_days_ago
	FROM emr.patient p WHERE p.mrn = course.mrn;
$$;

-- courses ended 30, 95, 400 days ago; open; one ended and one open; two
-- ended long ago; none at all
\o /dev/null
SELECT pg_temp.course('R30', 80, 30);
SELECT pg_temp.course('R95', 140, 95);
SELECT pg_temp.course('R400', 450, 400);
SELECT pg_temp.course('ROPEN', 10, NULL);
SELECT pg_temp.course('RMIX', 450, 400);
SELECT pg_temp.course('RMIX', 20, NULL);
SELECT pg_temp.course('RTWO', 300, 250);
SELECT pg_temp.course('RTWO', 200, 120);

SELECT pg_temp.obj('r30 cbct', 'R30', 'CT', 'CBCT Fx1');
SELECT pg_temp.obj('r30 pct', 'R30', 'CT', 'Planning CT');
SELECT pg_temp.obj('r95 cbct', 'R95', 'CT', 'CBCT Fx1');
SELECT pg_temp.obj('r95 cbct by image type', 'R95', 'CT', 'Daily imaging', 'ORIGINAL\PRIMARY\AXIAL\CBCT');
SELECT pg_temp.obj('r95 pct', 'R95', 'CT', 'Planning CT');
SELECT pg_temp.obj('r95 mr', 'R95', 'MR', 'T1 CBCT-like name, but MR');
SELECT pg_temp.obj('r400 cbct', 'R400', 'CT', 'cbct fx12');
SELECT pg_temp.obj('r400 cbct archived', 'R400', 'CT', 'CBCT Fx2', online => false);
SELECT pg_temp.obj('r400 pct', 'R400', 'CT', 'Planning CT');
SELECT pg_temp.obj('rop cbct', 'ROPEN', 'CT', 'CBCT Fx1');
SELECT pg_temp.obj('rmix cbct', 'RMIX', 'CT', 'CBCT Fx1');
SELECT pg_temp.obj('rtwo cbct', 'RTWO', 'CT', 'CBCT Fx3');
SELECT pg_temp.obj('rnone cbct', 'RNONE', 'CT', 'CBCT Fx1');

-- a registration that references the R95 CBCT instance: it travels with it
SELECT pg_temp.obj('r95 reg', 'R95', 'REG', 'CBCT to planning CT');
INSERT INTO mdd.reference (object, kind, uid)
SELECT (SELECT id FROM expect WHERE label = 'r95 reg'), 'instance', o.sop_instance_uid
FROM mdd.object o WHERE o.id = (SELECT id FROM expect WHERE label = 'r95 cbct');
\o

CREATE FUNCTION pg_temp.ids(VARIADIC labels text[]) RETURNS bigint[] LANGUAGE sql AS $$
	SELECT array_agg(id ORDER BY id) FROM expect WHERE label = ANY (labels)
$$;

-- the role that owns the rules: an administrator who may read the EMR
CREATE ROLE mdd_t06_admin IN ROLE mdd_admin, emr_reader;
CREATE ROLE mdd_t06_noemr IN ROLE mdd_admin;
CREATE ROLE mdd_t06_operator IN ROLE mdd_operator;

-- ---------------------------------------------------------------------------
-- the canonical rule: every CBCT of a patient whose courses all ended more
-- than 90 days ago goes to the archive

SET LOCAL ROLE mdd_t06_admin;
SELECT lives_ok($$
	SELECT mdd.create_rule('cbct-after-course',
		$p$o.modality = 'CT'
		   AND (o.series_description ILIKE '%CBCT%' OR o.image_type LIKE '%CBCT%')
		   AND EXISTS (SELECT 1 FROM emr.patient p JOIN emr.course c ON c.patient = p.id
					   WHERE p.mrn = o.patient_id)
		   AND NOT EXISTS (SELECT 1 FROM emr.patient p JOIN emr.course c ON c.patient = p.id
						   WHERE p.mrn = o.patient_id
							 AND (c.end_date IS NULL OR c.end_date > current_date - 90))$p$,
		storage => 'vault06', schedule => '0 1 * * *', window_start => '20:00', window_end => '06:00',
		batch_size => 100)$$,
	'the canonical rule is created by an administrator who may read the EMR');
RESET ROLE;

SELECT is((SELECT array_agg(x ORDER BY x) FROM mdd.preview_rule('cbct-after-course') x),
		  pg_temp.ids('r95 cbct', 'r95 cbct by image type', 'r400 cbct', 'rtwo cbct'),
		  'preview: exactly the online CBCTs of patients whose courses all ended over 90 days ago');
SELECT is((SELECT array_agg(x ORDER BY x) FROM mdd.preview_rule('cbct-after-course', include_related => true) x),
		  pg_temp.ids('r95 cbct', 'r95 cbct by image type', 'r400 cbct', 'rtwo cbct', 'r95 reg'),
		  'preview with include_related: and the registration that references one of them');

SELECT results_eq($$SELECT name, owner, action, storage, schedule, window_start, window_end,
						   batch_size, include_related, last_job, next_run, objects
					FROM mdd.rules$$,
	$$VALUES ('cbct-after-course', 'mdd_t06_admin', 'archive', 'vault06', '0 1 * * *',
			  '20:00'::time, '06:00'::time, 100, true, NULL::bigint, NULL::timestamptz, 0::bigint)$$,
	'mdd.rules shows the rule, its owner, no run yet');

SELECT is((SELECT action FROM mdd.audit_log WHERE detail LIKE 'rule cbct-after-course:%' ORDER BY at DESC LIMIT 1),
		  'create rule', 'creating a rule is audited');

-- an operator may preview and run rules, not create or drop them
SET LOCAL ROLE mdd_t06_operator;
SELECT is((SELECT count(*) FROM mdd.preview_rule('cbct-after-course')), 4::bigint,
		  'an operator may preview a rule');
SELECT throws_ok($$SELECT mdd.create_rule('op', 'true')$$, '42501', NULL,
				 'an operator may not create rules');
SELECT throws_ok($$SELECT mdd.drop_rule('cbct-after-course')$$, '42501', NULL,
				 'an operator may not drop rules');
RESET ROLE;

-- a restore rule: the archived CBCTs
SELECT lives_ok($$SELECT mdd.create_rule('bring-back', $p$o.series_description ILIKE '%cbct%'$p$, 'restore')$$,
				'a restore rule');
SELECT is((SELECT array_agg(x ORDER BY x) FROM mdd.preview_rule('bring-back') x),
		  pg_temp.ids('r400 cbct archived'), 'a restore rule selects only archived objects');

-- ---------------------------------------------------------------------------
-- bad predicates fail at creation, with PostgreSQL's SQLSTATEs

SET LOCAL ROLE mdd_t06_admin;
SELECT throws_ok($$SELECT mdd.create_rule('bad', 'o.modality = ')$$, '42601', NULL, 'syntax error: 42601');
SELECT throws_like($$SELECT mdd.create_rule('bad', 'o.modality = ')$$, '%rule predicate: syntax error%',
				   'the syntax error names the predicate');
SELECT throws_ok($$SELECT mdd.create_rule('bad', 'o.size')$$, '42804',
				 'argument of WHERE must be type boolean, not type bigint', 'not a boolean: 42804');
SELECT throws_ok($$SELECT mdd.create_rule('bad', 'o.no_such_column = 1')$$, '42703', NULL,
				 'unknown column: 42703');
SELECT throws_ok($$SELECT mdd.create_rule('bad', 'EXISTS (SELECT 1 FROM emr.no_such_table)')$$, '42P01', NULL,
				 'unknown table: 42P01');
SELECT throws_ok($$SELECT mdd.create_rule('bad', 'no_such_function(o.id)')$$, '42883', NULL,
				 'unknown function: 42883');
SELECT throws_ok($$SELECT mdd.create_rule('bad', 'true) OR (true')$$, '42601', NULL,
				 'closing the WHERE clause: 42601');
SELECT throws_ok($$SELECT mdd.create_rule('bad', 'true; DROP TABLE emr.course')$$, '42601', NULL,
				 'a second statement: 42601');
SELECT throws_ok($$SELECT mdd.create_rule('bad', 'true ORDER BY 1')$$, '42601',
				 'rule predicate must be a single boolean expression', 'an ORDER BY after it: 42601');
SELECT throws_ok($$SELECT mdd.create_rule('bad', 'true, false')$$, '42601',
				 'rule predicate must be a single boolean expression', 'two expressions: 42601');
SELECT throws_ok($$SELECT mdd.create_rule('bad', 'true FROM emr.course')$$, '42601',
				 'rule predicate must be a single boolean expression', 'a FROM after it: 42601');
SELECT throws_ok($$SELECT mdd.create_rule('bad', $p$EXISTS (WITH d AS (DELETE FROM emr.course RETURNING 1)
												   SELECT 1 FROM d)$p$)$$,
				 '0A000', NULL, 'a data-modifying WITH inside: refused');
SELECT lives_ok($$SELECT mdd.create_rule('commented', 'o.modality = ''MR'' -- MR only')$$,
				'a trailing comment is harmless');
SELECT is((SELECT array_agg(x) FROM mdd.preview_rule('commented') x), pg_temp.ids('r95 mr'),
		  'and the rule with it selects what it says');
RESET ROLE;
SELECT is((SELECT count(*) FROM emr.course), 8::bigint, 'no predicate changed the EMR');
SELECT is((SELECT count(*) FROM mdd.rule WHERE name = 'bad'), 0::bigint, 'no bad rule was created');

-- other bad arguments
SELECT throws_ok($$SELECT mdd.create_rule('cbct-after-course', 'true')$$, '42710', NULL, 'duplicate name: 42710');
SELECT throws_ok($$SELECT mdd.create_rule('bad name!', 'true')$$, '22023', NULL, 'bad name: 22023');
SELECT throws_ok($$SELECT mdd.create_rule(NULL, 'true')$$, '22004', NULL, 'NULL name: 22004');
SELECT throws_ok($$SELECT mdd.create_rule('bad', NULL)$$, '22004', NULL, 'NULL predicate: 22004');
SELECT throws_ok($$SELECT mdd.create_rule('bad', 'true', 'delete')$$, '22023', NULL, 'unknown action: 22023');
SELECT throws_ok($$SELECT mdd.create_rule('bad', 'true', 'send')$$, '42704',
				 'node "NULL" does not exist', 'send without a node: 42704');
SELECT throws_ok($$SELECT mdd.create_rule('bad', 'true', 'send', node => 'no_such_node')$$, '42704',
				 'node "no_such_node" does not exist', 'send to an unknown node: 42704');
SELECT throws_ok($$SELECT mdd.create_rule('bad', 'true', 'archive', 'vault06', node => 'tps06')$$, '22023',
				 'a rule that archives takes no node', 'archive with a node: 22023');
SELECT throws_ok($$SELECT mdd.create_rule('bad', 'true', 'send', 'vault06', node => 'tps06')$$, '22023',
				 'a rule that sends takes no storage', 'send with a storage: 22023');
SELECT throws_ok($$SELECT mdd.create_rule('bad', 'true', 'archive', 'no_such_storage')$$, '42704', NULL,
				 'unknown storage: 42704');
SELECT throws_ok($$SELECT mdd.create_rule('bad', 'true', 'archive', 'online')$$, '22023', NULL,
				 'archive to an online storage: 22023');
SELECT throws_ok($$SELECT mdd.create_rule('bad', 'true', 'restore', 'vault06')$$, '22023', NULL,
				 'restore with a storage: 22023');
SELECT throws_ok($$SELECT mdd.create_rule('bad', 'true', 'verify')$$, '22023',
				 'a verify rule names the storage whose copies it checks', 'verify without a storage: 22023');
SELECT throws_ok($$SELECT mdd.create_rule('bad', 'true', 'verify', 'no_such_storage')$$, '42704', NULL,
				 'verify of an unknown storage: 42704');
SELECT throws_ok($$SELECT mdd.create_rule('bad', 'true', 'verify', 'vault06', node => 'tps06')$$, '22023',
				 'a rule that verifys takes no node', 'verify with a node: 22023');
SELECT throws_ok($$SELECT mdd.create_rule('bad', 'true', schedule => '61 * * * *')$$, '22023',
				 'invalid schedule "61 * * * *": minute field: value 61 is outside 0-59', 'bad minute: 22023');
SELECT throws_ok($$SELECT mdd.create_rule('bad', 'true', schedule => '* * * *')$$, '22023',
				 'invalid schedule "* * * *": 4 fields instead of 5', 'four fields: 22023');
SELECT throws_ok($$SELECT mdd.create_rule('bad', 'true', schedule => '0 0 31 2 *')$$, '22023',
				 'invalid schedule "0 0 31 2 *": it never fires', 'a schedule that never fires: 22023');
SELECT throws_ok($$SELECT mdd.create_rule('bad', 'true', window_start => '20:00')$$, '22023', NULL,
				 'a window without an end: 22023');
SELECT throws_ok($$SELECT mdd.create_rule('bad', 'true', batch_size => 0)$$, '22023', NULL,
				 'batch_size 0: 22023');

-- ---------------------------------------------------------------------------
-- a rule runs with its owner's rights, never more, and cannot write

SET LOCAL ROLE mdd_t06_noemr;
SELECT throws_ok($$SELECT mdd.create_rule('noemr', 'EXISTS (SELECT 1 FROM emr.course c)')$$, '42501', NULL,
				 'an owner who cannot read the EMR table cannot create a rule on it: 42501');
SELECT lives_ok($$SELECT mdd.create_rule('noemr-plain', 'o.modality = ''MR''')$$,
				'the same owner may create a rule on mdd.objects alone');
RESET ROLE;
SELECT is((SELECT owner FROM mdd.rules WHERE name = 'noemr-plain'), 'mdd_t06_noemr',
		  'the rule belongs to the role that created it');

-- the owner loses the right to read the EMR: the rule fails, even when a
-- superuser previews it
REVOKE emr_reader FROM mdd_t06_admin;
SELECT throws_ok($$SELECT * FROM mdd.preview_rule('cbct-after-course')$$, '42501', NULL,
				 'the rule runs with its owner''s rights, not those of whoever runs it');
GRANT emr_reader TO mdd_t06_admin;

-- a predicate that tries to write
CREATE FUNCTION emr.sneaky_delete() RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
	DELETE FROM emr.course;
	RETURN true;
END;
$$;
CREATE SEQUENCE emr.counter;
GRANT USAGE ON SEQUENCE emr.counter TO emr_reader;
SET LOCAL ROLE mdd_t06_admin;
SELECT lives_ok($$SELECT mdd.create_rule('writer', 'emr.sneaky_delete()')$$,
				'a predicate calling a function is created (nothing is read at creation)');
SELECT throws_ok($$SELECT * FROM mdd.preview_rule('writer')$$, '25006', NULL,
				 'a predicate whose function writes fails: read-only execution (25006)');
SELECT lives_ok($$SELECT mdd.create_rule('counter', $p$nextval('emr.counter') > 0$p$)$$,
				'a predicate taking sequence numbers is created');
SELECT throws_ok($$SELECT * FROM mdd.preview_rule('counter')$$, '25006', NULL,
				 'and fails when it runs: 25006');
SELECT lives_ok($$SELECT mdd.create_rule('role-change', $p$set_config('role', 'postgres', true) = 'x'$p$)$$,
				'a predicate that changes role is created');
SELECT throws_ok($$SELECT * FROM mdd.preview_rule('role-change')$$, '42501', NULL,
				 'and cannot change role when it runs: 42501');
SELECT lives_ok($$SELECT mdd.create_rule('lo-writer', 'lo_create(0) > 0')$$, 'a predicate creating large objects');
SELECT count(*) AS los0 FROM pg_largeobject_metadata \gset
SELECT is((SELECT count(*) FROM mdd.preview_rule('lo-writer')), 13::bigint,
		  'PostgreSQL 15 lets lo_create through a read-only transaction ...');
RESET ROLE;
SELECT is((SELECT count(*) FROM pg_largeobject_metadata), :los0::bigint,
		  '... but the rule''s subtransaction is rolled back: no large object is left');
SELECT is((SELECT count(*) FROM emr.course), 8::bigint, 'the EMR is untouched');
SELECT is(current_user::text, 'postgres', 'the caller''s role is what it was');
SELECT is(current_setting('transaction_read_only'), 'off', 'the transaction is writable again');
SELECT lives_ok($$SELECT mdd.drop_rule('writer')$$, 'drop a rule');
SELECT throws_ok($$SELECT mdd.drop_rule('writer')$$, '42704', NULL, 'dropping it again: 42704');
SELECT throws_ok($$SELECT mdd.preview_rule('writer')$$, '42704', NULL, 'preview of an unknown rule: 42704');
SELECT throws_ok($$SELECT mdd.run_rule('writer')$$, '42704', NULL, 'run of an unknown rule: 42704');

-- ---------------------------------------------------------------------------
-- runs are jobs

SELECT mdd.run_rule('cbct-after-course') AS run1 \gset
SELECT results_eq($$SELECT kind, state, storage, total, rule FROM mdd.jobs WHERE id = $$ || :run1,
	$$VALUES ('archive', 'queued', 'vault06', 5, 'cbct-after-course')$$,
	'run_rule queues an archive job of the selected objects and what travels with them');
SELECT is((SELECT array_agg(object ORDER BY object) FROM mdd.job_item WHERE job = :run1),
		  pg_temp.ids('r95 cbct', 'r95 cbct by image type', 'r400 cbct', 'rtwo cbct', 'r95 reg'),
		  'the job''s objects');
SELECT is((SELECT options->>'batch' FROM mdd.job WHERE id = :run1), '100', 'batches of batch_size objects');
SELECT is((SELECT last_job FROM mdd.rules WHERE name = 'cbct-after-course'), :run1::bigint,
		  'mdd.rules links the run');
SELECT throws_ok($$SELECT mdd.run_rule('cbct-after-course')$$, '55006', NULL,
				 'a rule never runs twice at once: 55006');
SELECT is(mdd._start_rule_run((SELECT id FROM mdd.rule WHERE name = 'cbct-after-course'), false, false), NULL,
		  'the scheduler skips a rule whose run is still going');
SELECT lives_ok($$SELECT mdd.drop_rule('cbct-after-course')$$, 'a rule can be dropped while its run is queued');
SELECT results_eq($$SELECT state, rule FROM mdd.jobs WHERE id = $$ || :run1,
	$$VALUES ('cancelled', 'cbct-after-course')$$,
	'its run is cancelled, and still says which rule it ran');

SELECT lives_ok($$SELECT mdd.create_rule('nothing', 'false')$$, 'a rule that selects nothing');
SELECT mdd.run_rule('nothing') AS run2 \gset
SELECT results_eq($$SELECT kind, state, total FROM mdd.jobs WHERE id = $$ || :run2,
	$$VALUES ('archive', 'queued', 0)$$, 'its run is still a job, of no object');

-- ---------------------------------------------------------------------------
-- send rules send each object once

SET LOCAL ROLE mdd_t06_admin;
SELECT lives_ok($$SELECT mdd.create_rule('plans-to-tps', 'o.patient_id = ''R95''', 'send', node => 'tps06',
					include_related => false)$$,
				'a send rule names the node it sends to');
RESET ROLE;
SELECT is((SELECT array_agg(x ORDER BY x) FROM mdd.preview_rule('plans-to-tps') x),
		  pg_temp.ids('r95 cbct', 'r95 cbct by image type', 'r95 pct', 'r95 mr', 'r95 reg'),
		  'it selects the DICOM objects of its predicate');
SELECT results_eq($$SELECT action, node, storage FROM mdd.rules WHERE name = 'plans-to-tps'$$,
				  $$VALUES ('send', 'tps06', NULL::text)$$, 'mdd.rules shows its node');
SELECT mdd.run_rule('plans-to-tps') AS run3 \gset
SELECT results_eq($$SELECT kind, total, options->>'rule', options->>'batch' FROM mdd.job j WHERE j.id = $$ || :run3,
				  $$VALUES ('send', 5, 'plans-to-tps', '500')$$, 'its run is a send job of those objects');
-- as if the job had delivered two of them
UPDATE mdd.job_item SET state = 'done' WHERE job = :run3
   AND object = ANY (pg_temp.ids('r95 cbct', 'r95 mr'));
UPDATE mdd.job SET state = 'done', finished_at = now() WHERE id = :run3;
SELECT is((SELECT array_agg(x ORDER BY x) FROM mdd.preview_rule('plans-to-tps') x),
		  pg_temp.ids('r95 cbct by image type', 'r95 pct', 'r95 reg'),
		  'what the node received is not selected again');

-- ---------------------------------------------------------------------------
-- the scheduler's tick (mdd._schedule_rules, which bgworker/scheduler.c calls)

SET LOCAL ROLE mdd_t06_admin;
SELECT lives_ok($$SELECT mdd.create_rule('every-minute', 'o.modality = ''MR''', schedule => '* * * * *')$$,
				'a rule that fires every minute');
SELECT lives_ok($$SELECT mdd.create_rule('closed-now', 'o.modality = ''MR''', schedule => '* * * * *',
					window_start => (localtime + interval '1 hour')::time,
					window_end => (localtime - interval '1 hour')::time)$$,
				'one whose window is closed now');
SELECT lives_ok($$SELECT mdd.create_rule('loses-rights', 'EXISTS (SELECT 1 FROM emr.course)',
					schedule => '* * * * *')$$,
				'one whose owner will lose the right to read the EMR');
RESET ROLE;
SELECT ok(mdd._schedule_rules() BETWEEN 0 AND 60, 'the tick returns the seconds until the next rule is due');
SELECT is((SELECT count(*) FROM mdd.rules WHERE name IN ('every-minute', 'closed-now', 'loses-rights')
		   AND next_run = date_trunc('minute', now()) + interval '1 minute' AND last_job IS NULL), 3::bigint,
		  'new rules get their next run, the next minute, and do not run yet');
UPDATE mdd.rule SET next_run_at = now() - interval '1 minute'
WHERE name IN ('every-minute', 'closed-now', 'loses-rights');
REVOKE emr_reader FROM mdd_t06_admin;
SELECT ok(mdd._schedule_rules() IS NOT NULL, 'a tick with three rules due');
GRANT emr_reader TO mdd_t06_admin;
SELECT results_eq($$SELECT j.kind, j.created_by::text COLLATE "default", j.options->>'scheduled', j.options->>'rule'
					FROM mdd.rules r JOIN mdd.job j ON j.id = r.last_job WHERE r.name = 'every-minute'$$,
	$$VALUES ('archive', 'mdd_t06_admin', 'true', 'every-minute')$$,
	'the due rule runs: a job on behalf of its owner');
SELECT is((SELECT last_job FROM mdd.rules WHERE name = 'closed-now'), NULL,
		  'the due rule whose window is closed does not run');
SELECT is((SELECT last_error FROM mdd.rules WHERE name = 'loses-rights'),
			'permission denied for schema emr (SQLSTATE 42501)',
			'the rule that cannot run says why in last_error');
SELECT is((SELECT count(*) FROM mdd.rules WHERE name IN ('every-minute', 'closed-now', 'loses-rights')
		   AND next_run = date_trunc('minute', now()) + interval '1 minute'), 3::bigint,
		  'all three are due again at their next time');

-- ---------------------------------------------------------------------------
-- windows, in the session's time zone (the scheduler's is the server's)

SET LOCAL TimeZone = 'UTC';
SELECT ok(mdd._in_window('08:00', '17:00', '2026-12-04 08:00+00'), 'a day window includes its start');
SELECT ok(NOT mdd._in_window('08:00', '17:00', '2026-12-04 17:00+00'), 'and excludes its end');
SELECT ok(NOT mdd._in_window('08:00', '17:00', '2026-12-04 03:00+00'), 'and the night');
SELECT ok(mdd._in_window('22:00', '06:00', '2026-12-04 23:30+00'), 'a window across midnight includes 23:30');
SELECT ok(mdd._in_window('22:00', '06:00', '2026-12-05 05:59+00'), 'and 05:59');
SELECT ok(NOT mdd._in_window('22:00', '06:00', '2026-12-05 06:00+00'), 'but not 06:00');
SELECT ok(NOT mdd._in_window('22:00', '06:00', '2026-12-05 12:00+00'), 'nor noon');
SELECT ok(mdd._in_window(NULL, NULL, '2026-12-05 12:00+00'), 'no window: always');
SELECT is(mdd._window_opens('22:00', '06:00', '2026-12-05 12:00+00'), '2026-12-05 22:00+00'::timestamptz,
		  'closed at noon: the window opens at 22:00 the same day');
SELECT is(mdd._window_opens('22:00', '06:00', '2026-12-05 23:00+00'), '2026-12-05 23:00+00'::timestamptz,
		  'open: now');
SELECT is(mdd._window_opens('08:00', '17:00', '2026-12-05 18:00+00'), '2026-12-06 08:00+00'::timestamptz,
		  'closed in the evening: the window opens the next morning');
SET LOCAL TimeZone = 'Europe/Berlin';
SELECT ok(mdd._in_window('22:00', '06:00', '2026-12-04 22:30+00'), 'in Berlin 23:30 is inside 22:00-06:00');
SELECT ok(NOT mdd._in_window('22:00', '06:00', '2026-12-05 05:30+00'), 'in Berlin 06:30 is not');

-- cron schedules
SET LOCAL TimeZone = 'UTC';
SELECT is(mdd._cron_next('* * * * *', '2026-12-04 10:15:30+00'), '2026-12-04 10:16+00'::timestamptz,
		  '* * * * *: the next whole minute');
SELECT is(mdd._cron_next('30 1 * * 1-5', '2026-12-04 15:00+00'), '2026-12-07 01:30+00'::timestamptz,
		  'a range of weekdays: Friday afternoon to Monday 01:30');
SELECT is(mdd._cron_next('*/15 9-17 * * mon,fri', '2026-12-05 10:00+00'), '2026-12-07 09:00+00'::timestamptz,
		  'steps, ranges and day names');
SELECT is(mdd._cron_next('*/15 9-17 * * mon,fri', '2026-12-07 09:00+00'), '2026-12-07 09:15+00'::timestamptz,
		  'strictly after the given time');
SELECT is(mdd._cron_next('0 0 1,15 * 0', '2026-12-02 00:00+00'), '2026-12-06 00:00+00'::timestamptz,
		  'day of month and day of week both set: either matches (Sunday the 6th)');
SELECT is(mdd._cron_next('0 3 29 feb *', '2026-03-01 00:00+00'), '2028-02-29 03:00+00'::timestamptz,
		  'month names; 29 February');
SELECT is(mdd._cron_next('5/20 * * * 7', '2026-12-06 10:50+00'), '2026-12-06 11:05+00'::timestamptz,
		  'a start with a step, and 7 for Sunday');
SET LOCAL TimeZone = 'Europe/Berlin';
SELECT is(mdd._cron_next('30 2 * * *', '2027-03-27 12:00+01'), '2027-03-28 03:30+02'::timestamptz,
		  'the hour skipped in spring: 02:30 is read as PostgreSQL reads it (03:30 summer time)');
SELECT is(mdd._cron_next('30 2 * * *', '2027-10-31 02:40+01'), '2027-11-01 02:30+01'::timestamptz,
		  'the hour repeated in autumn: once, not twice');
SELECT is(mdd._cron_next('0 1 * * *', '2026-12-04 12:00+00'), '2026-12-05 00:00+00'::timestamptz,
		  'schedules follow the time zone: 01:00 in Berlin is midnight UTC');

-- a verify rule: the objects with a copy on its storage, checked by a job
SELECT lives_ok($$SELECT mdd.create_rule('fixity06', 'true', 'verify', 'vault06', batch_size => 2)$$,
				'a verify rule of a storage');
SELECT is((SELECT array_agg(x ORDER BY x) FROM mdd.preview_rule('fixity06') x),
		  (SELECT array_agg(c.object ORDER BY c.object) FROM mdd.copy c JOIN mdd.storage s ON s.id = c.storage
		   WHERE s.name = 'vault06' AND c.state = 'present'),
		  'its preview: exactly the objects with a present copy on the storage');
CREATE TEMP TABLE t06_fixity AS SELECT mdd.run_rule('fixity06') AS job;
SELECT is((SELECT (j.kind, j.total, j.options->>'batch', st.name)::text FROM mdd.job j
		   JOIN mdd.storage st ON st.id = j.storage WHERE j.id = (SELECT job FROM t06_fixity)),
		  (SELECT ('verify', count(*), 2, 'vault06')::text FROM mdd.copy c JOIN mdd.storage s ON s.id = c.storage
		   WHERE s.name = 'vault06' AND c.state = 'present'),
		  'a run is a verify job of those copies, in batches of the rule''s size');

SELECT * FROM finish();
ROLLBACK;
