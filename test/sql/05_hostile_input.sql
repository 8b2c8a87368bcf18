-- mdd: inputs crafted against the DICOM parser (the reproducers of the
-- fuzzer's findings in fuzz/regressions) are refused by a live server with
-- a clear error; the backend survives and nothing is stored.
SET client_min_messages = warning;

BEGIN;
SELECT plan(8);

CREATE FUNCTION pg_temp.r(name text) RETURNS bytea LANGUAGE sql
AS $$ SELECT pg_read_binary_file(current_setting('mdd_test.dir') || '/allowed/regressions/' || name) $$;

SELECT throws_ok($$SELECT mdd.store(pg_temp.r('stack-overflow-nested-sequences'))$$, '22P03',
				 'DICOM data is truncated or malformed',
				 '8,000 nested sequences are refused, not a stack overflow');
SELECT throws_like($$SELECT mdd.parse(pg_temp.r('stack-overflow-nested-sequences'))$$,
				   '%malformed%', 'mdd.parse refuses them as well');
SELECT throws_ok($$SELECT mdd.store(pg_temp.r('oom-value-length-exceeds-input'))$$, '22P03', NULL,
				 'a value length of 3.6 GB in a 12-byte input is refused without allocating it');
SELECT throws_ok($$SELECT mdd.store(pg_temp.r('oom-deflated-value-length'))$$, '22P03', NULL,
				 'a deflated data set declaring a 4 GB value is refused');
SELECT ok(pg_backend_pid() IS NOT NULL AND (SELECT count(*) FROM pg_stat_activity) > 0,
		  'the backend is alive after the hostile inputs');
SELECT is((SELECT count(*) FROM mdd.object WHERE ingested_at >= now()), 0::bigint,
		  'no object was recorded');
SELECT is((SELECT count(*) FROM mdd.audit WHERE at >= now() AND action = 'store'), 0::bigint,
		  'no store was audited');
-- a legitimate deflated object still parses, its values loaded from the inflated bytes
SELECT ok((SELECT mdd.parse(pg_read_binary_file(
				(SELECT trim(d) FROM unnest(string_to_array(current_setting('mdd.allowed_paths'), ',')) d
				 WHERE trim(d) ~ '/test_files/?$' LIMIT 1) || '/image_dfl.dcm'))->>'transfer_syntax_uid')
		  = '1.2.840.10008.1.2.1.99', 'a genuine deflated file still parses');

SELECT * FROM finish();
ROLLBACK;
