-- mdd: archive and restore, the copy-verify-release protocol the job
-- runners follow, and the recovery of what a crash leaves half done
--
-- An object is never without a verified copy.  For each batch of a job:
--   1. prepare: the new copy is recorded as 'writing', at the locator it
--      will have, and the transaction commits;
--   2. copy: the bytes are read from a present copy and checked against the
--      object's SHA-256, written to the target, read back and checked; then
--      in the same transaction the new copy becomes 'present' and the old
--      ones are released (large objects are unlinked there and then, other
--      copies become 'releasing');
--   3. release: the 'releasing' blobs are deleted, then their rows.
-- A crash between the steps leaves 'writing' or 'releasing' rows that the
-- job finishes when it resumes, or mdd._recover_copies removes.

-- The objects given and, with include_related, every object that travels
-- with them (mdd.related of each).
CREATE FUNCTION mdd._closure(object_ids bigint[], include_related boolean) RETURNS bigint[]
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	missing bigint;
	result bigint[];
BEGIN
	IF object_ids IS NULL OR cardinality(object_ids) = 0 THEN
		RAISE EXCEPTION 'no object ids given' USING ERRCODE = '22023';
	END IF;
	SELECT x INTO missing FROM unnest(object_ids) x
	WHERE x IS NULL OR NOT EXISTS (SELECT 1 FROM mdd.object o WHERE o.id = x) LIMIT 1;
	IF FOUND THEN
		RAISE EXCEPTION 'object % does not exist', coalesce(missing::text, 'NULL')
			USING ERRCODE = '42704';
	END IF;
	IF coalesce(include_related, true) THEN
		SELECT array_agg(id ORDER BY id) INTO result FROM mdd._related_set(object_ids) id;
	ELSE
		SELECT array_agg(DISTINCT x ORDER BY x) INTO result FROM unnest(object_ids) x;
	END IF;
	RETURN result;
END;
$$;

-- The storage mdd.archive uses when none is named: mdd.archive_storage, or
-- the only archive-tier storage there is.
CREATE FUNCTION mdd._archive_target(name text) RETURNS mdd.storage
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	s mdd.storage;
	wanted text := coalesce(name, nullif(current_setting('mdd.archive_storage', true), ''));
	n int;
BEGIN
	IF wanted IS NULL THEN
		SELECT count(*) INTO n FROM mdd.storage x WHERE x.tier = 'archive';
		IF n <> 1 THEN
			RAISE EXCEPTION 'no storage named, and % archive-tier storages exist', n
				USING ERRCODE = '22023',
					  HINT = 'Name one, or set mdd.archive_storage.';
		END IF;
		SELECT * INTO s FROM mdd.storage x WHERE x.tier = 'archive';
	ELSE
		s := mdd._storage(wanted);
		IF s.tier <> 'archive' THEN
			RAISE EXCEPTION 'storage "%" is not an archive-tier storage', wanted
				USING ERRCODE = '22023';
		END IF;
	END IF;
	IF s.read_only THEN
		RAISE EXCEPTION 'storage "%" is read-only', s.name USING ERRCODE = '25006';
	END IF;
	RETURN s;
END;
$$;

-- Queue a job moving objects to a storage.
-- allow_empty: a rule's run that found nothing is a job too (it ends at once).
CREATE FUNCTION mdd._queue_move(kind text, object_ids bigint[], target mdd.storage,
								include_related boolean, options jsonb,
								allow_empty boolean DEFAULT false) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	ids bigint[] := CASE WHEN allow_empty AND cardinality(object_ids) = 0 THEN '{}'::bigint[]
						 ELSE mdd._closure(object_ids, include_related) END;
	job bigint;
