-- mdd: archive rules.  A rule is an SQL condition over mdd.objects o (which
-- may read the EMR's own tables), an action (archive, restore, send, or
-- verify: a fixity check of the copies on a storage, sql/fixity.sql), a cron
-- schedule and a window of quiet hours; its runs are jobs of the job queue,
-- started by mdd.run_rule or by the rule scheduler (bgworker/scheduler.c).
--
-- A send rule sends each object once: what a send job already delivered to
-- the node is not selected again.
--
-- A predicate runs with the rights of the role that created the rule, in a
-- read-only, security-restricted operation (extension/rule_select.c).
-- Schedules and windows are read in the server's time zone: the scheduler
-- and the job runners, which check them, have no client to set another.

CREATE TABLE mdd.rule (
	id				serial PRIMARY KEY,
	name			text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9_.-]{1,63}$'),
	owner			oid NOT NULL,	-- the role whose rights the predicate runs with
	predicate		text NOT NULL,
	action			text NOT NULL CHECK (action IN ('archive', 'restore', 'send', 'verify')),
	storage			integer REFERENCES mdd.storage(id),	-- where archive sends objects
	node			integer REFERENCES mdd.node(id),	-- where send sends them
	schedule		text,			-- 5-field cron; NULL: run by hand only
	window_start	time,
	window_end		time,			-- before window_start: the window spans midnight
	batch_size		integer NOT NULL CHECK (batch_size BETWEEN 1 AND 100000),
	include_related boolean NOT NULL,
	created_at		timestamptz NOT NULL DEFAULT now(),
	next_run_at		timestamptz,	-- when the schedule next fires; set by the scheduler
	-- the last run's job; no foreign key, since mdd.job refers to mdd.rule
	-- and pg_restore could not load two tables that refer to each other
	last_job		bigint,
	last_error		text,			-- why the scheduler could not start the last run
	last_error_at	timestamptz,
	-- what the runs whose jobs mdd.purge_jobs removed had moved
	purged_objects	bigint NOT NULL DEFAULT 0,
	purged_bytes	bigint NOT NULL DEFAULT 0,
	CHECK ((window_start IS NULL) = (window_end IS NULL)),
	CHECK ((action IN ('archive', 'verify')) = (storage IS NOT NULL)),
	CHECK ((action = 'send') = (node IS NOT NULL))
);
ALTER TABLE mdd.job ADD FOREIGN KEY (rule) REFERENCES mdd.rule(id) ON DELETE SET NULL;

CREATE FUNCTION mdd._rule_select(owner oid, predicate text, scope text, row_limit integer)
RETURNS bigint[]
	AS 'MODULE_PATHNAME', 'mdd_rule_select_sql' LANGUAGE C VOLATILE;
CREATE FUNCTION mdd._cron_next(schedule text, after timestamptz) RETURNS timestamptz
	AS 'MODULE_PATHNAME', 'mdd_cron_next_sql' LANGUAGE C STABLE;
CREATE FUNCTION mdd._throttle(bytes bigint, began timestamptz) RETURNS timestamptz
	AS 'MODULE_PATHNAME', 'mdd_throttle_sql' LANGUAGE C VOLATILE;
CREATE FUNCTION mdd._wake_scheduler() RETURNS void
	AS 'MODULE_PATHNAME', 'mdd_wake_scheduler_sql' LANGUAGE C VOLATILE;

-- The objects an action can act on at all: archive takes what is online,
-- restore what is archived, send DICOM objects, verify any object (those
-- with a copy on its storage, mdd._rule_objects).
CREATE FUNCTION mdd._rule_scope(action text) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
	SELECT CASE action WHEN 'archive' THEN 'o.tier = ''online'''
					   WHEN 'restore' THEN 'o.tier = ''archive'''
					   WHEN 'verify' THEN 'true'
					   ELSE 'o.kind = ''dicom''' END
$$;

