-- mdd: mdd.drop_storage forgets a storage only when nothing depends on it:
-- no copy in any state, no rule, no job, no setting; 'online' never.
SET client_min_messages = warning;

BEGIN;
SET LOCAL jit = off;
SELECT plan(11);

SELECT mdd.add_storage('t10a', 'file', 'archive', jsonb_build_object('root', current_setting('mdd_test.dir') || '/allowed'));
SELECT mdd.add_storage('t10b', 'file', 'archive', jsonb_build_object('root', current_setting('mdd_test.dir') || '/allowed'));
SELECT mdd.add_storage('t10c', 'file', 'archive', jsonb_build_object('root', current_setting('mdd_test.dir') || '/allowed'));
SELECT mdd.add_storage('t10d', 'file', 'archive', jsonb_build_object('root', current_setting('mdd_test.dir') || '/allowed'));

SELECT throws_ok($$SELECT mdd.drop_storage('t10nosuch')$$, '42704', NULL, 'an unknown storage: 42704');
SELECT throws_ok($$SELECT mdd.drop_storage('online')$$, '55000', NULL, 'online is never dropped');

-- a copy, in whatever state, keeps it
CREATE TEMP TABLE t10 AS
SELECT mdd.store(pg_read_binary_file(current_setting('mdd_test.dir') || '/allowed/patient/rtplan.dcm')) AS id;
INSERT INTO mdd.copy (object, storage, locator, state, size, sha256)
SELECT t10.id, (SELECT id FROM mdd.storage WHERE name = 't10a'), 't10/locator', 'writing', 1, '\x00' FROM t10;
SELECT throws_like($$SELECT mdd.drop_storage('t10a')$$, 'storage "t10a" holds 1 copies',
				   'a storage holding a copy (even one being written) cannot be dropped');

SELECT mdd.create_rule('t10-rule', 'false', 'archive', storage => 't10b');
SELECT throws_like($$SELECT mdd.drop_storage('t10b')$$, 'storage "t10b" is used by rule "t10-rule"',
				   'a storage a rule archives to cannot be dropped');

INSERT INTO mdd.job (kind, state, storage, created_by, finished_at)
VALUES ('archive', 'done', (SELECT id FROM mdd.storage WHERE name = 't10c'), current_user, now());
SELECT throws_like($$SELECT mdd.drop_storage('t10c')$$, 'storage "t10c" is used by job % (done)',
				   'a storage an ended job used cannot be dropped');

SET LOCAL mdd.archive_storage = 't10d';
SELECT throws_ok($$SELECT mdd.drop_storage('t10d')$$, '55000', 'storage "t10d" is named by setting mdd.archive_storage',
				 'a storage a setting names cannot be dropped');
RESET mdd.archive_storage;

SELECT lives_ok($$SELECT mdd.drop_storage('t10d')$$, 'an unused storage is dropped');
SELECT is((SELECT count(*) FROM mdd.storages WHERE name = 't10d'), 0::bigint, 'it is gone from mdd.storages');
SELECT is((SELECT detail FROM mdd.audit_log WHERE action = 'drop storage' ORDER BY at DESC LIMIT 1),
		  't10d (file, archive)', 'the drop is audited');
SELECT throws_ok($$SELECT mdd.drop_storage('t10d')$$, '42704', NULL, 'dropping it again: 42704');
SELECT is((SELECT count(*) FROM mdd.storages WHERE name IN ('t10a', 't10b', 't10c')), 3::bigint,
		  'the storages refused are all still there');

SELECT * FROM finish();
ROLLBACK;