BEGIN
	INSERT INTO mdd.job (kind, storage, options, created_by, client, total)
	VALUES (kind, target.id, coalesce(options, '{}'), mdd._caller(),
			coalesce(host(inet_client_addr()) || ':' || inet_client_port(), 'local'),
			cardinality(ids))
	RETURNING id INTO job;
	INSERT INTO mdd.job_item (job, object) SELECT job, x FROM unnest(ids) x;
	PERFORM mdd._audit(kind || ' requested', NULL,
					   (SELECT min(p.patient_id) FROM mdd.object o JOIN mdd.patient p ON p.id = o.patient
						WHERE o.id = ANY (ids) HAVING count(DISTINCT p.id) = 1),
					   format('job %s: %s objects to storage %s', job, cardinality(ids), target.name));
	PERFORM mdd._wake_runners();
	RETURN job;
END;
$$;

CREATE FUNCTION mdd.archive(object_ids bigint[], storage text DEFAULT NULL,
							include_related boolean DEFAULT true) RETURNS bigint
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
	SELECT mdd._queue_move('archive', object_ids, mdd._archive_target(storage), include_related, '{}')
$$;
COMMENT ON FUNCTION mdd.archive(bigint[], text, boolean) IS
	'Queue a job moving objects (and what travels with them) to an archive-tier storage; returns the job id';

CREATE FUNCTION mdd.restore(object_ids bigint[], include_related boolean DEFAULT true) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	target mdd.storage := mdd._default_storage();
BEGIN
	IF target.tier <> 'online' THEN
		SELECT * INTO target FROM mdd.storage x WHERE x.name = 'online';
	END IF;
	RETURN mdd._queue_move('restore', object_ids, target, include_related, '{}');
END;
$$;
COMMENT ON FUNCTION mdd.restore(bigint[], boolean) IS
	'Queue a job bringing objects (and what travels with them) back to online storage; returns the job id';

-- The tier whose copies a job releases: the one it moves objects away from.
CREATE FUNCTION mdd._source_tier(kind text) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
	SELECT CASE kind WHEN 'archive' THEN 'online' ELSE 'archive' END
$$;

-- true when an error is worth a retry later: the connection to a storage
-- failed, resources ran out, or the server is shutting down
CREATE FUNCTION mdd._transient(sqlstate text) RETURNS boolean
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
	SELECT left(sqlstate, 2) IN ('08', '53', '40') OR sqlstate IN ('57P01', '57P02', '57P03', '55P03')
$$;

-- Step 1: record the next batch's new copies as 'writing'.
CREATE FUNCTION mdd._prepare_items(j mdd.job, target mdd.storage) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	batch int := coalesce((j.options->>'batch')::int, 200);
	batch_bytes bigint := coalesce((j.options->>'batch_bytes')::bigint, 256 * 1024 * 1024);
	src_tier text := mdd._source_tier(j.kind);
	it record;
	taken int := 0;
	sum_bytes bigint := 0;
	batch_no int := j.batches + 1;
BEGIN
	FOR it IN SELECT i.object, o.size, o.sha256
			  FROM mdd.job_item i JOIN mdd.object o ON o.id = i.object
			  WHERE i.job = j.id AND i.state = 'pending'
				-- not while another job is moving the same object, nor while
				-- an ended one still has to undo a copy where this one writes
				AND NOT EXISTS (SELECT 1 FROM mdd.job_item k JOIN mdd.job x ON x.id = k.job
								WHERE k.object = i.object AND k.job <> j.id
								  AND k.state IN ('copying', 'releasing')
								  AND (x.state IN ('queued', 'running')
									   OR k.state = 'copying' AND x.storage = j.storage))
			  ORDER BY i.object
			  FOR UPDATE OF i
	LOOP
		EXIT WHEN taken >= batch OR (taken > 0 AND sum_bytes + it.size > batch_bytes);
		taken := taken + 1;
		sum_bytes := sum_bytes + it.size;
		IF EXISTS (SELECT 1 FROM mdd.copy c WHERE c.object = it.object AND c.storage = target.id
				   AND c.state = 'present') THEN
			-- already there: only what the other tier holds is released
			UPDATE mdd.job_item i SET state = 'copying', batch = batch_no
			WHERE i.job = j.id AND i.object = it.object;
			CONTINUE;
		END IF;
		IF NOT EXISTS (SELECT 1 FROM mdd.copy c WHERE c.object = it.object AND c.state = 'present') THEN
			UPDATE mdd.job_item i SET state = 'failed', error = 'the object has no present copy',
				   batch = batch_no
			WHERE i.job = j.id AND i.object = it.object;
			UPDATE mdd.job x SET failed = x.failed + 1 WHERE x.id = j.id;
			CONTINUE;
		END IF;
		IF target.kind <> 'large_object' THEN
			INSERT INTO mdd.copy (object, storage, locator, state, size, sha256)
			VALUES (it.object, target.id, mdd._locator(target, it.object, it.sha256), 'writing',
					it.size, it.sha256)
			ON CONFLICT (object, storage) DO UPDATE SET state = 'writing';
		END IF;
		UPDATE mdd.job_item i SET state = 'copying', batch = batch_no
		WHERE i.job = j.id AND i.object = it.object;
	END LOOP;
	IF taken > 0 THEN
		UPDATE mdd.job x SET batches = batch_no WHERE x.id = j.id;
	END IF;
	RETURN taken;
