-- mdd: how long the history of finished jobs is kept.  Jobs, their items
-- and instances are the record of work done; over the decades an archive
-- lives, nightly rules make millions of such rows.  mdd.purge_jobs removes
-- those of jobs that ended long enough ago; what a rule has moved in all
-- its runs stays counted in the rule itself (mdd.rule.purged_objects,
-- purged_bytes), and what send jobs delivered stays known (mdd.delivered),
-- so that a send rule never sends an object to a node twice.

-- The objects send jobs delivered to each node, once their jobs are purged
-- (before that, the done items of the send jobs say it).
CREATE TABLE mdd.delivered (
	node			integer NOT NULL REFERENCES mdd.node(id),
	object			bigint NOT NULL REFERENCES mdd.object(id),
	delivered_at	timestamptz NOT NULL,
	PRIMARY KEY (node, object)
);

-- mdd.purge_jobs: remove the jobs that ended (done, failed or cancelled,
-- nothing left to undo) before now() - older_than, with their items and
-- instances; returns how many.  The objects purged send jobs delivered
-- are kept in mdd.delivered.  A rule's last job is kept, so that
-- mdd.rules still shows the last run.  Objects are not touched: where an
-- object is lives in its copies, never in a job.
CREATE FUNCTION mdd.purge_jobs(older_than interval) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	removed bigint;
BEGIN
	IF older_than IS NULL OR older_than < interval '0' THEN
		RAISE EXCEPTION 'invalid age %', coalesce(older_than::text, 'NULL')
			USING ERRCODE = '22023', HINT = 'Give how long ended jobs are kept, e.g. ''1 year''.';
	END IF;
	WITH gone AS (
		DELETE FROM mdd.job j
		WHERE j.state IN ('done', 'failed', 'cancelled')
		  AND j.finished_at < now() - older_than
		  AND NOT EXISTS (SELECT 1 FROM mdd.rule r WHERE r.last_job = j.id)
		  AND NOT EXISTS (SELECT 1 FROM mdd.job_item i
						  WHERE i.job = j.id AND i.state IN ('copying', 'releasing'))
		RETURNING j.id, j.kind, j.node, j.finished_at, j.rule, j.done, j.bytes),
	kept_deliveries AS (
		INSERT INTO mdd.delivered (node, object, delivered_at)
		SELECT g.node, i.object, max(g.finished_at)
		FROM gone g JOIN mdd.job_item i ON i.job = g.id
		WHERE g.kind = 'send' AND i.state = 'done'
		GROUP BY g.node, i.object
		ON CONFLICT (node, object) DO NOTHING),
	counted AS (
		UPDATE mdd.rule r SET purged_objects = r.purged_objects + t.done,
			   purged_bytes = r.purged_bytes + t.bytes
		FROM (SELECT g.rule, sum(g.done) AS done, sum(g.bytes) AS bytes
			  FROM gone g WHERE g.rule IS NOT NULL GROUP BY g.rule) t
		WHERE r.id = t.rule)
	SELECT count(*) INTO removed FROM gone;

	PERFORM mdd._audit('purge jobs', NULL, NULL,
					   format('%s jobs that ended before %s', removed, now() - older_than));
	RETURN removed;
END;
$$;
