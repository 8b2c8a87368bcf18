-- mdd: the durable job queue that the job runners (bgworker/runner.c) work
-- through, with its progress view, mdd.wait and mdd.cancel

CREATE TABLE mdd.job (
	id				bigserial PRIMARY KEY,
	kind			text NOT NULL CHECK (kind IN ('archive', 'restore', 'send', 'retrieve', 'move', 'verify', 'commit')),
	state			text NOT NULL DEFAULT 'queued'
					CHECK (state IN ('queued', 'running', 'done', 'failed', 'cancelled')),
	storage			integer REFERENCES mdd.storage(id),	-- where the objects go
	options			jsonb NOT NULL DEFAULT '{}',
	created_by		name NOT NULL,
	client			text,
	created_at		timestamptz NOT NULL DEFAULT now(),
	started_at		timestamptz,
	finished_at		timestamptz,
	total			integer NOT NULL DEFAULT 0,
	done			integer NOT NULL DEFAULT 0,
	failed			integer NOT NULL DEFAULT 0,
	bytes			bigint NOT NULL DEFAULT 0,
	attempts		integer NOT NULL DEFAULT 0,	-- transient failures in a row
	next_attempt_at timestamptz,
	batches			integer NOT NULL DEFAULT 0,	-- batches of objects taken so far
	rule			integer,	-- the archive rule whose run this is (sql/rules.sql)
	error			text
);
CREATE INDEX ON mdd.job (rule);
CREATE INDEX ON mdd.job (state) WHERE state IN ('queued', 'running');

-- One row per object of a job.  state: 'pending'; 'copying' once the new
-- copy is recorded as writing; 'releasing' once it is present and the old
-- copies wait to be removed; 'done' or 'failed' at the end.
CREATE TABLE mdd.job_item (
	job				bigint NOT NULL REFERENCES mdd.job(id) ON DELETE CASCADE,
	object			bigint NOT NULL REFERENCES mdd.object(id),
	state			text NOT NULL DEFAULT 'pending'
					CHECK (state IN ('pending', 'copying', 'releasing', 'done', 'failed')),
	batch			integer,	-- the batch of the job that took it (1, 2, ...)
	error			text,
	PRIMARY KEY (job, object)
);
CREATE INDEX ON mdd.job_item (job, state);
CREATE INDEX ON mdd.job_item (object);

-- An audit row of a job's step, whatever process runs it: in the name of
-- the role that asked for the job, from where it asked (a job runner is
-- the bootstrap superuser, without a client of its own).
CREATE FUNCTION mdd._audit_job(j mdd.job, action text, object_id bigint, patient_id text, detail text)
RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
	INSERT INTO mdd.audit (role, action, object_id, patient_id, detail, client)
	VALUES (j.created_by, action, object_id, patient_id, detail, coalesce(j.client, 'local'))
$$;

CREATE VIEW mdd.jobs AS
SELECT j.id, j.kind, j.state, s.name AS storage, j.created_by, j.created_at, j.started_at,
	   j.finished_at, j.total, j.done, j.failed, j.bytes, j.attempts, j.next_attempt_at,
	   j.error, j.batches, j.options->>'rule' AS rule
FROM mdd.job j LEFT JOIN mdd.storage s ON s.id = j.storage;

-- Wake the job runners once the calling transaction commits (C).
CREATE FUNCTION mdd._wake_runners() RETURNS void
	AS 'MODULE_PATHNAME', 'mdd_wake_runners_sql' LANGUAGE C VOLATILE;

CREATE FUNCTION mdd.wait(job bigint, timeout interval DEFAULT '5 min') RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	deadline timestamptz := clock_timestamp() + coalesce(timeout, '5 min');
	s text;