END;
$$;

-- The bytes of an object from a present copy not on storage not_on
-- (online tiers first), checked against the object's size, and SHA-256
-- unless check_lo_sha is false and the copy is a large object; a corrupt
-- copy is passed over for the next.  A copy that disappears while it is
-- read (a job moved the object meanwhile) sends the search round again.
-- XX001 when every copy is corrupt.
CREATE FUNCTION mdd._read_verified(obj bigint, not_on integer, check_lo_sha boolean DEFAULT true)
RETURNS bytea
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	o mdd.object;
	c record;
	data bytea;
	bad text[];
	moved boolean;
BEGIN
	SELECT * INTO o FROM mdd.object x WHERE x.id = obj;
	FOR attempt IN 1..5 LOOP
		bad := '{}';
		moved := false;
		FOR c IN SELECT s, cp.locator FROM mdd.copy cp JOIN mdd.storage s ON s.id = cp.storage
				 WHERE cp.object = obj AND cp.state = 'present' AND cp.storage IS DISTINCT FROM not_on
				 ORDER BY s.tier = 'online' DESC, s.id
		LOOP
			BEGIN
				data := mdd._get(c.s, c.locator);
				IF length(data) = o.size
				   AND ((c.s).kind = 'large_object' AND NOT check_lo_sha OR sha256(data) = o.sha256) THEN
					RETURN data;
				END IF;
				bad := bad || format('storage "%s": %s bytes with SHA-256 %s', (c.s).name, length(data),
									 encode(sha256(data), 'hex'));
			EXCEPTION WHEN undefined_object OR undefined_file THEN
				-- gone: moved by a job since the copies were listed, or lost
				IF EXISTS (SELECT 1 FROM mdd.copy cp WHERE cp.object = obj AND cp.storage = (c.s).id
						   AND cp.locator = c.locator AND cp.state = 'present') THEN
					bad := bad || format('storage "%s": %s', (c.s).name, SQLERRM);
				ELSE
					moved := true;
				END IF;
			WHEN data_corrupted THEN
				bad := bad || format('storage "%s": %s', (c.s).name, SQLERRM);
			END;
		END LOOP;
		EXIT WHEN NOT moved;
	END LOOP;
	IF cardinality(bad) = 0 THEN
		RAISE EXCEPTION 'object % has no readable copy', obj USING ERRCODE = '58030';
	END IF;
	RAISE EXCEPTION 'object % is corrupt in every copy: checksum mismatch', obj
		USING ERRCODE = 'XX001',
			  DETAIL = format('Expected %s bytes with SHA-256 %s; %s.', o.size,
							  encode(o.sha256, 'hex'), array_to_string(bad, '; '));
END;
$$;

