-- mdd: mdd.retrieve and mdd.move, jobs that ask a DICOM node for objects
-- (the durable queue of sql/jobs.sql; mdd._job_step hands them to
-- mdd._fetch_step)
--
-- A retrieve job brings a study, a series or an instance from a node into
-- the archive: by C-MOVE with this archive's AE title as destination (the
-- DICOM listeners receive and store the objects as any C-STORE), or by
-- C-GET on the job's own association, as the node's option "retrieve_by"
-- says.  A move job asks one node to send to another by C-MOVE.
--
-- Both first list what the node holds (C-FIND, down to IMAGE level): one
-- mdd.job_instance row per instance, so that the job knows how many to
-- expect and which.  A retrieve counts the instances already archived as
-- done at once and never asks for them.  Each network step then asks for
-- instances still pending (a whole series at SERIES level, the rest as
-- lists of SOP Instance UIDs at IMAGE level), and the job checks, by SOP
-- Instance UID in the catalog, what has arrived; a move job counts what
-- the node answered as sent.  What did not come is asked for again after
-- a wait, since a node may answer before its last objects are committed
-- here, and fails once it was asked for max_attempts times.
--
-- The network work is done by the job runner outside any transaction
-- (bgworker/fetch_step.c), so that nothing is held open while a node
-- sends: mdd._fetch_plan says what to ask for in one short transaction,
-- mdd._fetch_listed or mdd._fetch_result records the answer in another,
-- and meanwhile mdd._fetch_progress (about once a second) counts what
-- arrived and says whether the job was cancelled, and mdd._fetch_stored
-- archives what a C-GET brings, each in a transaction of its own.

-- for a move job: the node the objects are sent to (mdd.job.node is the
-- node asked); for both: what the job asks for
ALTER TABLE mdd.job ADD COLUMN destination integer REFERENCES mdd.node(id);
ALTER TABLE mdd.job ADD COLUMN request jsonb;
COMMENT ON COLUMN mdd.job.request IS
	'retrieve and move jobs: study, series, instance, by (move|get); listed once the node''s instances are known';

-- One row per instance the node holds of what a retrieve or move job asks
-- for.  state: 'pending' until it is here (retrieve) or the node said it
-- sent it (move); 'done'; or 'failed' after max_attempts requests.
CREATE TABLE mdd.job_instance (
	job					bigint NOT NULL REFERENCES mdd.job(id) ON DELETE CASCADE,
	sop_instance_uid	text NOT NULL,
	series_instance_uid text NOT NULL,
	sop_class_uid		text,		-- when the node said
	state				text NOT NULL DEFAULT 'pending'
						CHECK (state IN ('pending', 'done', 'failed')),
	object				bigint,		-- retrieve: the archived object
	present_before		boolean NOT NULL DEFAULT false,	-- retrieve: archived before the job asked
	asked				integer NOT NULL DEFAULT 0,	-- requests answered that covered it
	request				integer,	-- the request of the current step covering it (1, 2, ...)
	error				text,		-- why it is not here yet, or failed
	PRIMARY KEY (job, sop_instance_uid)
);
CREATE INDEX ON mdd.job_instance (job, state);

-- A UID argument of mdd.retrieve or mdd.move: 1 to 64 digits and dots.
CREATE FUNCTION mdd._check_uid(uid text, what text, required boolean) RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF uid IS NULL THEN
		IF required THEN
			RAISE EXCEPTION '% must not be NULL', what USING ERRCODE = '22004';
		END IF;
		RETURN;
	END IF;
	IF uid !~ '^[0-9]+(\.[0-9]+)*$' OR length(uid) > 64 THEN
		RAISE EXCEPTION 'invalid % "%"', what, uid
			USING ERRCODE = '22023', DETAIL = 'A UID has 1 to 64 digits and dots.';
	END IF;
END;
$$;

-- The node of a retrieve or move request, which mdd must be able to call.
CREATE FUNCTION mdd._fetch_node(name text) RETURNS mdd.node
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	n mdd.node;
BEGIN
	SELECT * INTO n FROM mdd.node x WHERE x.name = _fetch_node.name;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'node "%" does not exist', coalesce(_fetch_node.name, 'NULL')
			USING ERRCODE = '42704', HINT = 'See mdd.nodes.';
	END IF;
	IF n.host IS NULL OR n.port IS NULL THEN
		RAISE EXCEPTION 'node "%" has no host and port to call', n.name USING ERRCODE = '22023';
	END IF;
	RETURN n;