BEGIN
	LOOP
		SELECT j.state INTO s FROM mdd.job j WHERE j.id = wait.job;
		IF NOT FOUND THEN
			RAISE EXCEPTION 'job % does not exist', coalesce(wait.job::text, 'NULL')
				USING ERRCODE = '42704', HINT = 'See mdd.jobs.';
		END IF;
		IF s IN ('done', 'failed', 'cancelled') THEN
			RETURN s;
		END IF;
		IF EXISTS (SELECT 1 FROM mdd.job x WHERE x.id = wait.job
				   AND x.xmin::text::bigint = pg_current_xact_id_if_assigned()::text::bigint % 4294967296) THEN
			RAISE EXCEPTION 'job % was queued by this transaction', wait.job
				USING ERRCODE = '55000', HINT = 'Commit, then wait for it: the runners start on it at commit.';
		END IF;
		IF clock_timestamp() >= deadline THEN
			RAISE EXCEPTION 'job % is still %, after waiting %', wait.job, s, timeout
				USING ERRCODE = '57014';
		END IF;
		PERFORM pg_sleep(0.05);
	END LOOP;
END;
$$;
COMMENT ON FUNCTION mdd.wait(bigint, interval) IS
	'Wait for a job to end; returns done, failed or cancelled';

CREATE FUNCTION mdd.cancel(job bigint) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	s text;
BEGIN
	-- queue behind the step being worked on, ahead of the runner's next one
	-- (see mdd._job_step): a row lock alone lets the runner take it again
	PERFORM pg_advisory_xact_lock(1296319522, cancel.job::int);
	SELECT j.state INTO s FROM mdd.job j WHERE j.id = cancel.job FOR UPDATE;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'job % does not exist', coalesce(cancel.job::text, 'NULL')
			USING ERRCODE = '42704', HINT = 'See mdd.jobs.';
	END IF;
	IF s IN ('queued', 'running') THEN
		UPDATE mdd.job j SET state = 'cancelled', next_attempt_at = NULL, attempts = 0,
			   error = format('cancelled by %s', mdd._caller()),
			   finished_at = CASE WHEN EXISTS (SELECT 1 FROM mdd.job_item i WHERE i.job = j.id
											   AND i.state IN ('copying', 'releasing'))
								  THEN NULL ELSE now() END
		WHERE j.id = cancel.job;
		PERFORM mdd._audit('cancel', NULL, NULL, format('job %s', cancel.job));
		PERFORM mdd._wake_runners();
	END IF;
END;
$$;

-- The next job a runner may take: queued, running (after a restart), or
-- cancelled or failed with copies to undo; due; and not held by another
-- runner (a session advisory lock that the runner keeps while it works on
-- the job).  NULL when there is none.
CREATE FUNCTION mdd._claim_job() RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	j bigint;
BEGIN
	FOR j IN SELECT x.id FROM mdd.job x
			 WHERE (x.state IN ('queued', 'running')
					OR x.state IN ('cancelled', 'failed') AND x.finished_at IS NULL)
			   AND coalesce(x.next_attempt_at, '-infinity') <= now()
			 ORDER BY x.id
			 FOR UPDATE SKIP LOCKED		-- a runner's step holds its job's row
	LOOP
		IF pg_try_advisory_lock(1296319521, j::int) THEN
			RETURN j;
		END IF;
	END LOOP;
	RETURN NULL;
END;
$$;

-- Seconds until the earliest job waiting for a retry is due (NULL: none).
CREATE FUNCTION mdd._next_job_due() RETURNS double precision
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
	SELECT greatest(0, extract(epoch FROM min(next_attempt_at) - now()))::double precision
	FROM mdd.job WHERE (state IN ('queued', 'running') OR finished_at IS NULL)
				   AND next_attempt_at IS NOT NULL
$$;

CREATE FUNCTION mdd._release_job(job bigint) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
	SELECT pg_advisory_unlock(1296319521, job::int)
$$;

