-- mdd: fixity checks.  Each copy on a storage is read back and compared
-- with the size and SHA-256 the catalog recorded when the object came in.
-- mdd.verify does it in the caller's session; mdd.verify_storage and
-- verify rules queue a job that the runners work through in bounded
-- batches, with progress in mdd.jobs, retries when the storage server is
-- down, cancel, and (for rules) windows and the bandwidth cap.

-- Check one copy: read it, compare, and record verified_at when it is
-- good.  problem says what is wrong (missing, unreadable, different);
-- gone is true when the copy was released or moved while it was read
-- (no problem then).  A transient failure (class 08, 53, locks) is raised.
CREATE FUNCTION mdd._check_copy(s mdd.storage, object bigint, locator text, size bigint, sha256 bytea,
								OUT problem text, OUT gone boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	data bytea;
BEGIN
	gone := false;
	BEGIN
		data := mdd._get(s, locator);
		IF length(data) <> size OR pg_catalog.sha256(data) <> sha256 THEN
			problem := format('checksum mismatch: %s bytes with SHA-256 %s, expected %s bytes with SHA-256 %s',
							  length(data), encode(pg_catalog.sha256(data), 'hex'), size, encode(sha256, 'hex'));
		END IF;
	EXCEPTION WHEN OTHERS THEN
		IF mdd._transient(SQLSTATE) THEN
			RAISE;
		END IF;
		problem := format('%s (SQLSTATE %s)', SQLERRM, SQLSTATE);
	END;
	IF problem IS NULL THEN
		UPDATE mdd.copy cp SET verified_at = now()
		WHERE cp.object = _check_copy.object AND cp.storage = s.id AND cp.locator = _check_copy.locator;
	ELSIF NOT EXISTS (SELECT 1 FROM mdd.copy cp
					  WHERE cp.object = _check_copy.object AND cp.storage = s.id
						AND cp.locator = _check_copy.locator AND cp.state = 'present') THEN
		problem := NULL;	-- a job released it while it was being read
		gone := true;
	END IF;
END;
$$;

-- mdd.verify(storage): the fixity check in the caller's session.  Reads
-- every present copy on the storage; returns the objects whose copy is
-- missing, unreadable or different, and records when the others were last
-- found good.
CREATE FUNCTION mdd.verify(storage text)
RETURNS TABLE(object_id bigint, sop_instance_uid text, problem text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	s mdd.storage := mdd._storage(storage);
	c record;
	checked int := 0;
	bad int := 0;
BEGIN
	FOR c IN SELECT cp.object, cp.locator, o.size, o.sha256, o.sop_instance_uid
			 FROM mdd.copy cp JOIN mdd.object o ON o.id = cp.object
			 WHERE cp.storage = s.id AND cp.state = 'present' ORDER BY cp.object
	LOOP
		checked := checked + 1;
		problem := (mdd._check_copy(s, c.object, c.locator, c.size, c.sha256)).problem;
		IF problem IS NOT NULL THEN
			bad := bad + 1;
			object_id := c.object;
			sop_instance_uid := c.sop_instance_uid;
			RETURN NEXT;
		END IF;
	END LOOP;
	PERFORM mdd._audit('verify', NULL, NULL,
					   format('storage %s: %s copies checked, %s bad', s.name, checked, bad));
END;
$$;
COMMENT ON FUNCTION mdd.verify(text) IS
	'Fixity check of a storage: the objects whose copy there is missing, unreadable or corrupt';

-- Queue a job checking the copies these objects have on a storage (those
-- without one there are left out).
CREATE FUNCTION mdd._queue_verify(ids bigint[], s mdd.storage) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	job bigint;
	n integer;
BEGIN
	INSERT INTO mdd.job (kind, storage, created_by, client)
	VALUES ('verify', s.id, mdd._caller(), coalesce(host(inet_client_addr()) || ':' || inet_client_port(), 'local'))
	RETURNING id INTO job;
	INSERT INTO mdd.job_item (job, object)
	SELECT job, cp.object FROM mdd.copy cp
	WHERE cp.storage = s.id AND cp.state = 'present' AND cp.object = ANY (ids);
	GET DIAGNOSTICS n = ROW_COUNT;
	UPDATE mdd.job x SET total = n WHERE x.id = job;
	PERFORM mdd._audit('verify requested', NULL, NULL, format('job %s: %s copies on storage %s', job, n, s.name));
	PERFORM mdd._wake_runners();
	RETURN job;
END;
$$;

-- mdd.verify_storage: queue a fixity check of every copy on a storage, or
-- of those not verified within not_verified_since; returns the job.
CREATE FUNCTION mdd.verify_storage(storage text, not_verified_since interval DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	s mdd.storage := mdd._storage(storage);
BEGIN
	IF not_verified_since < interval '0' THEN
		RAISE EXCEPTION 'invalid age %', not_verified_since
			USING ERRCODE = '22023', HINT = 'Give how long ago a copy''s last check may be, e.g. ''1 year''.';
	END IF;
	RETURN mdd._queue_verify(ARRAY(SELECT cp.object FROM mdd.copy cp
								   WHERE cp.storage = s.id AND cp.state = 'present'
									 AND (not_verified_since IS NULL
										  OR coalesce(cp.verified_at, cp.created_at) < now() - not_verified_since)),
							 s);
END;
$$;
COMMENT ON FUNCTION mdd.verify_storage(text, interval) IS
	'Queue a fixity check of the copies on a storage as a job; returns the job id';

-- One step of a verify job: the next batch of its copies (job options
-- batch, default 200, and batch_bytes, default 256 MB), each checked; a
-- bad copy fails its item alone and is audited ('verify failed').
CREATE FUNCTION mdd._verify_step(j mdd.job) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	batch int := coalesce((j.options->>'batch')::int, 200);
	batch_bytes bigint := coalesce((j.options->>'batch_bytes')::bigint, 256 * 1024 * 1024);
	s mdd.storage;
	it record;
	loc text;
	chk record;
	taken int := 0;
	read_bytes bigint := 0;
	good int := 0;
	bad int := 0;
BEGIN
	IF j.state NOT IN ('queued', 'running') THEN
		-- cancelled or failed: a check leaves nothing half done
		UPDATE mdd.job x SET finished_at = coalesce(x.finished_at, now()), next_attempt_at = NULL
		WHERE x.id = j.id;
		RETURN 'finished';
	END IF;
	SELECT * INTO s FROM mdd.storage x WHERE x.id = j.storage;
	FOR it IN SELECT i.object, o.size, o.sha256, o.sop_instance_uid, p.patient_id
			  FROM mdd.job_item i JOIN mdd.object o ON o.id = i.object
			  LEFT JOIN mdd.patient p ON p.id = o.patient
			  WHERE i.job = j.id AND i.state = 'pending' ORDER BY i.object
	LOOP
		EXIT WHEN taken >= batch OR (taken > 0 AND read_bytes + it.size > batch_bytes);
		taken := taken + 1;
		SELECT cp.locator INTO loc FROM mdd.copy cp
		WHERE cp.object = it.object AND cp.storage = s.id AND cp.state = 'present';
		IF FOUND THEN
			SELECT * INTO chk FROM mdd._check_copy(s, it.object, loc, it.size, it.sha256);
			read_bytes := read_bytes + it.size;
		ELSE
			-- moved off the storage since the job was queued
			SELECT NULL::text AS problem, true AS gone INTO chk;
		END IF;
		IF chk.problem IS NULL THEN
			UPDATE mdd.job_item i SET state = 'done', batch = j.batches + 1,
				   error = CASE WHEN chk.gone THEN 'the copy left the storage before it was checked' END
			WHERE i.job = j.id AND i.object = it.object;
			good := good + 1;
		ELSE
			UPDATE mdd.job_item i SET state = 'failed', batch = j.batches + 1, error = chk.problem
			WHERE i.job = j.id AND i.object = it.object;
			PERFORM mdd._audit_job(j, 'verify failed', it.object, it.patient_id,
							   format('job %s: copy on storage %s of %s: %s', j.id, s.name,
									  it.sop_instance_uid, chk.problem));
			bad := bad + 1;
		END IF;
	END LOOP;
	IF taken = 0 THEN
		PERFORM mdd._job_end(j, format('storage %s: %s copies checked, %s bad', s.name, j.done + j.failed, j.failed));
		RETURN 'finished';
	END IF;
	UPDATE mdd.job x SET done = x.done + good, failed = x.failed + bad, bytes = x.bytes + read_bytes,
		   batches = x.batches + 1, attempts = 0, error = NULL
	WHERE x.id = j.id;
	RETURN 'more';
END;
$$;