-- The objects a rule selects now: its predicate, as its owner, within its
-- action's scope; for a send rule, less what send jobs already delivered
-- to its node (their done items, or mdd.delivered once they are purged);
-- for a verify rule, those with a copy on its storage.
CREATE FUNCTION mdd._rule_objects(r mdd.rule) RETURNS bigint[]
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	ids bigint[] := mdd._rule_select(r.owner, r.predicate, mdd._rule_scope(r.action), NULL);
BEGIN
	IF r.action = 'send' AND cardinality(ids) > 0 THEN
		SELECT coalesce(array_agg(x ORDER BY x), '{}') INTO ids FROM unnest(ids) x
		WHERE NOT EXISTS (SELECT 1 FROM mdd.job_item i JOIN mdd.job j ON j.id = i.job
						  WHERE i.object = x AND i.state = 'done' AND j.kind = 'send' AND j.node = r.node)
		  AND NOT EXISTS (SELECT 1 FROM mdd.delivered d	-- of purged jobs (sql/retention.sql)
						  WHERE d.node = r.node AND d.object = x);
	END IF;
	IF r.action = 'verify' AND cardinality(ids) > 0 THEN
		SELECT coalesce(array_agg(x ORDER BY x), '{}') INTO ids FROM unnest(ids) x
		WHERE EXISTS (SELECT 1 FROM mdd.copy c WHERE c.object = x AND c.storage = r.storage AND c.state = 'present');
	END IF;
	RETURN ids;
END;
$$;

-- Whether a time lies inside a window (in the session's time zone).  No
-- window: always; start after end: the window spans midnight; start equal
-- to end: the whole day.
CREATE FUNCTION mdd._in_window(window_start time, window_end time, at timestamptz) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
	SELECT CASE
		WHEN window_start IS NULL OR window_start = window_end THEN true
		WHEN window_start < window_end THEN at::time >= window_start AND at::time < window_end
		ELSE at::time >= window_start OR at::time < window_end
	END
$$;

-- The next time the window opens after at (at itself when it is open).
CREATE FUNCTION mdd._window_opens(window_start time, window_end time, at timestamptz)
RETURNS timestamptz
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	local timestamp := at::timestamp;
	opens timestamp := local::date + window_start;
BEGIN
	IF mdd._in_window(window_start, window_end, at) THEN
		RETURN at;
	END IF;
	IF opens <= local THEN
		opens := opens + interval '1 day';
	END IF;
	RETURN opens::timestamptz;
END;
$$;

-- For a step of a rule's job that moved or sent objects: keep rule work
-- within mdd.rule_bandwidth.  'wait' (the job waits until the cap allows
-- its next step) or the step's own result.
CREATE FUNCTION mdd._rule_throttle(j mdd.job, result text) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	wait_until timestamptz;
BEGIN
	IF j.rule IS NULL OR result <> 'more' THEN
		RETURN result;
	END IF;
	wait_until := mdd._throttle((SELECT x.bytes FROM mdd.job x WHERE x.id = j.id) - j.bytes, now());
	IF wait_until <= clock_timestamp() THEN
		RETURN result;
	END IF;
	UPDATE mdd.job x SET next_attempt_at = wait_until WHERE x.id = j.id;
	RETURN 'wait';
END;
$$;

-- For a step of a rule's job about to take a new batch: 'wait' when the
-- rule's window is closed (the job waits until it opens; a run started with
-- ignore_window never waits), else NULL.
CREATE FUNCTION mdd._rule_window_closed(j mdd.job) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	r mdd.rule;
	opens timestamptz;
BEGIN
	IF j.rule IS NOT NULL AND NOT coalesce((j.options->>'ignore_window')::boolean, false) THEN
		SELECT * INTO r FROM mdd.rule x WHERE x.id = j.rule;
		IF FOUND AND NOT mdd._in_window(r.window_start, r.window_end, now()) THEN
			opens := mdd._window_opens(r.window_start, r.window_end, now());
		END IF;
	END IF;
	IF opens IS NULL THEN
		UPDATE mdd.job x SET error = NULL WHERE x.id = j.id AND x.error LIKE 'waiting for the window %';
		RETURN NULL;
	END IF;
	UPDATE mdd.job x SET next_attempt_at = opens,
		   error = format('waiting for the window of rule %s, which opens at %s', j.options->>'rule', opens)
	WHERE x.id = j.id;
	RETURN 'wait';
END;
$$;