-- A transient failure (storage server down, disk full): try again later,
-- waiting longer each time, and give up after the job's max_attempts.
CREATE FUNCTION mdd._job_retry(job bigint, sqlstate text, message text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	j mdd.job;
	max_attempts int;
BEGIN
	SELECT * INTO j FROM mdd.job x WHERE x.id = _job_retry.job FOR UPDATE;
	max_attempts := coalesce((j.options->>'max_attempts')::int, 5);
	IF j.state NOT IN ('queued', 'running') THEN
		-- undoing a cancelled or failed job: keep trying, less and less often
		UPDATE mdd.job x SET attempts = x.attempts + 1,
			   next_attempt_at = now() + least(interval '1 s' * 2 ^ x.attempts, interval '5 min')
		WHERE x.id = _job_retry.job;
		RETURN;
	END IF;
	IF j.attempts + 1 >= max_attempts THEN
		PERFORM mdd._job_fail(job, format('gave up after %s attempts: %s (SQLSTATE %s)',
										  j.attempts + 1, message, sqlstate));
		RETURN;
	END IF;
	UPDATE mdd.job x SET attempts = x.attempts + 1,
		   next_attempt_at = now() + least(interval '1 s' * coalesce((j.options->>'retry_delay')::float8, 1)
										   * 2 ^ x.attempts, interval '5 min'),
		   error = format('attempt %s failed, will retry: %s (SQLSTATE %s)', x.attempts + 1,
						  message, sqlstate)
	WHERE x.id = _job_retry.job;
END;
$$;

-- A permanent failure of the whole job.  Items not yet copied stay as they
-- are; what was written for them is undone by the runner (_job_step).
CREATE FUNCTION mdd._job_fail(job bigint, message text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	-- finished_at stays NULL while copies begun are still to be undone
	UPDATE mdd.job x SET state = 'failed', error = message, next_attempt_at = NULL, attempts = 0,
		   finished_at = CASE WHEN EXISTS (SELECT 1 FROM mdd.job_item i WHERE i.job = x.id
										   AND i.state IN ('copying', 'releasing'))
							  THEN NULL ELSE now() END
	WHERE x.id = _job_fail.job AND x.state IN ('queued', 'running');
	PERFORM mdd._audit_job(x, x.kind || ' failed', NULL, NULL, format('job %s: %s', x.id, message))
	FROM mdd.job x WHERE x.id = _job_fail.job;
END;
$$;

-- The end of a job whose items all came to their end: 'failed' when any
-- did (error names the first), else 'done'; audited as '<kind> done' or
-- '<kind> failed' with what (say, '12 objects to storage vault, 0 failed').
CREATE FUNCTION mdd._job_end(j mdd.job, what text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	first_error text;
BEGIN
	SELECT i.error INTO first_error FROM mdd.job_item i
	WHERE i.job = j.id AND i.state = 'failed' ORDER BY i.object LIMIT 1;
	UPDATE mdd.job x
	SET state = CASE WHEN x.failed > 0 THEN 'failed' ELSE 'done' END,
		finished_at = now(), next_attempt_at = NULL, attempts = 0,
		error = CASE WHEN x.failed > 0
					 THEN format('%s of %s objects failed; the first: %s', x.failed, x.total, first_error) END
	WHERE x.id = j.id;
	PERFORM mdd._audit_job(j, j.kind || CASE WHEN j.failed > 0 THEN ' failed' ELSE ' done' END, NULL, NULL,
						   format('job %s: %s', j.id, what));
END;
$$;

-- A step of a job failed: transient failures of a running job are retried,
-- other failures fail it; undoing a cancelled or failed job is retried.
CREATE FUNCTION mdd._job_error(job bigint, sqlstate text, message text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF mdd._transient(sqlstate)
	   OR (SELECT x.state NOT IN ('queued', 'running') FROM mdd.job x WHERE x.id = _job_error.job) THEN
		PERFORM mdd._job_retry(job, sqlstate, message);
	ELSE
		PERFORM mdd._job_fail(job, format('%s (SQLSTATE %s)', message, sqlstate));
	END IF;
END;
$$;