END;
$$;

-- what a request asks for, for messages: "series 1.2.3 of study 1.2"
CREATE FUNCTION mdd._fetch_what(request jsonb) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
	SELECT concat_ws(' of ', 'instance ' || (request->>'instance'), 'series ' || (request->>'series'),
					 'study ' || (request->>'study'))
$$;

-- mdd.retrieve: queue a job bringing a study, series or instance from a
-- node into the archive.
CREATE FUNCTION mdd.retrieve(node text, study_instance_uid text, series_instance_uid text DEFAULT NULL,
							 sop_instance_uid text DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	n mdd.node := mdd._fetch_node(retrieve.node);
	request jsonb;
	job bigint;
BEGIN
	PERFORM mdd._check_uid(study_instance_uid, 'study_instance_uid', true);
	PERFORM mdd._check_uid(series_instance_uid, 'series_instance_uid', false);
	PERFORM mdd._check_uid(sop_instance_uid, 'sop_instance_uid', false);
	IF n.retrieve_by = 'move' THEN
		-- the node sends by C-STORE to this archive's listeners
		IF NOT n.may_store THEN
			RAISE EXCEPTION 'node "%" may not store to this archive, so it cannot deliver a C-MOVE', n.name
				USING ERRCODE = '42501',
					  HINT = 'Give it the node option "store" (the default), or "retrieve_by": "get".';
		END IF;
		IF coalesce(current_setting('mdd.dicom_port', true), '0') = '0' THEN
			RAISE EXCEPTION 'the DICOM listener is off (mdd.dicom_port = 0): node "%" cannot deliver a C-MOVE', n.name
				USING ERRCODE = '55000', HINT = 'Set mdd.dicom_port, or give the node the option "retrieve_by": "get".';
		END IF;
	END IF;
	request := jsonb_strip_nulls(jsonb_build_object('study', study_instance_uid, 'series', series_instance_uid,
													'instance', sop_instance_uid, 'by', n.retrieve_by));
	INSERT INTO mdd.job (kind, node, request, created_by, client)
	VALUES ('retrieve', n.id, request, mdd._caller(),
			coalesce(host(inet_client_addr()) || ':' || inet_client_port(), 'local'))
	RETURNING id INTO job;
	PERFORM mdd._audit('retrieve requested', NULL, NULL,
					   format('job %s: %s from node %s (%s at %s:%s) by C-%s', job, mdd._fetch_what(request),
							  n.name, n.ae_title, n.host, n.port, upper(n.retrieve_by)));
	PERFORM mdd._wake_runners();
	RETURN job;
END;
$$;
COMMENT ON FUNCTION mdd.retrieve(text, text, text, text) IS
	'Queue a job bringing a study, series or instance from a DICOM node into the archive; returns the job id';

-- mdd.move: queue a job asking from_node to send a study, series or
-- instance to to_node by C-MOVE.
CREATE FUNCTION mdd.move(from_node text, to_node text, study_instance_uid text,
						 series_instance_uid text DEFAULT NULL, sop_instance_uid text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	f mdd.node := mdd._fetch_node(move.from_node);
	t mdd.node;
	request jsonb;
	job bigint;
BEGIN
	SELECT * INTO t FROM mdd.node x WHERE x.name = move.to_node;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'node "%" does not exist', coalesce(move.to_node, 'NULL')
			USING ERRCODE = '42704', HINT = 'See mdd.nodes.';
	END IF;
	IF NOT t.may_send THEN
		RAISE EXCEPTION 'node "%" may not receive objects at this archive''s request', t.name
			USING ERRCODE = '42501', HINT = 'Its node option "send" is false.';
	END IF;
	PERFORM mdd._check_uid(study_instance_uid, 'study_instance_uid', true);
	PERFORM mdd._check_uid(series_instance_uid, 'series_instance_uid', false);
	PERFORM mdd._check_uid(sop_instance_uid, 'sop_instance_uid', false);
	request := jsonb_strip_nulls(jsonb_build_object('study', study_instance_uid, 'series', series_instance_uid,
													'instance', sop_instance_uid, 'by', 'move'));
	INSERT INTO mdd.job (kind, node, destination, request, created_by, client)
	VALUES ('move', f.id, t.id, request, mdd._caller(),
			coalesce(host(inet_client_addr()) || ':' || inet_client_port(), 'local'))
	RETURNING id INTO job;
	PERFORM mdd._audit('move requested', NULL, NULL,
					   format('job %s: %s from node %s (%s at %s:%s) to node %s (%s)', job,
							  mdd._fetch_what(request), f.name, f.ae_title, f.host, f.port, t.name,
							  t.ae_title));
	PERFORM mdd._wake_runners();
	RETURN job;
END;
$$;
COMMENT ON FUNCTION mdd.move(text, text, text, text, text) IS
	'Queue a job asking one DICOM node to send a study, series or instance to another (C-MOVE); returns the job id';

-- Retrieve jobs: count the pending instances that are now archived as
-- done (whoever brought them), with an audit row each.  Returns how many.
CREATE FUNCTION mdd._fetch_reconcile(j mdd.job) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	n mdd.node;
	arrived integer;
BEGIN
	IF j.kind <> 'retrieve' THEN
		RETURN 0;
	END IF;
	SELECT * INTO n FROM mdd.node x WHERE x.id = j.node;
	WITH here AS (
		UPDATE mdd.job_instance i SET state = 'done', object = o.id, error = NULL
		FROM mdd.object o
		WHERE i.job = j.id AND i.state = 'pending' AND o.sop_instance_uid = i.sop_instance_uid
		RETURNING o.id, o.patient
	), audited AS (
		INSERT INTO mdd.audit (role, action, object_id, patient_id, detail, client)
		SELECT j.created_by, 'retrieve', h.id, p.patient_id,
			   format('job %s: from node %s (%s at %s:%s)', j.id, n.name, n.ae_title, n.host, n.port),
			   j.client
		FROM here h JOIN mdd.patient p ON p.id = h.patient
	)
	SELECT count(*) INTO arrived FROM here;
	IF arrived > 0 THEN
		UPDATE mdd.job x SET done = x.done + arrived WHERE x.id = j.id;
	END IF;
	RETURN arrived;
END;
$$;

-- One step of a retrieve or move job, called by mdd._job_step with the
-- job's row locked; no network here.  Returns 'network' when the runner is
-- to ask the node for something (mdd._fetch_plan says what), 'finished'
-- when the job ended.
CREATE FUNCTION mdd._fetch_step(j mdd.job) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	n mdd.node;
	d mdd.node;
	first record;
	n_here integer;
	n_fetched integer;
	n_failed integer;
BEGIN
	IF j.state NOT IN ('queued', 'running') THEN
		-- cancelled or failed: nothing is half done between steps
		UPDATE mdd.job x SET finished_at = coalesce(x.finished_at, now()), next_attempt_at = NULL
		WHERE x.id = j.id;
		RETURN 'finished';
	END IF;
	SELECT * INTO n FROM mdd.node x WHERE x.id = j.node;
	SELECT * INTO d FROM mdd.node x WHERE x.id = j.destination;
	IF n.host IS NULL OR n.port IS NULL THEN
		PERFORM mdd._job_fail(j.id, format('node %s has no host and port to call any more', n.name));
		RETURN 'finished';
	END IF;
	IF j.kind = 'move' AND NOT d.may_send THEN
		PERFORM mdd._job_fail(j.id, format('node %s may no longer receive objects (option "send" false)', d.name));
		RETURN 'finished';
	END IF;
	IF NOT j.request ? 'listed' THEN
		RETURN 'network';
	END IF;

	PERFORM mdd._fetch_reconcile(j);
	IF EXISTS (SELECT 1 FROM mdd.job_instance i WHERE i.job = j.id AND i.state = 'pending') THEN
		RETURN 'network';
	END IF;

	-- every instance here, sent or failed: the job ends
	SELECT count(*) FILTER (WHERE i.present_before),
		   count(*) FILTER (WHERE i.state = 'done' AND NOT i.present_before),
		   count(*) FILTER (WHERE i.state = 'failed')
	INTO n_here, n_fetched, n_failed
	FROM mdd.job_instance i WHERE i.job = j.id;
	SELECT i.sop_instance_uid, i.error INTO first FROM mdd.job_instance i
	WHERE i.job = j.id AND i.state = 'failed' ORDER BY i.series_instance_uid, i.sop_instance_uid LIMIT 1;
	UPDATE mdd.job x
	SET state = CASE WHEN n_failed > 0 THEN 'failed' ELSE 'done' END,
		done = x.total - n_failed, failed = n_failed,
		finished_at = now(), next_attempt_at = NULL, attempts = 0,
		error = CASE WHEN n_failed > 0
					 THEN format('%s of %s instances failed; the first, %s: %s', n_failed, x.total,
								 first.sop_instance_uid, first.error) END
	WHERE x.id = j.id;
	IF j.kind = 'retrieve' THEN
		PERFORM mdd._audit_job(j, 'retrieve' || CASE WHEN n_failed > 0 THEN ' failed' ELSE ' done' END, NULL, NULL,
						   format('job %s: %s instances of %s from node %s: %s retrieved, %s already here, %s failed',
								  j.id, j.total, mdd._fetch_what(j.request), n.name, n_fetched, n_here, n_failed));
	ELSE
		PERFORM mdd._audit_job(j, 'move' || CASE WHEN n_failed > 0 THEN ' failed' ELSE ' done' END, NULL, NULL,
						   format('job %s: %s instances of %s from node %s to node %s: %s sent, %s failed',
								  j.id, j.total, mdd._fetch_what(j.request), n.name, d.name, n_fetched, n_failed));
	END IF;
	RETURN 'finished';
END;
$$;

-- What the runner is to ask the node for in the next network step, in a
-- transaction of its own: operation 'list' (C-FIND of what it holds), or
-- 'move' or 'get' with one request per element of levels, studies, series
-- and instances (a '\'-separated list of SOP Instance UIDs at IMAGE
-- level), to destination (the AE title a C-MOVE sends to).  classes: the
-- SOP classes a C-GET is to propose, NULL when the node did not say them
-- all.  operation NULL: nothing to ask (the job ended meanwhile).
--
-- A step asks for at most the job option "batch" instances (default
-- 1000).  A series of which every instance is pending and was never asked
-- for is asked for whole, at SERIES level (a whole study at STUDY level),
-- when it fits; other pending instances, and a series larger than a step,
-- in lists of at most 100 SOP Instance UIDs at IMAGE level.
CREATE FUNCTION mdd._fetch_plan(job bigint, OUT operation text, OUT ae_title text, OUT host text,
								OUT port integer, OUT destination text, OUT levels text[],
								OUT studies text[], OUT series text[], OUT instances text[],
								OUT classes text[], OUT tls boolean, OUT associations integer)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	j mdd.job;
	n mdd.node;
	batch int;
	study text;
	whole_study boolean;
	pending int;
	s record;
	take text[];
	chunk text[];
	planned int := 0;
	k int := 0;
	per int := 100;
BEGIN
	PERFORM pg_advisory_xact_lock(1296319522, _fetch_plan.job::int);
	SELECT * INTO j FROM mdd.job x WHERE x.id = _fetch_plan.job FOR UPDATE;
	IF NOT FOUND OR j.state <> 'running' OR j.kind NOT IN ('retrieve', 'move') THEN
		RETURN;
	END IF;
	SELECT * INTO n FROM mdd.node x WHERE x.id = j.node;
	ae_title := n.ae_title;
	host := n.host;
	port := n.port;
	tls := coalesce((n.options->>'tls')::boolean, false);
	associations := 1;
	study := j.request->>'study';
	IF NOT j.request ? 'listed' THEN
		operation := 'list';
		levels := ARRAY[NULL::text];
		studies := ARRAY[study];
		series := ARRAY[j.request->>'series'];
		instances := ARRAY[j.request->>'instance'];
		RETURN;
	END IF;

	batch := greatest(coalesce((j.options->>'batch')::int, 1000), 1);
	IF j.kind = 'move' THEN
		operation := 'move';
		destination := (SELECT x.ae_title FROM mdd.node x WHERE x.id = j.destination);
	ELSE
		operation := j.request->>'by';
		IF operation = 'move' THEN
			destination := coalesce(current_setting('mdd.ae_title', true), 'MDD');
		END IF;
	END IF;
	IF operation = 'move' THEN
		associations := coalesce((n.options->>'move_associations')::int, 1);
	END IF;
	UPDATE mdd.job_instance i SET request = NULL WHERE i.job = j.id AND i.request IS NOT NULL;
	levels := '{}';
	studies := '{}';
	series := '{}';
	instances := '{}';

	-- the whole study when nothing of it was asked for or is here yet
	SELECT bool_and(i.state = 'pending' AND i.asked = 0 AND NOT i.present_before),
		   count(*) FILTER (WHERE i.state = 'pending')
	INTO whole_study, pending
	FROM mdd.job_instance i WHERE i.job = j.id;
	-- with several associations, the instances in as many lists (IMAGE
	-- level, at most 100 UIDs each), which the associations take in turn
	IF associations > 1 THEN
		per := least(100, greatest(1, ceil(least(pending, batch)::numeric / associations)::int));
	END IF;
	IF associations = 1 AND whole_study AND pending <= batch
	   AND NOT j.request ? 'series' AND NOT j.request ? 'instance' THEN
		UPDATE mdd.job_instance i SET request = 1, error = NULL WHERE i.job = j.id;
		levels := ARRAY['STUDY'];
		studies := ARRAY[study];
		series := ARRAY[NULL::text];
		instances := ARRAY[NULL::text];
	ELSE
		FOR s IN SELECT i.series_instance_uid AS uid,
						bool_and(i.state = 'pending' AND i.asked = 0 AND NOT i.present_before) AS whole,
						array_agg(i.sop_instance_uid ORDER BY i.sop_instance_uid)
							FILTER (WHERE i.state = 'pending') AS pending
				 FROM mdd.job_instance i WHERE i.job = j.id
				 GROUP BY i.series_instance_uid
				 HAVING bool_or(i.state = 'pending')
				 ORDER BY i.series_instance_uid
		LOOP
			EXIT WHEN planned >= batch;
			IF s.whole AND associations = 1 AND NOT j.request ? 'instance' THEN
				IF planned + cardinality(s.pending) <= batch THEN
					k := k + 1;
					UPDATE mdd.job_instance i SET request = k, error = NULL
					WHERE i.job = j.id AND i.series_instance_uid = s.uid AND i.state = 'pending';
					levels := levels || 'SERIES'::text;
					studies := studies || study;
					series := series || s.uid;
					instances := instances || NULL::text;
					planned := planned + cardinality(s.pending);
					CONTINUE;
				END IF;
				-- whole in the next step, unless it is larger than a step
				EXIT WHEN planned > 0;
			END IF;
			take := s.pending[1 : batch - planned];
			FOR c IN 0 .. (cardinality(take) - 1) / per LOOP
				chunk := take[c * per + 1 : c * per + per];
				k := k + 1;
				UPDATE mdd.job_instance i SET request = k, error = NULL
				WHERE i.job = j.id AND i.sop_instance_uid = ANY (chunk);
				levels := levels || 'IMAGE'::text;
				studies := studies || study;
				series := series || s.uid;
				instances := instances || array_to_string(chunk, '\');
			END LOOP;
			planned := planned + cardinality(take);
		END LOOP;
	END IF;
	IF operation = 'get' THEN
		SELECT CASE WHEN bool_and(i.sop_class_uid IS NOT NULL)
					THEN array_agg(DISTINCT i.sop_class_uid) END
		INTO classes
		FROM mdd.job_instance i WHERE i.job = j.id AND i.request IS NOT NULL;
	END IF;
END;
$$;

-- The C-FIND of what the node holds came back: one row per instance, the
-- job's total, and for a retrieve the instances already archived counted
-- as done.  Returns 'more', or 'finished' when the node holds nothing of
-- what was asked for.
CREATE FUNCTION mdd._fetch_listed(job bigint, series text[], instances text[], classes text[])
RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	j mdd.job;
	n mdd.node;
	n_total integer;
	here integer := 0;
BEGIN
	PERFORM pg_advisory_xact_lock(1296319522, _fetch_listed.job::int);
	SELECT * INTO j FROM mdd.job x WHERE x.id = _fetch_listed.job FOR UPDATE;
	IF NOT FOUND OR j.state <> 'running' THEN
		RETURN 'more';
	END IF;
	SELECT * INTO n FROM mdd.node x WHERE x.id = j.node;
	INSERT INTO mdd.job_instance (job, sop_instance_uid, series_instance_uid, sop_class_uid)
	SELECT j.id, f.sop, f.series, nullif(f.class, '')
	FROM unnest(instances, series, classes) AS f(sop, series, class)
	ON CONFLICT DO NOTHING;
	GET DIAGNOSTICS n_total = ROW_COUNT;
	IF n_total = 0 THEN
		PERFORM mdd._job_fail(j.id, format('node %s (%s at %s:%s) holds no instance of %s',
										   n.name, n.ae_title, n.host, n.port, mdd._fetch_what(j.request)));
		RETURN 'finished';
	END IF;
	IF j.kind = 'retrieve' THEN
		UPDATE mdd.job_instance i SET state = 'done', present_before = true, object = o.id
		FROM mdd.object o
		WHERE i.job = j.id AND o.sop_instance_uid = i.sop_instance_uid;
		GET DIAGNOSTICS here = ROW_COUNT;
	END IF;
	UPDATE mdd.job x SET total = n_total, done = here, failed = 0, attempts = 0, error = NULL,
		   request = x.request || jsonb_build_object('listed', now())
	WHERE x.id = j.id;
	RETURN 'more';
END;
$$;

-- The C-FIND of what the node holds failed: status is the failure status
-- it answered, NULL when the association failed.  The node being
-- unreachable or out of resources is retried with the job's back-off;
-- a refusal fails the job.  Returns 'wait' or 'finished'.
CREATE FUNCTION mdd._fetch_list_failed(job bigint, status integer, message text) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	j mdd.job;
	n mdd.node;
BEGIN
	SELECT * INTO j FROM mdd.job x WHERE x.id = _fetch_list_failed.job FOR UPDATE;
	IF NOT FOUND OR j.state <> 'running' THEN
		RETURN 'finished';
	END IF;
	SELECT * INTO n FROM mdd.node x WHERE x.id = j.node;
	message := format('node %s (%s at %s:%s): %s', n.name, n.ae_title, n.host, n.port, message);
	IF status IS NULL THEN
		PERFORM mdd._job_retry(j.id, '08001', message);
		RETURN 'wait';
	ELSIF status >= 42752 AND status < 43008 THEN	-- 0xA7xx: out of resources
		PERFORM mdd._job_retry(j.id, '53000', message);
		RETURN 'wait';
	END IF;
	PERFORM mdd._job_fail(j.id, 'cannot list what it holds: ' || message);
	RETURN 'finished';
END;
$$;

-- a DIMSE status as text: 0xB000
CREATE FUNCTION mdd._dimse_status(status integer) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
	SELECT '0x' || upper(lpad(to_hex(status), 4, '0'))
$$;

-- The answers of a C-MOVE or C-GET step, one element per request of the
-- plan (mdd._fetch_plan): whether a final response came, its status,
-- counts, Error Comment and Failed SOP Instance UID List.  reached: the
-- association was set up; broken: why it failed (NULL when it did not).
-- Returns 'more' (go on), 'wait' (ask again after next_attempt_at) or
-- 'finished'.
CREATE FUNCTION mdd._fetch_result(job bigint, reached boolean, broken text, answered boolean[],
								  status integer[], completed integer[], failed integer[],
								  warning integer[], comments text[], failed_uids text[])
RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	j mdd.job;
	n mdd.node;
	d mdd.node;
	max_attempts int;
	arrived int;
	sent int := 0;
	n_rows int;
	covered int;
	reply text;
	failed_list text[];
	waiting int;
	most_asked int;
	first_error text;
	delay interval;
	op text;
BEGIN
	PERFORM pg_advisory_xact_lock(1296319522, _fetch_result.job::int);
	SELECT * INTO j FROM mdd.job x WHERE x.id = _fetch_result.job FOR UPDATE;
	IF NOT FOUND THEN
		RETURN 'finished';
	END IF;
	SELECT * INTO n FROM mdd.node x WHERE x.id = j.node;
	SELECT * INTO d FROM mdd.node x WHERE x.id = j.destination;
	max_attempts := coalesce((j.options->>'max_attempts')::int, 5);
	op := CASE WHEN j.kind = 'retrieve' AND j.request->>'by' = 'get' THEN 'C-GET' ELSE 'C-MOVE' END;
	arrived := mdd._fetch_reconcile(j);
	IF j.state NOT IN ('queued', 'running') THEN
		-- cancelled meanwhile: what arrived is counted, the rest is not asked for
		UPDATE mdd.job x SET finished_at = coalesce(x.finished_at, now()), next_attempt_at = NULL
		WHERE x.id = j.id;
		RETURN 'finished';
	END IF;
	IF NOT reached THEN
		PERFORM mdd._job_retry(j.id, '08001', format('node %s: %s', n.name, broken));
		RETURN 'wait';
	END IF;

	FOR k IN 1 .. coalesce(cardinality(answered), 0) LOOP
		CONTINUE WHEN NOT answered[k];
		reply := format('node %s answered %s status %s (%s completed, %s failed, %s warning)%s', n.name, op,
						mdd._dimse_status(status[k]), coalesce(completed[k]::text, 'no count of'),
						coalesce(failed[k]::text, 'no count'), coalesce(warning[k]::text, 'no count'),
						': ' || nullif(comments[k], ''));
		IF status[k] = 43009 THEN	-- 0xA801: move destination unknown
			PERFORM mdd._job_fail(j.id, format('%s: it does not know the move destination %s; register it there with its host and port%s',
											   reply, CASE WHEN j.kind = 'move' THEN d.ae_title
														   ELSE coalesce(current_setting('mdd.ae_title', true), 'MDD') END,
											   CASE WHEN j.kind = 'retrieve' THEN ', or give the node the option "retrieve_by": "get"' ELSE '' END));
			RETURN 'finished';
		END IF;
		failed_list := string_to_array(nullif(failed_uids[k], ''), '\');
		SELECT count(*) INTO covered FROM mdd.job_instance i WHERE i.job = j.id AND i.request = k;
		IF j.kind = 'move' THEN
			-- what the node says it sent is done; which failed it may say
			IF failed_list IS NOT NULL THEN
				UPDATE mdd.job_instance i SET state = 'done', error = NULL
				WHERE i.job = j.id AND i.request = k AND i.state = 'pending'
				  AND NOT i.sop_instance_uid = ANY (failed_list);
				GET DIAGNOSTICS n_rows = ROW_COUNT;
				sent := sent + n_rows;
			ELSIF status[k] IN (0, 45056) AND coalesce(completed[k], covered) + coalesce(warning[k], 0) >= covered
				  AND coalesce(failed[k], 0) = 0 THEN
				UPDATE mdd.job_instance i SET state = 'done', error = NULL
				WHERE i.job = j.id AND i.request = k AND i.state = 'pending';
				GET DIAGNOSTICS n_rows = ROW_COUNT;
				sent := sent + n_rows;
			END IF;
			UPDATE mdd.job_instance i
			SET asked = i.asked + 1,
				error = CASE WHEN i.sop_instance_uid = ANY (failed_list)
							 THEN format('%s, naming it among the failed', reply)
							 ELSE format('%s for %s instances asked, without naming the failed', reply, covered) END
			WHERE i.job = j.id AND i.request = k AND i.state = 'pending';
			INSERT INTO mdd.audit (role, action, detail, client)
			VALUES (j.created_by, 'move',
					format('job %s: %s instances from node %s to node %s (%s): %s', j.id, covered, n.name,
						   d.name, d.ae_title, reply), j.client);
		ELSE
			-- what has not arrived: the node could not send it, or it is late
			UPDATE mdd.job_instance i
			SET asked = i.asked + 1,
				error = CASE WHEN i.error IS NOT NULL THEN i.error	-- could not be archived
							 WHEN i.sop_instance_uid = ANY (failed_list)
							 THEN format('%s, naming it among the failed', reply)
							 WHEN status[k] IN (0, 45056)
							 THEN format('%s, but it has not arrived', reply)
							 ELSE reply END
			WHERE i.job = j.id AND i.request = k AND i.state = 'pending';
		END IF;
	END LOOP;

	-- asked for too often: failed
	UPDATE mdd.job_instance i SET state = 'failed'
	WHERE i.job = j.id AND i.state = 'pending' AND i.asked >= max_attempts;
	UPDATE mdd.job x
	SET done = (SELECT count(*) FROM mdd.job_instance i WHERE i.job = j.id AND i.state = 'done'),
		failed = (SELECT count(*) FROM mdd.job_instance i WHERE i.job = j.id AND i.state = 'failed')
	WHERE x.id = j.id;
	IF arrived > 0 OR sent > 0 THEN
		-- progress: the association failures in a row start again from zero
		UPDATE mdd.job x SET attempts = 0 WHERE x.id = j.id;
	END IF;

	IF broken IS NOT NULL THEN
		PERFORM mdd._job_retry(j.id, '08006',
							   format('the association with node %s (%s at %s:%s) failed: %s',
									  n.name, n.ae_title, n.host, n.port, broken));
		RETURN 'wait';
	END IF;

	-- asked for and not here: ask again after a while, longer each time
	SELECT count(*), max(i.asked), min(i.error) INTO waiting, most_asked, first_error
	FROM mdd.job_instance i WHERE i.job = j.id AND i.state = 'pending' AND i.request IS NOT NULL;
	IF waiting > 0 THEN
		delay := least(interval '1 s' * coalesce((j.options->>'retry_delay')::float8, 1) * 2 ^ (most_asked - 1),
					   interval '5 min');
		UPDATE mdd.job x SET next_attempt_at = now() + delay,
			   error = format('%s instances not here yet, asking again in %s: %s', waiting, delay, first_error)
		WHERE x.id = j.id;
		RETURN 'wait';
	END IF;
	UPDATE mdd.job x SET error = NULL WHERE x.id = j.id AND x.error IS NOT NULL;
	RETURN 'more';
END;
$$;

-- About once a second while a C-MOVE or C-GET runs, in a transaction of
-- its own: count what arrived (retrieve), or show what the node reported
-- sent so far (move: completed and failed are the counts of the step's
-- responses so far).  Returns -1 when the job is no longer running (it
-- was cancelled: the runner stops), else how many instances were newly
-- counted.
CREATE FUNCTION mdd._fetch_progress(job bigint, completed integer, failed integer) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	j mdd.job;
	before integer;
BEGIN
	SELECT * INTO j FROM mdd.job x WHERE x.id = _fetch_progress.job;
	IF NOT FOUND OR j.state NOT IN ('queued', 'running') THEN
		RETURN -1;
	END IF;
	IF j.kind = 'retrieve' THEN
		RETURN mdd._fetch_reconcile(j);
	END IF;
	SELECT count(*) INTO before FROM mdd.job_instance i WHERE i.job = j.id AND i.state = 'done';
	UPDATE mdd.job x SET done = least(before + coalesce(completed, 0), x.total)
	WHERE x.id = j.id AND x.done IS DISTINCT FROM least(before + coalesce(completed, 0), x.total);
	RETURN CASE WHEN FOUND THEN 1 ELSE 0 END;
END;
$$;

-- An object a C-GET of a retrieve job brought: archived as a received
-- C-STORE from the node, and counted.  Returns its id.
CREATE FUNCTION mdd._fetch_stored(job bigint, data bytea, calling_ae text, peer text,
								  sop_instance_uid text) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	j mdd.job;
	obj bigint := mdd._store_received(data, calling_ae, peer, sop_instance_uid);
BEGIN
	SELECT * INTO j FROM mdd.job x WHERE x.id = _fetch_stored.job;
	IF FOUND AND j.state IN ('queued', 'running') THEN
		PERFORM mdd._fetch_reconcile(j);
	END IF;
	RETURN obj;
END;
$$;

-- Why an object a C-GET brought could not be archived, kept with its
-- instance (the transaction of the store was rolled back).
CREATE FUNCTION mdd._fetch_store_failed(job bigint, sop_instance_uid text, message text) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
	UPDATE mdd.job_instance i SET error = 'could not be archived: ' || message
	WHERE i.job = _fetch_store_failed.job AND i.sop_instance_uid = _fetch_store_failed.sop_instance_uid
	  AND i.state = 'pending'
$$;