-- Step 2: write, verify, and switch each 'copying' item of the job.  An
-- object that fails for good is marked failed and the others go on; a
-- transient failure aborts the whole step, to be tried again.
CREATE FUNCTION mdd._copy_items(j mdd.job, target mdd.storage) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	verify boolean := coalesce((j.options->>'verify')::boolean, true);
	src_tier text := mdd._source_tier(j.kind);
	it record;
	data bytea;
	loc text;
	back bytea;
	c record;
	releasing boolean;
	moved bigint[] := '{}';			-- objects now on the target
	released bigint[] := '{}';		-- of those, the ones with copies left to delete
	written bigint := 0;
	failures int := 0;
BEGIN
	FOR it IN SELECT o.id, o.size, o.sha256
			  FROM mdd.job_item i JOIN mdd.object o ON o.id = i.object
			  WHERE i.job = j.id AND i.state = 'copying' ORDER BY i.object
	LOOP
		BEGIN
			IF NOT EXISTS (SELECT 1 FROM mdd.copy x WHERE x.object = it.id
						   AND x.storage = target.id AND x.state = 'present') THEN
				data := mdd._read_verified(it.id, target.id);
				BEGIN
					loc := mdd._put(target, it.id, it.sha256, data);
				EXCEPTION WHEN duplicate_file THEN
					-- left by an attempt cut short (the copy is still 'writing'): write it anew
					PERFORM mdd._delete(target, mdd._locator(target, it.id, it.sha256), true);
					loc := mdd._put(target, it.id, it.sha256, data);
				END;
				IF verify THEN
					-- data was checked against the SHA-256 as it was read: comparing
					-- bytes is as good as hashing again, and cheaper
					back := mdd._get(target, loc);
					IF back IS DISTINCT FROM data THEN
						RAISE EXCEPTION 'object % did not read back as written to storage "%"',
							it.id, target.name
							USING ERRCODE = 'XX001',
								  DETAIL = format('Read %s bytes with SHA-256 %s.', length(back),
												  encode(sha256(back), 'hex'));
					END IF;
					back := NULL;
				END IF;
				data := NULL;
				INSERT INTO mdd.copy (object, storage, locator, state, size, sha256, verified_at)
				VALUES (it.id, target.id, loc, 'present', it.size, it.sha256,
						CASE WHEN verify THEN now() END)
				ON CONFLICT (object, storage) DO UPDATE
					SET locator = excluded.locator, state = 'present', verified_at = excluded.verified_at;
				written := written + it.size;
			END IF;

			-- release the copies on the tier the object leaves
			releasing := false;
			FOR c IN SELECT cp.storage, cp.locator, s.kind
					 FROM mdd.copy cp JOIN mdd.storage s ON s.id = cp.storage
					 WHERE cp.object = it.id AND cp.state = 'present' AND s.tier = src_tier
					   AND cp.storage <> target.id
					 FOR UPDATE OF cp
			LOOP
				IF c.kind = 'large_object' THEN
					PERFORM lo_unlink(c.locator::oid)
					FROM pg_largeobject_metadata m WHERE m.oid = c.locator::oid;
					DELETE FROM mdd.copy cp WHERE cp.object = it.id AND cp.storage = c.storage;
				ELSE
					UPDATE mdd.copy cp SET state = 'releasing'
					WHERE cp.object = it.id AND cp.storage = c.storage;
					releasing := true;
				END IF;
			END LOOP;
			moved := moved || it.id;
			IF releasing THEN
				released := released || it.id;
			END IF;
		EXCEPTION WHEN OTHERS THEN
			IF mdd._transient(SQLSTATE) THEN
				RAISE;
			END IF;
			UPDATE mdd.job_item i SET state = 'failed', error = format('%s (SQLSTATE %s)', SQLERRM, SQLSTATE)
			WHERE i.job = j.id AND i.object = it.id;
			failures := failures + 1;
			PERFORM mdd._undo_copy(it.id, target);
		END;
	END LOOP;

	-- the bookkeeping of the batch, once
	UPDATE mdd.object o SET archived_at = CASE WHEN j.kind = 'archive' THEN now() END,
		   tier = target.tier
	WHERE o.id = ANY (moved);
	UPDATE mdd.job_item i SET state = CASE WHEN i.object = ANY (released) THEN 'releasing' ELSE 'done' END
	WHERE i.job = j.id AND i.object = ANY (moved);
	UPDATE mdd.job x SET done = x.done + cardinality(moved), failed = x.failed + failures,
		   bytes = x.bytes + written
	WHERE x.id = j.id;
	INSERT INTO mdd.audit (role, action, object_id, patient_id, detail, client)
	SELECT j.created_by, j.kind, o.id, p.patient_id, format('job %s: to storage %s', j.id, target.name),
		   j.client
	FROM unnest(moved) m(id) JOIN mdd.object o ON o.id = m.id JOIN mdd.patient p ON p.id = o.patient;