-- The rule of that name, or 42704.
CREATE FUNCTION mdd._rule(name text, lock boolean DEFAULT false) RETURNS mdd.rule
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	r mdd.rule;
BEGIN
	IF lock THEN
		SELECT * INTO r FROM mdd.rule x WHERE x.name = _rule.name FOR UPDATE;
	ELSE
		SELECT * INTO r FROM mdd.rule x WHERE x.name = _rule.name;
	END IF;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'rule "%" does not exist', coalesce(name, 'NULL')
			USING ERRCODE = '42704', HINT = 'See mdd.rules.';
	END IF;
	RETURN r;
END;
$$;

CREATE FUNCTION mdd.create_rule(name text, predicate text, action text DEFAULT 'archive',
								storage text DEFAULT NULL, schedule text DEFAULT NULL,
								window_start time DEFAULT NULL, window_end time DEFAULT NULL,
								batch_size integer DEFAULT 500,
								include_related boolean DEFAULT true, node text DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	owner oid := (SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname = mdd._caller());
	target integer;
	receiver mdd.node;
BEGIN
	IF name IS NULL OR predicate IS NULL OR action IS NULL OR batch_size IS NULL
	   OR include_related IS NULL THEN
		RAISE EXCEPTION 'rule name, predicate, action, batch_size and include_related must not be NULL'
			USING ERRCODE = '22004';
	END IF;
	IF name !~ '^[A-Za-z0-9_.-]{1,63}$' THEN
		RAISE EXCEPTION 'invalid rule name "%"', name
			USING ERRCODE = '22023', DETAIL = 'A rule name is 1 to 63 letters, digits, "_", "." or "-".';
	END IF;
	IF EXISTS (SELECT 1 FROM mdd.rule x WHERE x.name = create_rule.name) THEN
		RAISE EXCEPTION 'rule "%" already exists', name
			USING ERRCODE = '42710', HINT = 'Drop it first with mdd.drop_rule.';
	END IF;
	IF action NOT IN ('archive', 'restore', 'send', 'verify') THEN
		RAISE EXCEPTION 'invalid rule action "%"', action
			USING ERRCODE = '22023', HINT = 'The actions are archive, restore, send and verify.';
	END IF;
	IF action = 'archive' THEN
		target := (mdd._archive_target(storage)).id;
	ELSIF action = 'verify' THEN
		IF storage IS NULL THEN
			RAISE EXCEPTION 'a verify rule names the storage whose copies it checks' USING ERRCODE = '22023';
		END IF;
		target := (mdd._storage(storage)).id;
	ELSIF storage IS NOT NULL THEN
		RAISE EXCEPTION 'a rule that %s takes no storage', action
			USING ERRCODE = '22023', DETAIL = 'Only archive and verify rules name a storage.';
	END IF;
	IF action = 'send' THEN
		SELECT * INTO receiver FROM mdd.node x WHERE x.name = create_rule.node;
		IF NOT FOUND THEN
			RAISE EXCEPTION 'node "%" does not exist', coalesce(create_rule.node, 'NULL')
				USING ERRCODE = '42704', HINT = 'A send rule names the node it sends to; see mdd.nodes.';
		END IF;
	ELSIF node IS NOT NULL THEN
		RAISE EXCEPTION 'a rule that %s takes no node', action
			USING ERRCODE = '22023', DETAIL = 'Only send rules name a node.';
	END IF;
	IF schedule IS NOT NULL THEN
		PERFORM mdd._cron_next(schedule, now());
	END IF;
	IF (window_start IS NULL) <> (window_end IS NULL) THEN
		RAISE EXCEPTION 'a rule window needs both window_start and window_end'
			USING ERRCODE = '22023';
	END IF;
	IF batch_size NOT BETWEEN 1 AND 100000 THEN
		RAISE EXCEPTION 'invalid batch_size %', batch_size
			USING ERRCODE = '22023', HINT = 'A batch is 1 to 100000 objects.';
	END IF;

	-- syntax, type, tables, columns and permissions, as the owner, reading nothing
	PERFORM mdd._rule_select(owner, predicate, mdd._rule_scope(action), 0);

	INSERT INTO mdd.rule (name, owner, predicate, action, storage, node, schedule, window_start,
						  window_end, batch_size, include_related)
	VALUES (name, owner, predicate, action, target, receiver.id, schedule, window_start, window_end,
			batch_size, include_related);
	PERFORM mdd._audit('create rule', NULL, NULL, format('rule %s: %s %s', name, action, predicate));
	PERFORM mdd._wake_scheduler();
END;
$$;
COMMENT ON FUNCTION mdd.create_rule(text, text, text, text, text, time, time, integer, boolean, text) IS
	'Create an archive rule: a condition over mdd.objects o, an action, a cron schedule and a window';

CREATE FUNCTION mdd.preview_rule(name text, include_related boolean DEFAULT false)
RETURNS SETOF bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	r mdd.rule := mdd._rule(name);
	ids bigint[] := mdd._rule_objects(r);
BEGIN
	IF include_related AND r.include_related AND cardinality(ids) > 0 THEN
		ids := mdd._closure(ids, true);
	END IF;
	RETURN QUERY SELECT x FROM unnest(ids) x;
END;
$$;
COMMENT ON FUNCTION mdd.preview_rule(text, boolean) IS
	'The objects a rule selects now (with include_related, also what travels with them)';

-- Start a run of a rule: the objects it selects now (and what travels with
-- them) become a job.  NULL when a run of the rule is still going, unless
-- manual, which is then an error: a rule never runs twice at once.
CREATE FUNCTION mdd._start_rule_run(rule_id integer, manual boolean, ignore_window boolean)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	r mdd.rule;
	running bigint;
	ids bigint[];
	target mdd.storage;
	job bigint;
BEGIN
	SELECT * INTO r FROM mdd.rule x WHERE x.id = rule_id FOR UPDATE;
	SELECT j.id INTO running FROM mdd.job j
	WHERE j.rule = r.id AND (j.state IN ('queued', 'running') OR j.finished_at IS NULL)
	ORDER BY j.id LIMIT 1;
	IF FOUND THEN
		IF manual THEN
			RAISE EXCEPTION 'rule "%" is already running as job %', r.name, running
				USING ERRCODE = '55006', HINT = 'Wait for it (mdd.wait) or cancel it (mdd.cancel).';
		END IF;
		RETURN NULL;
	END IF;

	ids := mdd._rule_objects(r);
	IF r.include_related AND cardinality(ids) > 0 THEN
		ids := mdd._closure(ids, true);
	END IF;
	IF r.action = 'send' THEN
		job := mdd._queue_send(ids, (SELECT x.name FROM mdd.node x WHERE x.id = r.node));
	ELSIF r.action = 'verify' THEN
		job := mdd._queue_verify(ids, (SELECT s FROM mdd.storage s WHERE s.id = r.storage));	-- sql/fixity.sql
	ELSIF r.action = 'archive' THEN
		SELECT * INTO target FROM mdd.storage s WHERE s.id = r.storage;
		IF target.read_only THEN
			RAISE EXCEPTION 'storage "%" is read-only', target.name USING ERRCODE = '25006';
		END IF;
	ELSE
		target := mdd._default_storage();
		IF target.tier <> 'online' THEN
			SELECT * INTO target FROM mdd.storage s WHERE s.name = 'online';
		END IF;
	END IF;
	IF r.action IN ('archive', 'restore') THEN
		job := mdd._queue_move(r.action, ids, target, false, '{}', true);
	END IF;
	UPDATE mdd.job j SET rule = r.id,
		   options = j.options || jsonb_build_object('batch', r.batch_size, 'rule', r.name,
													 'ignore_window', coalesce(ignore_window, false),
													 'scheduled', NOT manual),
		   created_by = CASE WHEN manual THEN j.created_by ELSE pg_catalog.pg_get_userbyid(r.owner) END
	WHERE j.id = job;
	UPDATE mdd.rule x SET last_job = job, last_error = NULL, last_error_at = NULL WHERE x.id = r.id;
	PERFORM mdd._audit('run rule', NULL, NULL,
					   format('rule %s: job %s, %s objects%s', r.name, job, cardinality(ids),
							  CASE WHEN manual THEN '' ELSE ' (scheduled)' END));
	RETURN job;
END;
$$;

CREATE FUNCTION mdd.run_rule(name text, ignore_window boolean DEFAULT false) RETURNS bigint
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
	SELECT mdd._start_rule_run((mdd._rule(name)).id, true, ignore_window)
$$;
COMMENT ON FUNCTION mdd.run_rule(text, boolean) IS
	'Run a rule now: queue a job for the objects it selects; returns the job id';

CREATE FUNCTION mdd.drop_rule(name text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	r mdd.rule := mdd._rule(name, true);
	j bigint;
BEGIN
	-- a run still going is cancelled: what it moved stays moved, what it
	-- was copying is undone by the runner
	FOR j IN SELECT x.id FROM mdd.job x WHERE x.rule = r.id AND x.state IN ('queued', 'running')
	LOOP
		PERFORM mdd.cancel(j);
	END LOOP;
	DELETE FROM mdd.rule x WHERE x.id = r.id;
	PERFORM mdd._audit('drop rule', NULL, NULL, format('rule %s', r.name));
	PERFORM mdd._wake_scheduler();
END;
$$;
COMMENT ON FUNCTION mdd.drop_rule(text) IS
	'Drop a rule; a run of it still going is cancelled';

-- The rule scheduler's tick: start the runs of the rules that are due and
-- inside their window, set when each is next due, and return the seconds
-- until the first of those (NULL: no rule has a schedule).  A rule whose
-- run cannot start (its predicate no longer works, its storage is gone)
-- keeps the reason in last_error and is tried again at its next time.
CREATE FUNCTION mdd._schedule_rules() RETURNS double precision
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	r mdd.rule;
BEGIN
	FOR r IN SELECT * FROM mdd.rule x
			 WHERE x.schedule IS NOT NULL AND (x.next_run_at IS NULL OR x.next_run_at <= now())
			 ORDER BY x.id FOR UPDATE SKIP LOCKED
	LOOP
		-- NULL: a new rule, which waits for its schedule's first time
		IF r.next_run_at IS NOT NULL AND mdd._in_window(r.window_start, r.window_end, now()) THEN
			BEGIN
				PERFORM mdd._start_rule_run(r.id, false, false);
			EXCEPTION WHEN OTHERS THEN
				UPDATE mdd.rule x SET last_error = format('%s (SQLSTATE %s)', SQLERRM, SQLSTATE),
					   last_error_at = now()
				WHERE x.id = r.id;
				RAISE LOG 'mdd rule scheduler: rule %: % (SQLSTATE %)', r.name, SQLERRM, SQLSTATE;
			END;
		END IF;
		UPDATE mdd.rule x SET next_run_at = mdd._cron_next(r.schedule, now()) WHERE x.id = r.id;
	END LOOP;
	RETURN (SELECT greatest(0, extract(epoch FROM min(x.next_run_at) - clock_timestamp()))::double precision
			FROM mdd.rule x WHERE x.schedule IS NOT NULL);
END;
$$;

CREATE VIEW mdd.rules AS
SELECT r.name,
	   pg_catalog.pg_get_userbyid(r.owner)::text COLLATE "default" AS owner,
	   r.action,
	   s.name AS storage,
	   n.name AS node,
	   r.predicate,
	   r.schedule,
	   r.window_start,
	   r.window_end,
	   r.batch_size,
	   r.include_related,
	   r.created_at,
	   lj.id AS last_job,
	   lj.created_at AS last_run,
	   lj.state AS last_state,
	   lj.done AS last_objects,
	   lj.bytes AS last_bytes,
	   r.next_run_at AS next_run,
	   coalesce(t.objects, 0) + r.purged_objects AS objects,
	   coalesce(t.bytes, 0) + r.purged_bytes AS bytes,
	   coalesce(r.last_error, lj.error) AS last_error
FROM mdd.rule r
LEFT JOIN mdd.storage s ON s.id = r.storage
LEFT JOIN mdd.node n ON n.id = r.node
LEFT JOIN mdd.job lj ON lj.id = r.last_job
LEFT JOIN LATERAL (SELECT sum(j.done)::bigint AS objects, sum(j.bytes)::bigint AS bytes
				   FROM mdd.job j WHERE j.rule = r.id) t ON true;