END;
$$;

-- Remove the 'writing' copy of an object on a storage, blob and row.
CREATE FUNCTION mdd._undo_copy(obj bigint, target mdd.storage) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	loc text;
BEGIN
	SELECT c.locator INTO loc FROM mdd.copy c
	WHERE c.object = obj AND c.storage = target.id AND c.state = 'writing' FOR UPDATE;
	IF FOUND THEN
		PERFORM mdd._delete(target, loc, true);
		DELETE FROM mdd.copy c WHERE c.object = obj AND c.storage = target.id;
	END IF;
END;
$$;

-- Step 3: delete the released blobs, then their rows.
CREATE FUNCTION mdd._release_items(j mdd.job) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	it record;
	c record;
BEGIN
	FOR it IN SELECT i.object FROM mdd.job_item i
			  WHERE i.job = j.id AND i.state = 'releasing' ORDER BY i.object
			  LIMIT coalesce((j.options->>'batch')::int, 200)
	LOOP
		FOR c IN SELECT s, cp.locator FROM mdd.copy cp JOIN mdd.storage s ON s.id = cp.storage
				 WHERE cp.object = it.object AND cp.state = 'releasing' FOR UPDATE OF cp
		LOOP
			PERFORM mdd._delete(c.s, c.locator);
			DELETE FROM mdd.copy cp WHERE cp.object = it.object AND cp.storage = (c.s).id;
		END LOOP;
		UPDATE mdd.job_item i SET state = 'done' WHERE i.job = j.id AND i.object = it.object;
	END LOOP;
END;
$$;

-- One step of a job, in the runner's transaction: release, copy or
-- prepare, whichever comes next.  Returns 'more', 'wait' (every pending
-- object is busy in another job) or 'finished'.
CREATE FUNCTION mdd._job_step(job bigint) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	j mdd.job;
	target mdd.storage;
BEGIN
	-- a fair lock first: mdd.cancel waiting for this job gets it before
	-- the next step does (waiters of a row lock are passed over by a new
	-- locker that finds the row free)
	PERFORM pg_advisory_xact_lock(1296319522, _job_step.job::int);
	SELECT * INTO j FROM mdd.job x WHERE x.id = _job_step.job FOR UPDATE;
	IF NOT FOUND THEN
		RETURN 'finished';
	END IF;
	SELECT * INTO target FROM mdd.storage s WHERE s.id = j.storage;
	IF j.state = 'queued' THEN
		UPDATE mdd.job x SET state = 'running', started_at = now() WHERE x.id = j.id;
		j.state := 'running';
	END IF;
	-- the wait it was due after is over: the other runners need not look at it
	UPDATE mdd.job x SET next_attempt_at = NULL WHERE x.id = j.id AND x.next_attempt_at IS NOT NULL;
	IF j.kind = 'send' THEN
		-- sql/send.sql; each step takes a new batch
		IF j.state = 'running' AND mdd._rule_window_closed(j) IS NOT NULL THEN
			RETURN 'wait';
		END IF;
		RETURN mdd._rule_throttle(j, mdd._send_step(j));
	END IF;
	IF j.kind IN ('retrieve', 'move') THEN RETURN mdd._fetch_step(j); END IF;	-- sql/fetch.sql
	IF j.kind = 'commit' THEN RETURN mdd._commit_step(j); END IF;	-- sql/commitment.sql
	IF j.kind = 'verify' THEN	-- sql/fixity.sql
		IF j.state = 'running' AND mdd._rule_window_closed(j) IS NOT NULL THEN
			RETURN 'wait';
		END IF;
		RETURN mdd._rule_throttle(j, mdd._verify_step(j));
	END IF;
	UPDATE mdd.job x SET attempts = 0 WHERE x.id = j.id AND x.attempts > 0 AND x.state = 'running';

	IF EXISTS (SELECT 1 FROM mdd.job_item i WHERE i.job = j.id AND i.state = 'releasing') THEN
		PERFORM mdd._release_items(j);
		RETURN 'more';
	END IF;
	IF j.state IN ('cancelled', 'failed') THEN
		-- undo the copies begun; the objects stay where they were
		PERFORM mdd._undo_copy(i.object, target)
		FROM mdd.job_item i WHERE i.job = j.id AND i.state = 'copying';
		UPDATE mdd.job_item i SET state = 'pending' WHERE i.job = j.id AND i.state = 'copying';
		UPDATE mdd.job x SET finished_at = coalesce(x.finished_at, now()), next_attempt_at = NULL
		WHERE x.id = j.id;
		RETURN 'finished';
	END IF;
	IF EXISTS (SELECT 1 FROM mdd.job_item i WHERE i.job = j.id AND i.state = 'copying') THEN
		PERFORM mdd._copy_items(j, target);
		RETURN mdd._rule_throttle(j, 'more');		-- sql/rules.sql
	END IF;
	IF EXISTS (SELECT 1 FROM mdd.job_item i WHERE i.job = j.id AND i.state = 'pending') THEN
		-- a rule's run takes new batches only inside the rule's window
		IF mdd._rule_window_closed(j) IS NOT NULL THEN
			RETURN 'wait';
		END IF;
		IF mdd._prepare_items(j, target) = 0 THEN
			UPDATE mdd.job x SET next_attempt_at = now() + interval '1 s',
				   error = (SELECT format('waiting for job %s, which is moving or undoing the same objects', k.job)
							FROM mdd.job_item i JOIN mdd.job_item k ON k.object = i.object AND k.job <> i.job
							WHERE i.job = j.id AND i.state = 'pending' AND k.state IN ('copying', 'releasing')
							LIMIT 1)
			WHERE x.id = j.id;
			RETURN 'wait';
		END IF;
		UPDATE mdd.job x SET error = NULL WHERE x.id = j.id AND x.error LIKE 'waiting for %';
		RETURN 'more';
	END IF;

	PERFORM mdd._job_end(j, format('%s objects to storage %s, %s failed', j.done, target.name, j.failed));
	RETURN 'finished';
END;
$$;

-- Remove what no job will finish: 'writing' copies that no running job is
-- copying, and 'releasing' copies no job is releasing.  Run by each job
-- runner when it starts.  Returns the number of copies removed.
CREATE FUNCTION mdd._recover_copies() RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	c record;
	n int := 0;
BEGIN
	FOR c IN SELECT cp.object, cp.locator, cp.state, s
			 FROM mdd.copy cp JOIN mdd.storage s ON s.id = cp.storage
			 WHERE cp.state IN ('writing', 'releasing')
			   AND NOT EXISTS (SELECT 1 FROM mdd.job_item i JOIN mdd.job j ON j.id = i.job
							   WHERE i.object = cp.object
								 AND i.state = CASE cp.state WHEN 'writing' THEN 'copying' ELSE 'releasing' END
								 AND (cp.state = 'releasing' OR j.storage = cp.storage))
			 FOR UPDATE OF cp SKIP LOCKED
	LOOP
		PERFORM mdd._delete(c.s, c.locator, c.state = 'writing');
		DELETE FROM mdd.copy cp WHERE cp.object = c.object AND cp.storage = (c.s).id;
		n := n + 1;
	END LOOP;
	RETURN n;
END;
$$;

