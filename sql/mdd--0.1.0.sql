-- mdd: the catalog (patients, studies, series, objects and their references)
\echo Use "CREATE EXTENSION mdd" to load this file. \quit

-- One row per patient.  patient_id is the DICOM Patient ID ('' when a
-- DICOM object had none; such objects still belong to a patient row).
CREATE TABLE mdd.patient (
	id				bigserial PRIMARY KEY,
	patient_id		text NOT NULL UNIQUE,
	patient_name	text,
	birth_date		date,
	sex				text,
	created_at		timestamptz NOT NULL DEFAULT now()
);

-- One row per study.  The modality list and the counts are kept up to date
-- as objects arrive, so that queries need not compute them: series_count
-- when a series is created, object_count at the commit of the transaction
-- that stored objects (extension/tally.c).
CREATE TABLE mdd.study (
	id					bigserial PRIMARY KEY,
	patient				bigint NOT NULL REFERENCES mdd.patient(id),
	study_instance_uid	text NOT NULL UNIQUE,
	study_date			date,
	study_time			time,
	study_description	text,
	study_id			text,
	accession_number	text,
	referring_physician text,
	modalities			text[] NOT NULL DEFAULT '{}',
	series_count		integer NOT NULL DEFAULT 0,
	object_count		integer NOT NULL DEFAULT 0
);
CREATE INDEX ON mdd.study (patient);
CREATE INDEX ON mdd.study (study_date);
CREATE INDEX ON mdd.study (accession_number);

CREATE TABLE mdd.series (
	id						bigserial PRIMARY KEY,
	study					bigint NOT NULL REFERENCES mdd.study(id),
	series_instance_uid		text NOT NULL UNIQUE,
	modality				text,
	series_number			text,
	series_description		text,
	series_date				date,
	body_part_examined		text,
	frame_of_reference_uid	text,
	object_count			integer NOT NULL DEFAULT 0
);
CREATE INDEX ON mdd.series (study);

-- One row per archived thing: a DICOM instance or a document.
CREATE TABLE mdd.object (
	id						bigserial PRIMARY KEY,
	kind					text NOT NULL CHECK (kind IN ('dicom', 'document')),
	patient					bigint NOT NULL REFERENCES mdd.patient(id),
	study					bigint REFERENCES mdd.study(id),
	series					bigint REFERENCES mdd.series(id),
	sop_instance_uid		text UNIQUE,
	sop_class_uid			text,
	instance_number			text,
	image_type				text,
	manufacturer			text,
	manufacturer_model_name text,
	station_name			text,
	frame_of_reference_uid	text,
	transfer_syntax_uid		text,
	number_of_frames		integer,
	content_date			date,
	content_type			text,
	filename				text,
	description				text,
	size					bigint NOT NULL,
	sha256					bytea NOT NULL,
	header					jsonb,
	source					text,
	ingested_at				timestamptz NOT NULL DEFAULT now(),
	archived_at				timestamptz,
	-- 'online' while a present copy is on an online-tier storage; kept by
	-- the steps that change that (mdd._keep, mdd._copy_items), in the same
	-- transaction, so that queries over tiers need not look at the copies
	tier					text NOT NULL DEFAULT 'online' CHECK (tier IN ('online', 'archive')),
	CHECK ((kind = 'dicom') = (sop_instance_uid IS NOT NULL)),
	CHECK (kind = 'document' OR series IS NOT NULL)
);
CREATE INDEX ON mdd.object (patient);
CREATE INDEX ON mdd.object (series);
CREATE INDEX ON mdd.object (study);
CREATE INDEX ON mdd.object (sha256);
CREATE INDEX ON mdd.object (frame_of_reference_uid);

-- References an object makes to other objects, series or frames of
-- reference, by UID: they resolve against the catalog when read, so a
-- reference to something not (yet) archived waits for it to arrive.
CREATE TABLE mdd.reference (
	object			bigint NOT NULL REFERENCES mdd.object(id) ON DELETE CASCADE,
	kind			text NOT NULL CHECK (kind IN ('instance', 'series', 'frame_of_reference')),
	uid				text NOT NULL,
	sop_class_uid	text,
	via				text,
	PRIMARY KEY (object, kind, uid)
);
CREATE INDEX ON mdd.reference (uid, kind);

-- C functions.  Names with a leading underscore are internal: callable only
-- by mdd's own SECURITY DEFINER functions (see sql/roles.sql).
CREATE FUNCTION mdd.parse(data bytea) RETURNS jsonb
	AS 'MODULE_PATHNAME', 'mdd_parse_sql' LANGUAGE C STABLE PARALLEL SAFE;
COMMENT ON FUNCTION mdd.parse(bytea) IS
	'Describe a DICOM object without storing it: catalog attributes, references and header as JSON';
CREATE FUNCTION mdd._caller() RETURNS name
	AS 'MODULE_PATHNAME', 'mdd_caller_sql' LANGUAGE C STABLE;
CREATE FUNCTION mdd._check_path(path text, for_write boolean) RETURNS text
	AS 'MODULE_PATHNAME', 'mdd_check_path_sql' LANGUAGE C VOLATILE;
CREATE FUNCTION mdd._check_directory(path text, writable boolean) RETURNS text
	AS 'MODULE_PATHNAME', 'mdd_check_directory_sql' LANGUAGE C VOLATILE;
CREATE FUNCTION mdd._read_file(path text) RETURNS bytea
	AS 'MODULE_PATHNAME', 'mdd_read_file_sql' LANGUAGE C VOLATILE;
CREATE FUNCTION mdd._write_file(path text, data bytea, overwrite boolean) RETURNS bigint
	AS 'MODULE_PATHNAME', 'mdd_write_file_sql' LANGUAGE C VOLATILE;
CREATE FUNCTION mdd._list_files(directory text) RETURNS SETOF text
	AS 'MODULE_PATHNAME', 'mdd_list_files_sql' LANGUAGE C VOLATILE;
CREATE FUNCTION mdd._file_put(root text, locator text, data bytea) RETURNS bigint
	AS 'MODULE_PATHNAME', 'mdd_file_put_sql' LANGUAGE C VOLATILE;
CREATE FUNCTION mdd._file_get(root text, locator text) RETURNS bytea
	AS 'MODULE_PATHNAME', 'mdd_file_get_sql' LANGUAGE C VOLATILE;
CREATE FUNCTION mdd._tally(series bigint, study bigint) RETURNS void
	AS 'MODULE_PATHNAME', 'mdd_tally_sql' LANGUAGE C VOLATILE;
-- mdd: storages and the copies of each object's bytes they hold

-- A named place for blobs: kind 'large_object' (in this database),
-- 'file' (a directory), 'http' (a WebDAV server) or 's3' (a bucket).
-- options hold where and how (root, url, endpoint, bucket, compression,
-- capacity ...) and the credentials of remote kinds: the table is private,
-- and the view mdd.storages leaves the credentials out.  read_only: no
-- blob is written to or removed from the storage.
CREATE TABLE mdd.storage (
	id			serial PRIMARY KEY,
	name		text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9_.-]{1,63}$'),
	kind		text NOT NULL CHECK (kind IN ('large_object', 'file', 'http', 's3')),
	tier		text NOT NULL CHECK (tier IN ('online', 'archive')),
	options		jsonb NOT NULL DEFAULT '{}',
	read_only	boolean NOT NULL DEFAULT false,
	created_at	timestamptz NOT NULL DEFAULT now()
);

-- Where the bytes of an object are.  state: 'writing' while a copy is
-- being made, 'present' once written (and verified), 'releasing' while an
-- old copy is being removed.
CREATE TABLE mdd.copy (
	object		bigint NOT NULL REFERENCES mdd.object(id),
	storage		integer NOT NULL REFERENCES mdd.storage(id),
	locator		text NOT NULL,
	state		text NOT NULL CHECK (state IN ('writing', 'present', 'releasing')),
	size		bigint NOT NULL,
	sha256		bytea NOT NULL,
	created_at	timestamptz NOT NULL DEFAULT now(),
	verified_at timestamptz,
	PRIMARY KEY (object, storage)
);
CREATE INDEX ON mdd.copy (storage, state);

INSERT INTO mdd.storage (name, kind, tier) VALUES ('online', 'large_object', 'online');

SELECT pg_catalog.pg_extension_config_dump('mdd.storage', 'WHERE name <> ''online''');

-- C behind the storage kinds (extension/storage_file.c, storage_remote.c,
-- compress.c).  Internal: see sql/roles.sql.
CREATE FUNCTION mdd._file_delete(root text, locator text) RETURNS boolean
	AS 'MODULE_PATHNAME', 'mdd_file_delete_sql' LANGUAGE C VOLATILE;
CREATE FUNCTION mdd._remote_put(s mdd.storage, locator text, data bytea,
								content_md5 bytea DEFAULT NULL) RETURNS bigint
	AS 'MODULE_PATHNAME', 'mdd_remote_put_sql' LANGUAGE C VOLATILE;
CREATE FUNCTION mdd._remote_get(s mdd.storage, locator text) RETURNS bytea
	AS 'MODULE_PATHNAME', 'mdd_remote_get_sql' LANGUAGE C VOLATILE;
CREATE FUNCTION mdd._remote_head(s mdd.storage, locator text) RETURNS bigint
	AS 'MODULE_PATHNAME', 'mdd_remote_head_sql' LANGUAGE C VOLATILE;
CREATE FUNCTION mdd._remote_delete(s mdd.storage, locator text) RETURNS boolean
	AS 'MODULE_PATHNAME', 'mdd_remote_delete_sql' LANGUAGE C VOLATILE;
CREATE FUNCTION mdd._zstd_compress(data bytea, level integer) RETURNS bytea
	AS 'MODULE_PATHNAME', 'mdd_zstd_compress_sql' LANGUAGE C IMMUTABLE PARALLEL SAFE;
CREATE FUNCTION mdd._zstd_decompress(data bytea, max_size bigint, storage text, locator text)
RETURNS bytea
	AS 'MODULE_PATHNAME', 'mdd_zstd_decompress_sql' LANGUAGE C IMMUTABLE PARALLEL SAFE;

-- The value of one storage option after checking its JSON type (and range),
-- NULL when it is not set.  Errors name the option, never its value.
CREATE FUNCTION mdd._storage_option(storage text, options jsonb, key text, type text,
									lo numeric DEFAULT NULL, hi numeric DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v jsonb := options->key;
	n numeric;
BEGIN
	IF v IS NULL OR jsonb_typeof(v) = 'null' THEN
		RETURN NULL;
	END IF;
	CASE type
	WHEN 'integer', 'number' THEN
		IF jsonb_typeof(v) = 'number' THEN
			n := (v #>> '{}')::numeric;
		END IF;
		IF n IS NULL OR (type = 'integer' AND n <> trunc(n)) OR n < lo OR n > hi THEN
			RAISE EXCEPTION 'option "%" of storage "%" must be % from % to %',
				key, storage, CASE type WHEN 'integer' THEN 'an integer' ELSE 'a number' END, lo, hi
				USING ERRCODE = '22023';
		END IF;
	WHEN 'boolean' THEN
		IF jsonb_typeof(v) <> 'boolean' THEN
			RAISE EXCEPTION 'option "%" of storage "%" must be true or false', key, storage
				USING ERRCODE = '22023';
		END IF;
	ELSE
		IF jsonb_typeof(v) <> 'string' OR v #>> '{}' = '' THEN
			RAISE EXCEPTION 'option "%" of storage "%" must be a non-empty string', key, storage
				USING ERRCODE = '22023';
		END IF;
	END CASE;
	RETURN v;
END;
$$;

-- Check the options of a storage of a kind and complete them with their
-- defaults.  Raises 22023 naming the first bad option.  Credentials
-- (password, access_key_id, secret_access_key) and URLs, which could hold
-- some, never appear in a message.
CREATE FUNCTION mdd._check_storage_options(name text, kind text, options jsonb) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	allowed text[] := ARRAY['compression', 'level', 'capacity', 'read_only'];
	key text;
	compression text;
	url text;
	host text;
	path_style boolean;
	prefix text;
BEGIN
	options := coalesce(options, '{}');
	IF jsonb_typeof(options) <> 'object' THEN
		RAISE EXCEPTION 'storage options must be a JSON object' USING ERRCODE = '22023';
	END IF;
	-- an option set to null is an option not set
	SELECT coalesce(jsonb_object_agg(e.key, e.value), '{}') INTO options
	FROM jsonb_each(options) e WHERE jsonb_typeof(e.value) <> 'null';

	allowed := allowed || CASE kind
		WHEN 'file' THEN ARRAY['root', 'fanout']
		WHEN 'http' THEN ARRAY['url', 'username', 'password', 'timeout', 'fanout']
		WHEN 's3' THEN ARRAY['endpoint', 'bucket', 'region', 'access_key_id', 'secret_access_key',
							 'path_style', 'prefix', 'timeout', 'fanout']
		ELSE ARRAY[]::text[] END;
	FOR key IN SELECT k FROM jsonb_object_keys(options) k ORDER BY k LOOP
		IF NOT key = ANY (allowed) THEN
			RAISE EXCEPTION 'unknown option "%" for storage "%" of kind %', left(key, 64), name, kind
				USING ERRCODE = '22023',
					  HINT = format('Storages of kind %s take: %s.', kind, array_to_string(allowed, ', '));
		END IF;
	END LOOP;

	-- common options
	compression := coalesce(mdd._storage_option(name, options, 'compression', 'string') #>> '{}', 'none');
	IF compression NOT IN ('none', 'zstd') THEN
		RAISE EXCEPTION 'option "compression" of storage "%" must be "none" or "zstd"', name
			USING ERRCODE = '22023';
	END IF;
	IF compression = 'none' THEN
		IF options ? 'level' THEN
			RAISE EXCEPTION 'option "level" of storage "%" needs "compression": "zstd"', name
				USING ERRCODE = '22023';
		END IF;
		options := options - 'compression';
	ELSIF kind = 'large_object' THEN
		RAISE EXCEPTION 'option "compression" of storage "%": large-object storages are not compressed', name
			USING ERRCODE = '22023',
				  HINT = 'Compress a file, http or s3 storage.';
	ELSE
		options := options || jsonb_build_object(
			'level', coalesce(mdd._storage_option(name, options, 'level', 'integer', 1, 19), '3'));
	END IF;
	PERFORM mdd._storage_option(name, options, 'capacity', 'integer', 1, 9223372036854775807);
	PERFORM mdd._storage_option(name, options, 'read_only', 'boolean');
	IF kind IN ('file', 'http', 's3') THEN
		options := options || jsonb_build_object(
			'fanout', coalesce(mdd._storage_option(name, options, 'fanout', 'integer', 0, 4), '2'));
	END IF;
	IF kind IN ('http', 's3') THEN
		options := options || jsonb_build_object(
			'timeout', coalesce(mdd._storage_option(name, options, 'timeout', 'number', 0.1, 3600), '30'));
	END IF;

	CASE kind
	WHEN 'large_object' THEN
		NULL;
	WHEN 'file' THEN
		IF NOT options ? 'root' THEN
			RAISE EXCEPTION 'file storage "%" needs option "root"', name
				USING ERRCODE = '22023', HINT = 'For example {"root": "/srv/mdd/archive"}.';
		END IF;
		options := options || jsonb_build_object('root',
			mdd._check_directory(mdd._storage_option(name, options, 'root', 'string') #>> '{}', true));
	WHEN 'http' THEN
		IF NOT options ? 'url' THEN
			RAISE EXCEPTION 'http storage "%" needs option "url"', name
				USING ERRCODE = '22023', HINT = 'For example {"url": "https://dav.example.org/mdd/"}.';
		END IF;
		url := mdd._storage_option(name, options, 'url', 'string') #>> '{}';
		IF url !~ '^https?://' THEN
			RAISE EXCEPTION 'option "url" of storage "%" must be an http:// or https:// URL', name
				USING ERRCODE = '22023';
		END IF;
		host := substring(url from '^https?://([^/?#]*)');
		IF strpos(host, '@') > 0 THEN
			RAISE EXCEPTION 'option "url" of storage "%" must not contain credentials', name
				USING ERRCODE = '22023',
					  HINT = 'Give them as options "username" and "password", which mdd.storages does not show.';
		END IF;
		IF host !~ '^([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?$' THEN
			RAISE EXCEPTION 'option "url" of storage "%" has no valid host', name USING ERRCODE = '22023';
		END IF;
		IF url !~ '^https?://[^/?#]*(/[A-Za-z0-9._~%/-]*)?$' THEN
			RAISE EXCEPTION 'option "url" of storage "%" may only have a plain path after the host', name
				USING ERRCODE = '22023',
					  DETAIL = 'Letters, digits and "._~%/-" are allowed; no query or fragment.';
		END IF;
		IF right(url, 1) <> '/' THEN
			url := url || '/';
		END IF;
		options := options || jsonb_build_object('url', url);
		IF strpos(coalesce(mdd._storage_option(name, options, 'username', 'string') #>> '{}', ''), ':') > 0 THEN
			RAISE EXCEPTION 'option "username" of storage "%" must not contain ":"', name
				USING ERRCODE = '22023';
		END IF;
		IF options ? 'password' THEN
			IF jsonb_typeof(options->'password') <> 'string' THEN
				RAISE EXCEPTION 'option "password" of storage "%" must be a string', name
					USING ERRCODE = '22023';
			END IF;
			IF NOT options ? 'username' THEN
				RAISE EXCEPTION 'option "password" of storage "%" needs option "username"', name
					USING ERRCODE = '22023';
			END IF;
		END IF;
	WHEN 's3' THEN
		FOREACH key IN ARRAY ARRAY['endpoint', 'bucket', 'access_key_id', 'secret_access_key'] LOOP
			IF NOT options ? key THEN
				RAISE EXCEPTION 's3 storage "%" needs option "%"', name, key
					USING ERRCODE = '22023',
						  HINT = 'For example {"endpoint": "https://s3.eu-west-1.amazonaws.com", "bucket": "mdd-archive", '
								 '"region": "eu-west-1", "access_key_id": "...", "secret_access_key": "..."}.';
			END IF;
			PERFORM mdd._storage_option(name, options, key, 'string');
		END LOOP;
		url := options->>'endpoint';
		IF strpos(coalesce(substring(url from '^https?://([^/?#]*)'), ''), '@') > 0 THEN
			RAISE EXCEPTION 'option "endpoint" of storage "%" must not contain credentials', name
				USING ERRCODE = '22023',
					  HINT = 'Give them as options "access_key_id" and "secret_access_key".';
		END IF;
		IF url !~ '^https?://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?/?$' THEN
			RAISE EXCEPTION 'option "endpoint" of storage "%" must be an http:// or https:// URL with a host and no path', name
				USING ERRCODE = '22023', HINT = 'For example "https://s3.eu-west-1.amazonaws.com".';
		END IF;
		url := rtrim(url, '/');
		host := substring(url from '^https?://([^:/]+|\[[^]]*\])');
		options := options || jsonb_build_object('endpoint', url);
		IF options->>'bucket' !~ '^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$' THEN
			RAISE EXCEPTION 'option "bucket" of storage "%" is not a valid bucket name', name
				USING ERRCODE = '22023',
					  DETAIL = '3 to 63 lower-case letters, digits, "." and "-", starting and ending with a letter or digit.';
		END IF;
		IF coalesce(mdd._storage_option(name, options, 'region', 'string') #>> '{}', 'us-east-1')
		   !~ '^[a-z0-9-]{1,32}$' THEN
			RAISE EXCEPTION 'option "region" of storage "%" is not a region name', name
				USING ERRCODE = '22023', HINT = 'For example "us-east-1".';
		END IF;
		options := options || jsonb_build_object('region', coalesce(options->>'region', 'us-east-1'));
		IF options->>'access_key_id' !~ '^[!-~]+$' THEN
			RAISE EXCEPTION 'option "access_key_id" of storage "%" must be printable characters without spaces', name
				USING ERRCODE = '22023';
		END IF;
		IF options->>'secret_access_key' !~ '^[!-~]+$' THEN
			RAISE EXCEPTION 'option "secret_access_key" of storage "%" must be printable characters without spaces', name
				USING ERRCODE = '22023';
		END IF;
		path_style := coalesce((mdd._storage_option(name, options, 'path_style', 'boolean'))::boolean, true);
		IF NOT path_style AND (host ~ '^[0-9.]+$' OR host ~ '^\[') THEN
			RAISE EXCEPTION 'option "path_style" of storage "%" is false, but its endpoint has no host name', name
				USING ERRCODE = '22023',
					  DETAIL = 'Virtual-host style puts the bucket in the host name: bucket.host.';
		END IF;
		options := options || jsonb_build_object('path_style', path_style);
		prefix := mdd._storage_option(name, options, 'prefix', 'string') #>> '{}';
		IF prefix IS NOT NULL THEN
			prefix := trim(both '/' from prefix);
			IF prefix !~ '^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$' OR prefix ~ '(^|/)\.\.?(/|$)' THEN
				RAISE EXCEPTION 'option "prefix" of storage "%" must be names of letters, digits, "._-" separated by "/"', name
					USING ERRCODE = '22023';
			END IF;
			options := options || jsonb_build_object('prefix', prefix);
		END IF;
	END CASE;
	RETURN options;
END;
$$;

-- mdd.add_storage: declare a storage (options in docs/sql.md, "Storage").
CREATE FUNCTION mdd.add_storage(name text, kind text, tier text, options jsonb DEFAULT '{}')
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	ro boolean;
BEGIN
	IF name IS NULL OR kind IS NULL OR tier IS NULL THEN
		RAISE EXCEPTION 'storage name, kind and tier must not be NULL'
			USING ERRCODE = '22004';
	END IF;
	IF name !~ '^[A-Za-z0-9_.-]{1,63}$' THEN
		RAISE EXCEPTION 'invalid storage name "%"', name
			USING ERRCODE = '22023',
				  DETAIL = 'Use 1 to 63 letters, digits, "_", "." or "-".';
	END IF;
	IF tier NOT IN ('online', 'archive') THEN
		RAISE EXCEPTION 'invalid storage tier "%"', tier
			USING ERRCODE = '22023', HINT = 'Use ''online'' or ''archive''.';
	END IF;
	IF kind NOT IN ('large_object', 'file', 'http', 's3') THEN
		RAISE EXCEPTION 'unknown storage kind "%"', kind
			USING ERRCODE = '22023',
				  HINT = 'Use ''large_object'', ''file'', ''http'' or ''s3''.';
	END IF;
	options := mdd._check_storage_options(name, kind, options);
	ro := coalesce((options->>'read_only')::boolean, false);
	INSERT INTO mdd.storage (name, kind, tier, options, read_only)
	VALUES (add_storage.name, add_storage.kind, add_storage.tier, options - 'read_only', ro);
EXCEPTION WHEN unique_violation THEN
	RAISE EXCEPTION 'storage "%" already exists', add_storage.name USING ERRCODE = '42710';
END;
$$;

-- A storage by name; 42704 when there is none.
CREATE FUNCTION mdd._storage(name text) RETURNS mdd.storage
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	s mdd.storage;
BEGIN
	SELECT * INTO s FROM mdd.storage x WHERE x.name = _storage.name;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'storage "%" does not exist', coalesce(_storage.name, 'NULL')
			USING ERRCODE = '42704', HINT = 'See mdd.storages.';
	END IF;
	RETURN s;
END;
$$;

-- mdd.alter_storage: change options of a storage.  The options given
-- replace those of the same name (null removes one); "read_only" sets the
-- flag.  What says where its blobs are cannot change while it holds copies.
CREATE FUNCTION mdd.alter_storage(name text, options jsonb) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	s mdd.storage;
	merged jsonb;
	key text;
	ro boolean;
BEGIN
	IF name IS NULL OR options IS NULL THEN
		RAISE EXCEPTION 'storage name and options must not be NULL' USING ERRCODE = '22004';
	END IF;
	IF jsonb_typeof(options) <> 'object' THEN
		RAISE EXCEPTION 'storage options must be a JSON object' USING ERRCODE = '22023';
	END IF;
	SELECT * INTO s FROM mdd.storage x WHERE x.name = alter_storage.name FOR UPDATE;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'storage "%" does not exist', alter_storage.name
			USING ERRCODE = '42704', HINT = 'See mdd.storages.';
	END IF;
	merged := mdd._check_storage_options(s.name, s.kind, s.options || options);
	FOREACH key IN ARRAY ARRAY['root', 'fanout', 'url', 'endpoint', 'bucket', 'prefix'] LOOP
		IF (s.options->key) IS DISTINCT FROM (merged->key)
		   AND EXISTS (SELECT 1 FROM mdd.copy c WHERE c.storage = s.id) THEN
			RAISE EXCEPTION 'option "%" of storage "%" cannot change while it holds copies', key, s.name
				USING ERRCODE = '55000',
					  DETAIL = 'The locations of its blobs depend on it.';
		END IF;
	END LOOP;
	ro := (merged->>'read_only')::boolean;
	UPDATE mdd.storage x SET options = merged - 'read_only', read_only = coalesce(ro, x.read_only)
	WHERE x.id = s.id;
END;
$$;

-- mdd.drop_storage: forget a storage that holds no copy and that no job,
-- rule or setting names.  Its blobs, if any were left behind mdd's back,
-- are not touched.
CREATE FUNCTION mdd.drop_storage(name text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	s mdd.storage := mdd._storage(name);
	users text;
	copies bigint;
BEGIN
	IF s.name = 'online' THEN
		RAISE EXCEPTION 'storage "online" cannot be dropped'
			USING ERRCODE = '55000', DETAIL = 'It is where new objects go when nothing else is said.';
	END IF;
	SELECT string_agg(g, ', ') INTO users
	FROM unnest(ARRAY['mdd.default_storage', 'mdd.archive_storage']) g
	WHERE current_setting(g, true) = s.name;
	IF users IS NOT NULL THEN
		RAISE EXCEPTION 'storage "%" is named by setting %', s.name, users
			USING ERRCODE = '55000', HINT = 'Change the setting first.';
	END IF;
	SELECT count(*) INTO copies FROM mdd.copy c WHERE c.storage = s.id;
	IF copies > 0 THEN
		RAISE EXCEPTION 'storage "%" holds % copies', s.name, copies
			USING ERRCODE = '2BP01', HINT = 'Move its objects elsewhere first (mdd.archive, mdd.restore).';
	END IF;
	SELECT string_agg(u, ', ') INTO users
	FROM (SELECT format('rule "%s"', r.name) AS u FROM mdd.rule r WHERE r.storage = s.id
		  UNION ALL
		  SELECT format('job %s (%s)', j.id, j.state) FROM mdd.job j WHERE j.storage = s.id) x;
	IF users IS NOT NULL THEN
		RAISE EXCEPTION 'storage "%" is used by %', s.name, users
			USING ERRCODE = '2BP01',
				  HINT = 'Drop those rules; remove ended jobs with mdd.purge_jobs.';
	END IF;
	DELETE FROM mdd.storage x WHERE x.id = s.id;
	PERFORM mdd._audit('drop storage', NULL, NULL, format('%s (%s, %s)', s.name, s.kind, s.tier));
END;
$$;

-- the storage that receives new objects (setting mdd.default_storage)
CREATE FUNCTION mdd._default_storage() RETURNS mdd.storage
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	wanted text := coalesce(nullif(current_setting('mdd.default_storage', true), ''), 'online');
	s mdd.storage;
BEGIN
	SELECT * INTO s FROM mdd.storage WHERE name = wanted;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'storage "%" named by mdd.default_storage does not exist', wanted
			USING ERRCODE = '42704', HINT = 'See mdd.storages for the storages there are.';
	END IF;
	IF s.read_only THEN
		RAISE EXCEPTION 'storage "%" is read-only', wanted USING ERRCODE = '25006';
	END IF;
	RETURN s;
END;
$$;

-- The locator the blob of object obj (SHA-256 digest) has on storage s,
-- known before it is written: digest fan-out directories, then
-- "<object id>-<first 16 hex digits of the digest>", then ".zst" when the
-- storage compresses.  NULL for large objects (the OID is not known in
-- advance).  mdd._put writes exactly there.
CREATE FUNCTION mdd._locator(s mdd.storage, obj bigint, digest bytea) RETURNS text
LANGUAGE plpgsql IMMUTABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	hex text := encode(digest, 'hex');
	loc text := '';
BEGIN
	IF s.kind = 'large_object' THEN
		RETURN NULL;
	END IF;
	IF obj IS NULL OR length(hex) < 16 THEN
		RAISE EXCEPTION 'a locator needs an object id and a digest' USING ERRCODE = '22004';
	END IF;
	FOR i IN 1..coalesce((s.options->>'fanout')::int, 2) LOOP
		loc := loc || substr(hex, 2 * i - 1, 2) || '/';
	END LOOP;
	loc := loc || obj || '-' || substr(hex, 1, 16);
	IF s.options->>'compression' = 'zstd' THEN
		loc := loc || '.zst';
	END IF;
	RETURN loc;
END;
$$;

-- Refuse a write of size bytes for object obj that would take storage s
-- past its capacity (53100).  Every copy on s counts ('writing' and
-- 'releasing' ones too), except obj's own.  Writers of a storage with a
-- capacity take turns until they commit, so that two of them cannot both
-- take the last room.
CREATE FUNCTION mdd._reserve(s mdd.storage, obj bigint, size bigint) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	capacity bigint := (s.options->>'capacity')::bigint;
	used bigint;
BEGIN
	IF capacity IS NULL THEN
		RETURN;
	END IF;
	PERFORM pg_advisory_xact_lock(hashtext('mdd.storage capacity'), s.id);
	SELECT coalesce(sum(c.size), 0) INTO used FROM mdd.copy c
	WHERE c.storage = s.id AND c.object IS DISTINCT FROM obj;
	IF used + size > capacity THEN
		RAISE EXCEPTION 'storage "%" is full', s.name
			USING ERRCODE = '53100',
				  DETAIL = format('It holds %s bytes of its capacity of %s bytes; the object needs %s more.',
								  used, capacity, size),
				  HINT = 'Raise its capacity with mdd.alter_storage, or use another storage.';
	END IF;
END;
$$;

-- Write the bytes of object obj (SHA-256 digest) to storage s; returns
-- the locator (mdd._locator's, or the large object's OID).  Compresses
-- when the storage says so; refuses a read-only or full storage.
CREATE FUNCTION mdd._put(s mdd.storage, obj bigint, digest bytea, data bytea) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	loc text := mdd._locator(s, obj, digest);
	body bytea := data;
BEGIN
	IF s.read_only THEN
		RAISE EXCEPTION 'storage "%" is read-only', s.name USING ERRCODE = '25006';
	END IF;
	PERFORM mdd._reserve(s, obj, length(data));
	IF loc LIKE '%.zst' THEN
		body := mdd._zstd_compress(data, coalesce((s.options->>'level')::int, 3));
	END IF;
	CASE s.kind
	WHEN 'large_object' THEN
		RETURN lo_from_bytea(0, body)::text;
	WHEN 'file' THEN
		PERFORM mdd._file_put(s.options->>'root', loc, body);
	WHEN 'http', 's3' THEN
		PERFORM mdd._remote_put(s, loc, body);
	ELSE
		RAISE EXCEPTION 'storage kind "%" cannot be written', s.kind USING ERRCODE = '0A000';
	END CASE;
	RETURN loc;
END;
$$;

-- Large-object chunks (rows of pg_largeobject, 2 KB each) are compressed
-- like any column, by default_toast_compression.  With pglz, the default,
-- every chunk of noisy pixel data costs a compression attempt that fails;
-- lz4 compresses the same chunks in a fraction of that time, and a little,
-- and decompressing them costs far less than that saves.  Every writer of
-- mdd's large objects (mdd.store and its kin in users' sessions, the DICOM
-- listeners, the job runners) goes through mdd._put, so lz4 is set there,
-- for that call only.  A server built without lz4 keeps its default.
DO $$
BEGIN
	IF EXISTS (SELECT 1 FROM pg_catalog.pg_settings
			   WHERE name = 'default_toast_compression' AND 'lz4' = ANY (enumvals)) THEN
		ALTER FUNCTION mdd._put(mdd.storage, bigint, bytea, bytea) SET default_toast_compression = lz4;
	END IF;
END;
$$;

-- The original bytes of a blob: as stored, or decompressed when its
-- locator ends in ".zst" (bounded by the catalog size of its object).
CREATE FUNCTION mdd._get(s mdd.storage, locator text) RETURNS bytea
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	data bytea;
	expected bigint;
BEGIN
	IF locator IS NULL THEN
		RAISE EXCEPTION 'locator must not be NULL' USING ERRCODE = '22004';
	END IF;
	CASE s.kind
	WHEN 'large_object' THEN
		RETURN lo_get(locator::oid);
	WHEN 'file' THEN
		data := mdd._file_get(s.options->>'root', locator);
	WHEN 'http', 's3' THEN
		data := mdd._remote_get(s, locator);
	ELSE
		RAISE EXCEPTION 'storage kind "%" cannot be read', s.kind USING ERRCODE = '0A000';
	END CASE;
	IF locator LIKE '%.zst' THEN
		SELECT o.size INTO expected FROM mdd.object o
		WHERE o.id = substring(locator from '(\d+)-[0-9a-f]{16}\.zst$')::bigint;
		data := mdd._zstd_decompress(data, expected, s.name, locator);
	END IF;
	RETURN data;
END;
$$;

-- Remove a blob: true if it was there, false if there was nothing to
-- remove (so that undoing a half-done copy can be repeated).  At once, not
-- at commit, except for large objects, whose unlink is transactional.  A
-- read-only storage is left as it is (25006).
CREATE FUNCTION mdd._delete(s mdd.storage, locator text, unfinished boolean DEFAULT false)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	lo oid;
BEGIN
	IF locator IS NULL THEN
		RETURN false;
	END IF;
	-- a read-only storage keeps its blobs, but not what mdd began to write
	-- there and did not finish (unfinished: a copy still 'writing')
	IF s.read_only AND NOT unfinished THEN
		RAISE EXCEPTION 'storage "%" is read-only', s.name USING ERRCODE = '25006',
			DETAIL = format('Blob %s stays.', locator);
	END IF;
	CASE s.kind
	WHEN 'large_object' THEN
		IF locator !~ '^\d{1,10}$' THEN
			RAISE EXCEPTION 'invalid large object locator "%"', locator USING ERRCODE = '22023';
		END IF;
		lo := locator::oid;
		IF NOT EXISTS (SELECT 1 FROM pg_largeobject_metadata m WHERE m.oid = lo) THEN
			RETURN false;
		END IF;
		PERFORM lo_unlink(lo);
		RETURN true;
	WHEN 'file' THEN
		RETURN mdd._file_delete(s.options->>'root', locator);
	WHEN 'http', 's3' THEN
		RETURN mdd._remote_delete(s, locator);
	ELSE
		RAISE EXCEPTION 'storage kind "%" cannot be written', s.kind USING ERRCODE = '0A000';
	END CASE;
END;
$$;
-- mdd: the audit trail of who stored, read, exported what

CREATE TABLE mdd.audit (
	id			bigserial PRIMARY KEY,
	at			timestamptz NOT NULL DEFAULT clock_timestamp(),
	role		name NOT NULL,
	action		text NOT NULL,
	object_id	bigint,
	patient_id	text,
	detail		text,
	client		text
);
CREATE INDEX ON mdd.audit (at);
CREATE INDEX ON mdd.audit (object_id);

CREATE FUNCTION mdd._audit(action text, object_id bigint, patient_id text, detail text,
						   client text DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	INSERT INTO mdd.audit (role, action, object_id, patient_id, detail, client)
	VALUES (mdd._caller(), action, object_id, patient_id, detail,
			coalesce(client, host(inet_client_addr()) || ':' || inet_client_port(), 'local'));
END;
$$;

CREATE VIEW mdd.audit_log AS
	SELECT at, role, action, object_id, patient_id, detail, client
	FROM mdd.audit;
-- mdd: ingest of DICOM objects and documents

-- Find or create the patient row for a Patient ID.
CREATE FUNCTION mdd._patient(pid text, pname text, pbirth date, psex text) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	found_id bigint;
BEGIN
	SELECT p.id INTO found_id FROM mdd.patient p WHERE p.patient_id = pid;
	IF FOUND THEN
		-- a patient first seen through a document learns its name from DICOM
		UPDATE mdd.patient p
		SET patient_name = coalesce(p.patient_name, pname),
			birth_date = coalesce(p.birth_date, pbirth),
			sex = coalesce(p.sex, psex)
		WHERE p.id = found_id
		  AND ((p.patient_name IS NULL AND pname IS NOT NULL)
			   OR (p.birth_date IS NULL AND pbirth IS NOT NULL)
			   OR (p.sex IS NULL AND psex IS NOT NULL));
		RETURN found_id;
	END IF;
	INSERT INTO mdd.patient (patient_id, patient_name, birth_date, sex)
	VALUES (pid, pname, pbirth, psex)
	ON CONFLICT (patient_id) DO NOTHING
	RETURNING patient.id INTO found_id;
	IF found_id IS NULL THEN		-- created meanwhile by another session
		SELECT p.id INTO found_id FROM mdd.patient p WHERE p.patient_id = pid;
	END IF;
	RETURN found_id;
END;
$$;

-- Find or create the study row of an object; the study must belong to
-- the same patient.
CREATE FUNCTION mdd._study(patient bigint, info jsonb) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	uid text := info->>'study_instance_uid';
	st mdd.study;
BEGIN
	IF uid IS NULL THEN
		RAISE EXCEPTION 'DICOM object lacks a required identifier'
			USING ERRCODE = '22004', DETAIL = 'It has no Study Instance UID (0020,000D).';
	END IF;
	SELECT * INTO st FROM mdd.study s WHERE s.study_instance_uid = uid;
	IF NOT FOUND THEN
		INSERT INTO mdd.study (patient, study_instance_uid, study_date, study_time,
							   study_description, study_id, accession_number,
							   referring_physician)
		VALUES (patient, uid, (info->>'study_date')::date, (info->>'study_time')::time,
				info->>'study_description', info->>'study_id', info->>'accession_number',
				info->>'referring_physician')
		ON CONFLICT (study_instance_uid) DO NOTHING
		RETURNING * INTO st;
		IF st.id IS NULL THEN
			SELECT * INTO st FROM mdd.study s WHERE s.study_instance_uid = uid;
		END IF;
	END IF;
	IF st.patient <> patient THEN
		RAISE EXCEPTION 'study % belongs to another patient', uid
			USING ERRCODE = '23000',
				  DETAIL = format('The archive holds it for Patient ID "%s"; this object says "%s".',
								  (SELECT p.patient_id FROM mdd.patient p WHERE p.id = st.patient),
								  (SELECT p.patient_id FROM mdd.patient p WHERE p.id = patient));
	END IF;
	RETURN st.id;
END;
$$;

-- Find or create the series row of an object; it must lie in the same study.
CREATE FUNCTION mdd._series(study bigint, info jsonb) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	uid text := info->>'series_instance_uid';
	se mdd.series;
BEGIN
	IF uid IS NULL THEN
		RAISE EXCEPTION 'DICOM object lacks a required identifier'
			USING ERRCODE = '22004', DETAIL = 'It has no Series Instance UID (0020,000E).';
	END IF;
	SELECT * INTO se FROM mdd.series s WHERE s.series_instance_uid = uid;
	IF NOT FOUND THEN
		INSERT INTO mdd.series (study, series_instance_uid, modality, series_number,
								series_description, series_date, body_part_examined,
								frame_of_reference_uid)
		VALUES (study, uid, info->>'modality', info->>'series_number',
				info->>'series_description', (info->>'series_date')::date,
				info->>'body_part_examined', info->>'frame_of_reference_uid')
		ON CONFLICT (series_instance_uid) DO NOTHING
		RETURNING * INTO se;
		IF se.id IS NULL THEN
			SELECT * INTO se FROM mdd.series s WHERE s.series_instance_uid = uid;
		ELSE
			UPDATE mdd.study s SET series_count = s.series_count + 1,
				modalities = CASE WHEN se.modality IS NULL OR se.modality = ANY (s.modalities)
								  THEN s.modalities ELSE s.modalities || se.modality END
			WHERE s.id = study;
		END IF;
	END IF;
	IF se.study <> study THEN
		RAISE EXCEPTION 'series % belongs to another study', uid USING ERRCODE = '23000';
	END IF;
	RETURN se.id;
END;
$$;

-- Store the bytes of a new object in the default storage and record the copy.
CREATE FUNCTION mdd._keep(obj bigint, digest bytea, data bytea) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	s mdd.storage := mdd._default_storage();
BEGIN
	INSERT INTO mdd.copy (object, storage, locator, state, size, sha256, verified_at)
	VALUES (obj, s.id, mdd._put(s, obj, digest, data), 'present', length(data), digest, now());
	IF s.tier <> 'online' THEN
		UPDATE mdd.object o SET tier = s.tier WHERE o.id = obj;
	END IF;
END;
$$;

-- The common path of mdd.store and mdd.store_file.
CREATE FUNCTION mdd._store_dicom(data bytea, source text, origin text, client text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	info jsonb;
	digest bytea;
	uid text;
	existing mdd.object;
	pat bigint;
	stu bigint;
	ser bigint;
	obj bigint;
BEGIN
	IF data IS NULL THEN
		RAISE EXCEPTION 'DICOM data must not be NULL' USING ERRCODE = '22004';
	END IF;
	info := mdd.parse(data);
	digest := sha256(data);
	uid := info->>'sop_instance_uid';

	SELECT * INTO existing FROM mdd.object o WHERE o.sop_instance_uid = uid;
	IF FOUND THEN
		IF existing.sha256 = digest THEN
			RETURN existing.id;
		END IF;
		RAISE EXCEPTION 'SOP instance % is already archived with other content', uid
			USING ERRCODE = '23505',
				  DETAIL = format('Object %s holds %s bytes with SHA-256 %s; the new data has %s bytes with SHA-256 %s.',
								  existing.id, existing.size, encode(existing.sha256, 'hex'),
								  length(data), encode(digest, 'hex')),
				  HINT = 'The archive keeps the first version; send a corrected object with a new SOP Instance UID.';
	END IF;

	-- most objects join a series already archived: one lookup suffices
	SELECT se.id, st.id, p.id INTO ser, stu, pat
	FROM mdd.series se
	JOIN mdd.study st ON st.id = se.study
	JOIN mdd.patient p ON p.id = st.patient
	WHERE se.series_instance_uid = info->>'series_instance_uid'
	  AND st.study_instance_uid = info->>'study_instance_uid'
	  AND p.patient_id = coalesce(info->>'patient_id', '')
	  AND (p.patient_name IS NOT NULL OR info->>'patient_name' IS NULL)
	  AND (p.birth_date IS NOT NULL OR info->>'patient_birth_date' IS NULL)
	  AND (p.sex IS NOT NULL OR info->>'patient_sex' IS NULL);
	IF NOT FOUND THEN
		pat := mdd._patient(coalesce(info->>'patient_id', ''), info->>'patient_name',
							(info->>'patient_birth_date')::date, info->>'patient_sex');
		stu := mdd._study(pat, info);
		ser := mdd._series(stu, info);
	END IF;

	INSERT INTO mdd.object (kind, patient, study, series, sop_instance_uid, sop_class_uid,
							instance_number, image_type, manufacturer, manufacturer_model_name,
							station_name, frame_of_reference_uid, transfer_syntax_uid,
							number_of_frames, content_date, content_type, filename,
							size, sha256, header, source)
	VALUES ('dicom', pat, stu, ser, uid, info->>'sop_class_uid',
			info->>'instance_number', info->>'image_type', info->>'manufacturer',
			info->>'manufacturer_model_name', info->>'station_name',
			info->>'frame_of_reference_uid', info->>'transfer_syntax_uid',
			CASE WHEN info->>'number_of_frames' ~ '^\s*[0-9]{1,9}\s*$'
				 THEN (info->>'number_of_frames')::int END,
			(info->>'content_date')::date, 'application/dicom',
			CASE WHEN origin IS NOT NULL THEN regexp_replace(origin, '^.*/', '') END,
			length(data), digest, info->'header', source)
	ON CONFLICT (sop_instance_uid) DO NOTHING
	RETURNING id INTO obj;

	IF obj IS NULL THEN
		-- stored by a concurrent session meanwhile: same rules as above
		SELECT * INTO existing FROM mdd.object o WHERE o.sop_instance_uid = uid;
		IF existing.sha256 = digest THEN
			RETURN existing.id;
		END IF;
		RAISE EXCEPTION 'SOP instance % is already archived with other content', uid
			USING ERRCODE = '23505';
	END IF;

	INSERT INTO mdd.reference (object, kind, uid, sop_class_uid, via)
	SELECT obj, r->>'kind', r->>'uid', r->>'sop_class_uid', r->>'via'
	FROM jsonb_array_elements(info->'references') r
	ON CONFLICT DO NOTHING;

	PERFORM mdd._tally(ser, stu);
	PERFORM mdd._keep(obj, digest, data);
	PERFORM mdd._audit('store', obj, info->>'patient_id',
					   coalesce(origin, format('%s bytes', length(data))), client);
	RETURN obj;
END;
$$;

CREATE FUNCTION mdd.store(data bytea, source text DEFAULT NULL) RETURNS bigint
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT mdd._store_dicom(data, source, NULL) $$;
COMMENT ON FUNCTION mdd.store(bytea, text) IS
	'Archive one DICOM object given as bytes; returns its object id';

CREATE FUNCTION mdd.store_file(path text, source text DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	resolved text := mdd._check_path(path, false);
BEGIN
	RETURN mdd._store_dicom(mdd._read_file(resolved), coalesce(source, 'file'), resolved);
END;
$$;
COMMENT ON FUNCTION mdd.store_file(text, text) IS
	'Archive one DICOM file from the server''s file system (under mdd.allowed_paths)';

CREATE FUNCTION mdd.import(directory text)
RETURNS TABLE(path text, object_id bigint, error text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	every int := coalesce(nullif(current_setting('mdd.import_progress_every', true), '')::int, 1000);
	files int := 0;
	stored int := 0;
	failed int := 0;
	started timestamptz := clock_timestamp();
BEGIN
	FOR path IN SELECT f FROM mdd._list_files(directory) f LOOP
		BEGIN
			object_id := mdd.store_file(path, 'import');
			error := NULL;
			stored := stored + 1;
		EXCEPTION WHEN OTHERS THEN
			object_id := NULL;
			error := SQLERRM;
			failed := failed + 1;
		END;
		files := files + 1;
		IF files % every = 0 THEN
			RAISE NOTICE 'mdd.import: % files done (% stored, % failed) in %',
				files, stored, failed, date_trunc('second', clock_timestamp() - started);
		END IF;
		RETURN NEXT;
	END LOOP;
	PERFORM mdd._audit('import', NULL, NULL,
					   format('%s: %s files, %s stored, %s failed', directory, files, stored, failed));
END;
$$;
COMMENT ON FUNCTION mdd.import(text) IS
	'Archive every file below a directory, recursively; one row per file, errors included';

-- the media type of a document, from its first bytes or its file name
CREATE FUNCTION mdd._guess_content_type(data bytea, filename text) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
	SELECT CASE
		WHEN substr(data, 1, 5) = '\x255044462d'::bytea THEN 'application/pdf'
		WHEN lower(filename) ~ '\.docx$' THEN 'application/vnd.openxmlformats-officedocument.wordprocessingml.document'
		WHEN lower(filename) ~ '\.xlsx$' THEN 'application/vnd.openxmlformats-officedocument.spreadsheetml.sheet'
		WHEN lower(filename) ~ '\.doc$' THEN 'application/msword'
		WHEN lower(filename) ~ '\.xls$' THEN 'application/vnd.ms-excel'
		WHEN lower(filename) ~ '\.(txt|log)$' THEN 'text/plain'
		WHEN lower(filename) ~ '\.csv$' THEN 'text/csv'
		WHEN lower(filename) ~ '\.xml$' THEN 'application/xml'
		WHEN lower(filename) ~ '\.json$' THEN 'application/json'
		WHEN lower(filename) ~ '\.zip$' OR substr(data, 1, 4) = '\x504b0304'::bytea THEN 'application/zip'
		WHEN lower(filename) ~ '\.(jpg|jpeg)$' THEN 'image/jpeg'
		WHEN lower(filename) ~ '\.png$' THEN 'image/png'
		ELSE 'application/octet-stream'
	END
$$;

CREATE FUNCTION mdd.store_document(patient_id text, data bytea, filename text,
								   content_type text DEFAULT NULL,
								   description text DEFAULT NULL,
								   study_instance_uid text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	digest bytea;
	pat bigint;
	stu bigint;
	obj bigint;
BEGIN
	IF coalesce(patient_id, '') = '' THEN
		RAISE EXCEPTION 'patient_id must be given' USING ERRCODE = '22004';
	END IF;
	IF data IS NULL THEN
		RAISE EXCEPTION 'document data must not be NULL' USING ERRCODE = '22004';
	END IF;
	IF length(data) = 0 THEN
		RAISE EXCEPTION 'document data is empty' USING ERRCODE = '22023';
	END IF;
	IF coalesce(filename, '') = '' OR filename ~ '[/\\]' THEN
		RAISE EXCEPTION 'invalid document file name "%"', coalesce(filename, '')
			USING ERRCODE = '22023', HINT = 'Give the file''s name without a directory.';
	END IF;
	digest := sha256(data);
	pat := mdd._patient(patient_id, NULL, NULL, NULL);

	SELECT o.id INTO obj FROM mdd.object o
	WHERE o.patient = pat AND o.kind = 'document' AND o.sha256 = digest
	  AND o.filename = store_document.filename;
	IF FOUND THEN
		RETURN obj;
	END IF;

	IF study_instance_uid IS NOT NULL THEN
		stu := mdd._study(pat, jsonb_build_object('study_instance_uid', study_instance_uid));
	END IF;

	INSERT INTO mdd.object (kind, patient, study, content_type, filename, description,
							size, sha256, source)
	VALUES ('document', pat, stu,
			coalesce(content_type, mdd._guess_content_type(data, filename)),
			filename, description, length(data), digest, 'document')
	RETURNING id INTO obj;

	PERFORM mdd._keep(obj, digest, data);
	PERFORM mdd._audit('store', obj, patient_id, filename);
	RETURN obj;
END;
$$;
COMMENT ON FUNCTION mdd.store_document(text, bytea, text, text, text, text) IS
	'Archive a non-DICOM file (PDF, Word, planning export) for a patient; returns its object id';
-- mdd: reading objects back, exporting them, and what travels with them

-- The bytes of an object from its best present copy (online tiers first),
-- see mdd._read_verified.  The size is always checked; the SHA-256 with
-- verify, and always for copies outside PostgreSQL, which can change
-- behind mdd's back.
CREATE FUNCTION mdd._fetch(object_id bigint, verify boolean) RETURNS bytea
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF object_id IS NULL THEN
		RAISE EXCEPTION 'object id must not be NULL' USING ERRCODE = '22004';
	END IF;
	IF NOT EXISTS (SELECT 1 FROM mdd.object x WHERE x.id = object_id) THEN
		RAISE EXCEPTION 'object % does not exist', object_id USING ERRCODE = '42704';
	END IF;
	RETURN mdd._read_verified(object_id, NULL, coalesce(verify, false));
END;
$$;

CREATE FUNCTION mdd.read(object_id bigint, verify boolean DEFAULT false) RETURNS bytea
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	data bytea := mdd._fetch(object_id, coalesce(verify, false));
BEGIN
	PERFORM mdd._audit('read', object_id,
					   (SELECT p.patient_id FROM mdd.object o JOIN mdd.patient p ON p.id = o.patient
						WHERE o.id = object_id), NULL);
	RETURN data;
END;
$$;
COMMENT ON FUNCTION mdd.read(bigint, boolean) IS
	'The exact stored bytes of an object, from whatever storage holds it';

CREATE FUNCTION mdd.export(object_id bigint, path text, verify boolean DEFAULT false,
						   overwrite boolean DEFAULT false) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	target text := mdd._check_path(path, true);
	written bigint;
BEGIN
	written := mdd._write_file(target, mdd._fetch(object_id, coalesce(verify, false)),
							   coalesce(overwrite, false));
	PERFORM mdd._audit('export', object_id,
					   (SELECT p.patient_id FROM mdd.object o JOIN mdd.patient p ON p.id = o.patient
						WHERE o.id = object_id), target);
	RETURN written;
END;
$$;
COMMENT ON FUNCTION mdd.export(bigint, text, boolean, boolean) IS
	'Write the exact stored bytes of an object to a file (under mdd.allowed_paths); returns bytes written';

-- The given objects and those that reference them, transitively: what
-- travels with them.
CREATE FUNCTION mdd._related_set(object_ids bigint[]) RETURNS SETOF bigint
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
	WITH RECURSIVE closure(id) AS (
		SELECT DISTINCT x FROM unnest(object_ids) x
		UNION
		SELECT referrer.object
		FROM closure
		JOIN mdd.object o ON o.id = closure.id
		CROSS JOIN LATERAL (
			SELECT r.object FROM mdd.reference r
			WHERE r.kind = 'instance' AND r.uid = o.sop_instance_uid
			UNION ALL
			SELECT r.object FROM mdd.reference r JOIN mdd.series se ON se.id = o.series
			WHERE r.kind = 'series' AND r.uid = se.series_instance_uid
		) referrer
	)
	SELECT id FROM closure
$$;

-- Objects that reference the given one, transitively: what travels with it.
CREATE FUNCTION mdd.related(object_id bigint) RETURNS SETOF bigint
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF object_id IS NULL THEN
		RAISE EXCEPTION 'object id must not be NULL' USING ERRCODE = '22004';
	END IF;
	IF NOT EXISTS (SELECT 1 FROM mdd.object o WHERE o.id = object_id) THEN
		RAISE EXCEPTION 'object % does not exist', object_id USING ERRCODE = '42704';
	END IF;
	RETURN QUERY
	SELECT r FROM mdd._related_set(ARRAY[object_id]) r WHERE r <> object_id ORDER BY 1;
END;
$$;
COMMENT ON FUNCTION mdd.related(bigint) IS
	'Objects that travel with this one: those referencing it, transitively (structure sets, plans, doses, records ...)';
-- mdd: the catalog views users query

CREATE VIEW mdd.objects AS
SELECT o.id,
	   o.kind,
	   p.patient_id,
	   p.patient_name,
	   p.birth_date AS patient_birth_date,
	   p.sex AS patient_sex,
	   st.study_instance_uid,
	   se.series_instance_uid,
	   o.sop_instance_uid,
	   o.sop_class_uid,
	   se.modality,
	   st.study_date,
	   st.study_time,
	   st.study_description,
	   st.accession_number,
	   se.series_number,
	   se.series_description,
	   o.instance_number,
	   o.image_type,
	   o.manufacturer,
	   o.station_name,
	   o.frame_of_reference_uid,
	   o.transfer_syntax_uid,
	   o.number_of_frames,
	   o.content_type,
	   o.filename,
	   o.description,
	   o.size,
	   encode(o.sha256, 'hex') AS sha256,
	   o.tier,
	   (SELECT string_agg(s.name, ',' ORDER BY s.id) FROM mdd.copy c
		JOIN mdd.storage s ON s.id = c.storage
		WHERE c.object = o.id AND c.state = 'present') AS storage,
	   o.ingested_at,
	   o.archived_at,
	   o.source,
	   o.header
FROM mdd.object o
JOIN mdd.patient p ON p.id = o.patient
LEFT JOIN mdd.study st ON st.id = o.study
LEFT JOIN mdd.series se ON se.id = o.series;

-- Storages with what they hold.  Options (where the blobs are) are shown
-- to administrators only, and never the credentials.
CREATE VIEW mdd.storages AS
SELECT s.name,
	   s.kind,
	   s.tier,
	   CASE WHEN pg_catalog.pg_has_role('mdd_admin', 'USAGE')
			THEN s.options - ARRAY['password', 'secret_key', 'secret_access_key', 'access_key',
								   'access_key_id', 'token', 'credentials'] END AS options,
	   s.read_only,
	   count(c.object) AS objects,
	   coalesce(sum(c.size), 0)::bigint AS bytes,
	   s.name = coalesce(nullif(current_setting('mdd.default_storage', true), ''), 'online')
		   AS receives_new_objects
FROM mdd.storage s
LEFT JOIN mdd.copy c ON c.storage = s.id AND c.state = 'present'
GROUP BY s.id;
-- mdd: DICOM nodes (application entities) and what they may do

CREATE TABLE mdd.node (
	id				serial PRIMARY KEY,
	name			text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9_.-]{1,63}$'),
	ae_title		text NOT NULL CHECK (ae_title ~ '^[ -[\]-~]{1,16}$' AND ae_title !~ '^ | $'),
	host			text,
	port			integer CHECK (port BETWEEN 1 AND 65535),
	may_store		boolean NOT NULL DEFAULT true,
	may_query		boolean NOT NULL DEFAULT true,
	may_retrieve	boolean NOT NULL DEFAULT true,
	may_send		boolean NOT NULL DEFAULT true,	-- mdd may send objects to it
	retrieve_by		text NOT NULL DEFAULT 'move'	-- how mdd.retrieve asks it for objects
					CHECK (retrieve_by IN ('move', 'get')),
	options			jsonb NOT NULL DEFAULT '{}',
	created_at		timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ON mdd.node (ae_title);

-- mdd.add_node: a DICOM application entity.  host and port say where it
-- listens (for C-ECHO, C-MOVE destinations); an incoming association from
-- its AE title is accepted only from that host when host is set.  Options:
-- {"store": bool, "query": bool, "retrieve": bool} (default all true): what
-- it may ask of mdd; {"send": bool} (default true): whether mdd sends
-- objects to it (mdd.send, C-MOVE destination); {"find": bool} (default
-- true): whether mdd.find queries it (it needs a host and port), and
-- {"find_timeout": seconds} (default mdd.find_timeout): how long it may
-- take to answer.  {"retrieve_by": "move" or
-- "get"} (default "move"): how mdd.retrieve asks it for objects.
-- A node by name; 42704 when there is none.
CREATE FUNCTION mdd._node(name text) RETURNS mdd.node
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	n mdd.node;
BEGIN
	SELECT * INTO n FROM mdd.node x WHERE x.name = _node.name;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'node "%" does not exist', coalesce(_node.name, 'NULL')
			USING ERRCODE = '42704', HINT = 'See mdd.nodes.';
	END IF;
	RETURN n;
END;
$$;

-- The row of a node as add_node and alter_node give it: every argument
-- checked (22004, 22023, 22P02), the permissions derived from the options.
CREATE FUNCTION mdd._node_row(name text, ae_title text, host text, port integer, options jsonb)
RETURNS mdd.node
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	bad text;
	n mdd.node;
BEGIN
	IF name IS NULL OR ae_title IS NULL THEN
		RAISE EXCEPTION 'node name and AE title must not be NULL' USING ERRCODE = '22004';
	END IF;
	IF name !~ '^[A-Za-z0-9_.-]{1,63}$' THEN
		RAISE EXCEPTION 'invalid node name "%"', name
			USING ERRCODE = '22023', DETAIL = 'Use 1 to 63 letters, digits, "_", "." or "-".';
	END IF;
	IF ae_title !~ '^[ -[\]-~]{1,16}$' OR ae_title ~ '^ | $' THEN
		RAISE EXCEPTION 'invalid AE title "%"', ae_title
			USING ERRCODE = '22023',
				  DETAIL = 'An AE title has 1 to 16 printable ASCII characters, no backslash, no leading or trailing space.';
	END IF;
	IF name = 'local' THEN
		RAISE EXCEPTION 'node name "local" is reserved'
			USING ERRCODE = '22023', DETAIL = 'mdd.find calls the local catalog "local".';
	END IF;
	IF port IS NOT NULL AND port NOT BETWEEN 1 AND 65535 THEN
		RAISE EXCEPTION 'invalid port %', port USING ERRCODE = '22023';
	END IF;
	options := coalesce(options, '{}');
	IF jsonb_typeof(options) <> 'object' THEN
		RAISE EXCEPTION 'node options must be a JSON object' USING ERRCODE = '22023';
	END IF;
	SELECT string_agg(k, ', ') INTO bad
	FROM jsonb_object_keys(options) k
	WHERE k NOT IN ('store', 'query', 'retrieve', 'send', 'find', 'find_timeout', 'retrieve_by');
	IF bad IS NOT NULL THEN
		RAISE EXCEPTION 'unknown node option(s): %', bad
			USING ERRCODE = '22023',
				  HINT = 'Options are "store", "query", "retrieve", "send", "find", "find_timeout" and "retrieve_by".';
	END IF;
	IF options ? 'retrieve_by' AND coalesce(options->>'retrieve_by', '') NOT IN ('move', 'get') THEN
		RAISE EXCEPTION 'invalid node option "retrieve_by"'
			USING ERRCODE = '22023', HINT = 'It is "move" (C-MOVE to this archive) or "get" (C-GET).';
	END IF;
	PERFORM (options->>'find')::boolean;	-- 22P02 unless a boolean, as the others below
	IF options ? 'find_timeout' AND (jsonb_typeof(options->'find_timeout') <> 'number'
									 OR (options->>'find_timeout')::numeric NOT BETWEEN 0.001 AND 86400) THEN
		RAISE EXCEPTION 'invalid node option "find_timeout": %', options->'find_timeout'
			USING ERRCODE = '22023', HINT = 'Give the seconds a C-FIND may take, a number from 0.001 to 86400.';
	END IF;
	n.name := name;
	n.ae_title := ae_title;
	n.host := nullif(host, '');
	n.port := port;
	n.may_store := coalesce((options->>'store')::boolean, true);
	n.may_query := coalesce((options->>'query')::boolean, true);
	n.may_retrieve := coalesce((options->>'retrieve')::boolean, true);
	n.may_send := coalesce((options->>'send')::boolean, true);
	n.retrieve_by := coalesce(options->>'retrieve_by', 'move');
	n.options := options;
	RETURN n;
END;
$$;

CREATE FUNCTION mdd.add_node(name text, ae_title text, host text, port integer,
							 options jsonb DEFAULT '{}')
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	n mdd.node := mdd._node_row(name, ae_title, host, port, options);
BEGIN
	INSERT INTO mdd.node (name, ae_title, host, port, may_store, may_query, may_retrieve, may_send,
						  retrieve_by, options)
	VALUES (n.name, n.ae_title, n.host, n.port, n.may_store, n.may_query, n.may_retrieve, n.may_send,
			n.retrieve_by, n.options);
EXCEPTION WHEN unique_violation THEN
	RAISE EXCEPTION 'node "%" already exists', add_node.name USING ERRCODE = '42710';
END;
$$;

-- mdd.alter_node: change where a node is or what it may do.  Arguments left
-- NULL keep their value; host '' removes the host; options are merged into
-- the node's options, a key given as JSON null going back to its default.
-- Associations already open keep what they were admitted with.
CREATE FUNCTION mdd.alter_node(name text, ae_title text DEFAULT NULL, host text DEFAULT NULL,
							   port integer DEFAULT NULL, options jsonb DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	old mdd.node := mdd._node(name);
	n mdd.node;
BEGIN
	IF options IS NOT NULL AND jsonb_typeof(options) <> 'object' THEN
		RAISE EXCEPTION 'node options must be a JSON object' USING ERRCODE = '22023';
	END IF;
	n := mdd._node_row(old.name, coalesce(alter_node.ae_title, old.ae_title),
					   CASE WHEN alter_node.host IS NULL THEN old.host ELSE alter_node.host END,
					   coalesce(alter_node.port, old.port),
					   jsonb_strip_nulls(old.options || coalesce(options, '{}')));
	UPDATE mdd.node x SET ae_title = n.ae_title, host = n.host, port = n.port,
		   may_store = n.may_store, may_query = n.may_query, may_retrieve = n.may_retrieve,
		   may_send = n.may_send, retrieve_by = n.retrieve_by, options = n.options
	WHERE x.id = old.id;
	PERFORM mdd._audit('alter node', NULL, NULL,
					   format('%s: %s', old.name,
							  (SELECT string_agg(format('%s %s -> %s', k, o, v), ', ' ORDER BY k)
							   FROM jsonb_each(to_jsonb(n)) e(k, v)
							   JOIN jsonb_each(to_jsonb(old)) f(k2, o) ON f.k2 = e.k
							   WHERE e.k NOT IN ('id', 'created_at') AND o IS DISTINCT FROM v)));
END;
$$;

-- mdd.drop_node: forget a node no job or rule refers to.  What send jobs
-- delivered to it (mdd.delivered) goes with it.  A job or rule made for
-- it meanwhile makes the delete fail on its foreign key.
CREATE FUNCTION mdd.drop_node(name text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	n mdd.node := mdd._node(name);
	users text;
BEGIN
	SELECT string_agg(format('rule "%s"', r.name), ', ' ORDER BY r.name) INTO users
	FROM mdd.rule r WHERE r.node = n.id;
	IF users IS NOT NULL THEN
		RAISE EXCEPTION 'node "%" is used by %', n.name, users
			USING ERRCODE = '2BP01', HINT = 'Drop those rules first (mdd.drop_rule).';
	END IF;
	SELECT string_agg(format('job %s (%s)', j.id, j.state), ', ' ORDER BY j.id) INTO users
	FROM mdd.job j WHERE j.node = n.id OR j.destination = n.id;
	IF users IS NOT NULL THEN
		RAISE EXCEPTION 'node "%" is used by %', n.name, users
			USING ERRCODE = '2BP01',
				  HINT = 'Wait for or cancel the jobs that run (mdd.cancel), then remove ended ones with mdd.purge_jobs.';
	END IF;
	DELETE FROM mdd.delivered d WHERE d.node = n.id;
	DELETE FROM mdd.node x WHERE x.id = n.id;
	PERFORM mdd._audit('drop node', NULL, NULL, format('%s (%s at %s:%s)', n.name, n.ae_title, n.host, n.port));
END;
$$;

CREATE VIEW mdd.nodes AS
SELECT name, ae_title, host, port, may_store, may_query, may_retrieve, may_send, created_at,
	   host IS NOT NULL AND port IS NOT NULL AND coalesce((options->>'find')::boolean, true) AS may_find,
	   make_interval(secs => (options->>'find_timeout')::double precision) AS find_timeout,
	   retrieve_by
FROM mdd.node;

CREATE FUNCTION mdd._echo(ae_title text, host text, port integer, timeout integer) RETURNS text
	AS 'MODULE_PATHNAME', 'mdd_echo_sql' LANGUAGE C VOLATILE;

CREATE FUNCTION mdd.echo(node text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	n mdd.node := mdd._node(node);
	failure text;
BEGIN
	IF n.host IS NULL OR n.port IS NULL THEN
		RAISE EXCEPTION 'node "%" has no host and port to call', n.name USING ERRCODE = '22023';
	END IF;
	failure := mdd._echo(n.ae_title, n.host, n.port, 10);
	PERFORM mdd._audit('echo', NULL, NULL,
					   format('%s (%s at %s:%s): %s', n.name, n.ae_title, n.host, n.port,
							  coalesce(failure, 'success')));
	IF failure IS NOT NULL THEN
		RAISE NOTICE 'C-ECHO to node "%" failed: %', n.name, failure;
	END IF;
	RETURN failure IS NULL;
END;
$$;

-- Whether an association request is accepted, and what the peer may do.
-- Called by the DICOM listeners; writes the audit trail.
CREATE FUNCTION mdd._dicom_admit(calling_ae text, called_ae text, peer text,
								 OUT permits integer, OUT reason text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	ours text := coalesce(current_setting('mdd.ae_title', true), 'MDD');
	n mdd.node;
BEGIN
	permits := 0;
	IF called_ae IS DISTINCT FROM ours THEN
		reason := format('called AE title "%s" is not this archive''s "%s"', called_ae, ours);
	ELSE
		SELECT * INTO n FROM mdd.node x
		WHERE x.ae_title = calling_ae
		  AND (x.host IS NULL OR x.host = peer
			   OR (x.host = 'localhost' AND peer IN ('127.0.0.1', '::1')))
		ORDER BY x.host IS NULL, x.id
		LIMIT 1;
		IF FOUND THEN
			permits := 1 | CASE WHEN n.may_store THEN 2 ELSE 0 END
						 | CASE WHEN n.may_query THEN 4 ELSE 0 END
						 | CASE WHEN n.may_retrieve THEN 8 ELSE 0 END;
			reason := format('node %s', n.name);
		ELSIF EXISTS (SELECT 1 FROM mdd.node x WHERE x.ae_title = calling_ae) THEN
			-- a known AE title from another host: refused even when unknown
			-- nodes are accepted, else it would escape its node's limits
			reason := format('AE title "%s" is not registered for host %s', calling_ae, peer);
		ELSIF current_setting('mdd.accept_unknown_nodes', true)::boolean THEN
			permits := 1 | 2 | 4 | 8;
			reason := 'unknown node accepted (mdd.accept_unknown_nodes)';
		ELSE
			reason := format('unknown AE title "%s"', calling_ae);
		END IF;
	END IF;
	INSERT INTO mdd.audit (role, action, detail, client)
	VALUES (mdd._caller(), CASE WHEN permits = 0 THEN 'refuse' ELSE 'associate' END,
			format('%s -> %s: %s', calling_ae, called_ae, reason),
			format('%s@%s', calling_ae, peer));
END;
$$;

-- Archive an object received by C-STORE.  Its SOP Instance UID must be the
-- one the C-STORE request announced.
CREATE FUNCTION mdd._store_received(data bytea, calling_ae text, peer text,
									sop_instance_uid text) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	obj bigint := mdd._store_dicom(data, 'dicom:' || calling_ae, NULL,
								   format('%s@%s', calling_ae, peer));
BEGIN
	IF (SELECT o.sop_instance_uid FROM mdd.object o WHERE o.id = obj) <> _store_received.sop_instance_uid THEN
		RAISE EXCEPTION 'data set SOP Instance UID differs from the C-STORE request'
			USING ERRCODE = '22023',
				  DETAIL = format('The request announced %s.', _store_received.sop_instance_uid);
	END IF;
	RETURN obj;
END;
$$;
-- mdd: query matching for the DICOM C-FIND service (Patient Root and Study
-- Root, levels PATIENT / STUDY / SERIES / IMAGE) over the catalog

-- The catalog expression, value representation and level of each query key.
CREATE FUNCTION mdd._find_attribute(keyword text, OUT expr text, OUT vr text, OUT lvl int)
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
	SELECT a.expr, a.vr, a.lvl FROM (VALUES
		('PatientID', 'p.patient_id', 'LO', 0),
		('PatientName', 'p.patient_name', 'PN', 0),
		('PatientBirthDate', 'p.birth_date', 'DA', 0),
		('PatientSex', 'p.sex', 'CS', 0),
		('NumberOfPatientRelatedStudies',
		 '(SELECT count(*) FROM mdd.study x WHERE x.patient = p.id)', 'IS', 0),
		('NumberOfPatientRelatedSeries',
		 '(SELECT sum(x.series_count) FROM mdd.study x WHERE x.patient = p.id)', 'IS', 0),
		('NumberOfPatientRelatedInstances',
		 '(SELECT sum(x.object_count) FROM mdd.study x WHERE x.patient = p.id)', 'IS', 0),
		('StudyInstanceUID', 'st.study_instance_uid', 'UI', 1),
		('StudyDate', 'st.study_date', 'DA', 1),
		('StudyTime', 'st.study_time', 'TM', 1),
		('AccessionNumber', 'st.accession_number', 'SH', 1),
		('StudyID', 'st.study_id', 'SH', 1),
		('StudyDescription', 'st.study_description', 'LO', 1),
		('ReferringPhysicianName', 'st.referring_physician', 'PN', 1),
		('ModalitiesInStudy', 'st.modalities', 'MODALITIES', 1),
		('NumberOfStudyRelatedSeries', 'st.series_count', 'IS', 1),
		('NumberOfStudyRelatedInstances', 'st.object_count', 'IS', 1),
		('SeriesInstanceUID', 'se.series_instance_uid', 'UI', 2),
		('Modality', 'se.modality', 'CS', 2),
		('SeriesNumber', 'se.series_number', 'IS', 2),
		('SeriesDescription', 'se.series_description', 'LO', 2),
		('SeriesDate', 'se.series_date', 'DA', 2),
		('BodyPartExamined', 'se.body_part_examined', 'CS', 2),
		('FrameOfReferenceUID', 'se.frame_of_reference_uid', 'UI', 2),
		('NumberOfSeriesRelatedInstances', 'se.object_count', 'IS', 2),
		('SOPInstanceUID', 'o.sop_instance_uid', 'UI', 3),
		('SOPClassUID', 'o.sop_class_uid', 'UI', 3),
		('InstanceNumber', 'o.instance_number', 'IS', 3),
		('NumberOfFrames', 'o.number_of_frames', 'IS', 3),
		('ContentDate', 'o.content_date', 'DA', 3)
	) AS a(keyword, expr, vr, lvl)
	WHERE a.keyword = _find_attribute.keyword
$$;

-- a DICOM date (YYYYMMDD, or YYYY.MM.DD) as an SQL date literal, or NULL
CREATE FUNCTION mdd._find_date(value text) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
	SELECT CASE WHEN replace(value, '.', '') ~ '^[0-9]{8}$'
				THEN quote_literal(to_date(replace(value, '.', ''), 'YYYYMMDD')::text) || '::date' END
$$;

-- a DICOM time (HH, HHMM, HHMMSS[.F]) as an SQL time literal, or NULL
CREATE FUNCTION mdd._find_time(value text) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
	SELECT CASE WHEN v ~ '^[0-9]{2}([0-9]{2}([0-9]{2}(\.[0-9]{1,6})?)?)?$'
				THEN quote_literal(substr(v, 1, 2) || ':' || coalesce(nullif(substr(v, 3, 2), ''), '00')
								   || ':' || coalesce(nullif(substr(v, 5), ''), '00')) || '::time' END
	FROM (SELECT replace(value, ':', '') AS v) x
$$;

-- The SQL condition for one key of a C-FIND identifier (NULL: matches all).
CREATE FUNCTION mdd._find_condition(expr text, vr text, value text) RETURNS text
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	lo text;
	hi text;
	pattern text;
	conv text;
BEGIN
	value := btrim(value);
	IF value IS NULL OR value = '' OR value = '*' OR vr = 'IS' AND expr ~ '^\(' THEN
		RETURN NULL;
	END IF;
	CASE vr
	WHEN 'UI' THEN
		RETURN format('%s = ANY (%L::text[])', expr, string_to_array(value, '\'));
	WHEN 'DA', 'TM' THEN
		conv := CASE vr WHEN 'DA' THEN 'mdd._find_date' ELSE 'mdd._find_time' END;
		IF position('-' IN value) > 0 THEN
			lo := nullif(split_part(value, '-', 1), '');
			hi := nullif(split_part(value, '-', 2), '');
			EXECUTE format('SELECT %s($1), %s($2)', conv, conv) INTO lo, hi USING lo, hi;
			RETURN concat_ws(' AND ', CASE WHEN lo IS NOT NULL THEN format('%s >= %s', expr, lo) END,
							 CASE WHEN hi IS NOT NULL THEN format('%s <= %s', expr, hi) END,
							 CASE WHEN lo IS NULL AND hi IS NULL THEN 'false' END);
		END IF;
		EXECUTE format('SELECT %s($1)', conv) INTO lo USING value;
		RETURN coalesce(format('%s = %s', expr, lo), 'false');
	WHEN 'MODALITIES' THEN
		RETURN format('%s && %L::text[]', expr, string_to_array(value, '\'));
	ELSE
		IF vr = 'IS' THEN
			RETURN format('%s::text = %L', expr, value);
		END IF;
		IF value ~ '[*?]' THEN
			pattern := replace(replace(replace(value, '\', '\\'), '%', '\%'), '_', '\_');
			pattern := replace(replace(pattern, '*', '%'), '?', '_');
			-- person names match without regard to case, as most archives do
			RETURN format('%s %s %L', expr, CASE WHEN vr = 'PN' THEN 'ILIKE' ELSE 'LIKE' END, pattern);
		END IF;
		IF vr = 'PN' THEN
			RETURN format('lower(%s) = lower(%L)', expr, value);
		END IF;
		RETURN format('%s = %L', expr, value);
	END CASE;
END;
$$;

-- The text a matched attribute is answered with.
CREATE FUNCTION mdd._find_output(expr text, vr text) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
	SELECT CASE vr
		WHEN 'DA' THEN format('to_char(%s, ''YYYYMMDD'')', expr)
		WHEN 'TM' THEN format('replace(%s::text, '':'', '''')', expr)
		WHEN 'MODALITIES' THEN format('array_to_string(%s, ''\'')', expr)
		ELSE format('%s::text', expr)
	END
$$;

-- The query of a C-FIND, C-MOVE or C-GET identifier: its level (0 PATIENT
-- to 3 IMAGE), the FROM and WHERE clauses over mdd.patient p, mdd.study st,
-- mdd.series se and mdd.object o down to that level, and the answers: the
-- keywords asked that the level has (and the level's unique key) and their
-- expressions.
-- model: 'PATIENT' (Patient Root) or 'STUDY' (Study Root).  With objects,
-- the joins go down to mdd.object o whatever the level.
CREATE FUNCTION mdd._match_query(model text, level text, keys jsonb, objects boolean,
								 OUT lvl int, OUT from_where text, OUT names text[],
								 OUT exprs text[])
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	conditions text[] := '{}';
	k text;
	v text;
	a record;
	c text;
BEGIN
	lvl := array_position(ARRAY['PATIENT', 'STUDY', 'SERIES', 'IMAGE'], level) - 1;
	names := '{}';
	exprs := '{}';
	IF lvl IS NULL THEN
		RAISE EXCEPTION 'unknown query/retrieve level "%"', coalesce(level, '')
			USING ERRCODE = '22023', HINT = 'Use PATIENT, STUDY, SERIES or IMAGE.';
	END IF;
	IF model = 'STUDY' AND lvl = 0 THEN
		RAISE EXCEPTION 'level PATIENT does not exist in the Study Root model' USING ERRCODE = '22023';
	END IF;
	FOR k, v IN SELECT key, value FROM jsonb_each_text(keys) LOOP
		SELECT * INTO a FROM mdd._find_attribute(k);
		IF a.expr IS NULL OR a.lvl > lvl THEN
			CONTINUE;			-- answered empty by the caller
		END IF;
		c := mdd._find_condition(a.expr, a.vr, v);
		IF c IS NOT NULL THEN
			conditions := conditions || c;
		END IF;
		names := names || k;
		exprs := exprs || mdd._find_output(a.expr, a.vr);
	END LOOP;
	-- the unique key of the level is always answered
	k := (ARRAY['PatientID', 'StudyInstanceUID', 'SeriesInstanceUID', 'SOPInstanceUID'])[lvl + 1];
	IF NOT keys ? k THEN
		SELECT * INTO a FROM mdd._find_attribute(k);
		names := names || k;
		exprs := exprs || mdd._find_output(a.expr, a.vr);
	END IF;

	from_where := 'FROM mdd.patient p';
	IF lvl >= 1 OR objects THEN
		from_where := from_where || ' JOIN mdd.study st ON st.patient = p.id';
	END IF;
	IF lvl >= 2 OR objects THEN
		from_where := from_where || ' JOIN mdd.series se ON se.study = st.id';
	END IF;
	IF lvl >= 3 OR objects THEN
		from_where := from_where || ' JOIN mdd.object o ON o.series = se.id';
	END IF;
	IF lvl = 0 THEN
		from_where := from_where || ' WHERE EXISTS (SELECT 1 FROM mdd.study x WHERE x.patient = p.id)';
	ELSE
		from_where := from_where || ' WHERE true';
	END IF;
	IF array_length(conditions, 1) > 0 THEN
		from_where := from_where || ' AND ' || array_to_string(conditions, ' AND ');
	END IF;
END;
$$;

-- mdd._dicom_find(model, level, keys): the C-FIND matches, as arrays of
-- text: first the keywords answered (those asked that the level has, and
-- the level's unique key), then one row of their values per match, in
-- catalog order.  Plain arrays rather than JSON: a query answering ten
-- thousand studies spends its time matching, not building documents.
CREATE FUNCTION mdd._dicom_find(model text, level text, keys jsonb) RETURNS SETOF text[]
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	q record := mdd._match_query(model, level, keys, false);
BEGIN
	RETURN NEXT q.names;
	RETURN QUERY EXECUTE format('SELECT ARRAY[%s]::text[] %s ORDER BY %s',
								array_to_string(q.exprs, ', '), q.from_where,
								(ARRAY['p.id', 'st.id', 'se.id', 'o.id'])[q.lvl + 1]);
END;
$$;
-- mdd: query spanning.  mdd.find searches the local catalog and DICOM
-- nodes at the same time (one C-FIND per node, each in a worker of its
-- own, see extension/find.c); mdd.patient_list is the single list of what
-- is known about a patient, here and on the nodes.

-- A DICOM date (YYYYMMDD) as a date, or NULL when it is not one.
CREATE FUNCTION mdd._find_da(value text) RETURNS date
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF value !~ '^[0-9]{8}$' THEN
		RETURN NULL;
	END IF;
	RETURN to_date(value, 'YYYYMMDD');
EXCEPTION WHEN datetime_field_overflow OR invalid_datetime_format THEN
	RETURN NULL;
END;
$$;

-- The local part of mdd.find: the catalog's matches, by the rules of the
-- C-FIND service (mdd._match_query), in the columns of mdd.find.
CREATE FUNCTION mdd._find_local(find_level text, find_patient_id text, find_patient_name text,
								find_study_date text, find_modality text,
								find_study_instance_uid text, find_accession_number text)
RETURNS TABLE(location text, status text, level text, patient_id text, patient_name text,
			  study_instance_uid text, study_date text, series_instance_uid text,
			  sop_instance_uid text, modality text, description text, instances integer)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	keys jsonb := jsonb_build_object('PatientID', coalesce(find_patient_id, ''),
									 'PatientName', coalesce(find_patient_name, ''),
									 'StudyInstanceUID', coalesce(find_study_instance_uid, ''),
									 'StudyDate', coalesce(find_study_date, ''),
									 'AccessionNumber', coalesce(find_accession_number, ''));
	q record;
	cols text[];
	k text;
BEGIN
	CASE find_level
	WHEN 'STUDY' THEN
		keys := keys || jsonb_build_object('ModalitiesInStudy', coalesce(find_modality, ''),
										   'StudyDescription', '',
										   'NumberOfStudyRelatedInstances', '');
	WHEN 'SERIES' THEN
		keys := keys || jsonb_build_object('Modality', coalesce(find_modality, ''),
										   'SeriesInstanceUID', '', 'SeriesDescription', '',
										   'NumberOfSeriesRelatedInstances', '');
	ELSE
		keys := keys || jsonb_build_object('Modality', coalesce(find_modality, ''),
										   'SeriesInstanceUID', '', 'SeriesDescription', '',
										   'SOPInstanceUID', '');
	END CASE;
	q := mdd._match_query('STUDY', find_level, keys, false);
	FOREACH k IN ARRAY ARRAY['PatientID', 'PatientName', 'StudyInstanceUID', 'StudyDate',
							 'SeriesInstanceUID', 'SOPInstanceUID',
							 CASE find_level WHEN 'STUDY' THEN 'ModalitiesInStudy' ELSE 'Modality' END,
							 CASE find_level WHEN 'STUDY' THEN 'StudyDescription' ELSE 'SeriesDescription' END,
							 CASE find_level WHEN 'STUDY' THEN 'NumberOfStudyRelatedInstances'
								 WHEN 'SERIES' THEN 'NumberOfSeriesRelatedInstances' END] LOOP
		cols := cols || coalesce(q.exprs[array_position(q.names, k)], 'NULL');
	END LOOP;
	RETURN QUERY EXECUTE format(
		'SELECT ''local''::text, ''ok''::text, %L::text, %s, %s, %s, %s, %s, %s, %s, %s, (%s)::integer %s ORDER BY %s',
		find_level, cols[1], cols[2], cols[3], cols[4], cols[5], cols[6], cols[7], cols[8], cols[9],
		q.from_where, (ARRAY['p.id', 'st.id', 'se.id', 'o.id'])[q.lvl + 1]);
END;
$$;

CREATE FUNCTION mdd._find_spanning(level text, patient_id text, patient_name text,
								   study_date text, modality text, study_instance_uid text,
								   accession_number text, local boolean, names text[],
								   ae_titles text[], hosts text[], ports integer[],
								   timeouts_ms integer[], timeout_ms integer)
RETURNS TABLE(location text, status text, level text, patient_id text, patient_name text,
			  study_instance_uid text, study_date text, series_instance_uid text,
			  sop_instance_uid text, modality text, description text, instances integer)
	AS 'MODULE_PATHNAME', 'mdd_find_spanning_sql' LANGUAGE C VOLATILE;

-- mdd._find, behind mdd.find (whose input and output columns share names,
-- which PL/pgSQL does not allow): one search over the local catalog ('local') and DICOM nodes,
-- queried at the same time.  nodes NULL: 'local' and every node that may be
-- queried (a host and port, and node option "find" not false); else the
-- nodes named, 'local' among them for the catalog.  Each node has its own
-- time limit (node option "find_timeout", else mdd.find_timeout), and
-- timeout bounds the whole call.  A node that fails or runs out of time
-- gives one row whose status says so; matches have status 'ok'.
-- What nodes answer is matched again by the catalog's rules, for the
-- attributes they return, since a node may ignore a key it does not
-- support.
CREATE FUNCTION mdd._find(find_patient_id text, find_patient_name text, find_study_date text,
						  find_modality text, find_study_instance_uid text,
						  find_accession_number text, find_level text, find_nodes text[],
						  find_timeout interval)
RETURNS TABLE(location text, status text, level text, patient_id text, patient_name text,
			  study_instance_uid text, study_date text, series_instance_uid text,
			  sop_instance_uid text, modality text, description text, instances integer)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	lvl text := upper(btrim(find_level));
	want_local boolean;
	names text[];
	aes text[];
	hosts text[];
	ports integer[];
	timeouts integer[];
	total_ms numeric;
	default_ms integer;
	conds text[] := '{}';
	c text;
	missing text;
	n mdd.node;
	v text;
BEGIN
	IF lvl IS NULL OR lvl NOT IN ('STUDY', 'SERIES', 'IMAGE') THEN
		RAISE EXCEPTION 'unknown find level "%"', coalesce(find_level, '')
			USING ERRCODE = '22023', HINT = 'Use STUDY, SERIES or IMAGE.';
	END IF;
	total_ms := extract(epoch FROM coalesce(find_timeout, interval '10 s')) * 1000;
	IF total_ms <= 0 OR total_ms > 86400000 THEN
		RAISE EXCEPTION 'invalid find timeout "%"', find_timeout
			USING ERRCODE = '22023', HINT = 'Give a positive interval of at most a day.';
	END IF;
	FOREACH v IN ARRAY coalesce(string_to_array(find_study_date, '\'), '{}') LOOP
		IF v !~ '^([0-9]{8}|[0-9]{8}-|-[0-9]{8}|[0-9]{8}-[0-9]{8})$'
		   OR mdd._find_da(nullif(split_part(v, '-', 1), '')) IS NULL AND split_part(v, '-', 1) <> ''
		   OR mdd._find_da(nullif(split_part(v, '-', 2), '')) IS NULL AND split_part(v, '-', 2) <> '' THEN
			RAISE EXCEPTION 'invalid study date "%"', find_study_date
				USING ERRCODE = '22007',
					  HINT = 'Give a DICOM date YYYYMMDD or a range such as 20240101-20240131, -20240131 or 20240101-.';
		END IF;
	END LOOP;
	IF find_study_date LIKE '%\%' THEN
		RAISE EXCEPTION 'invalid study date "%"', find_study_date
			USING ERRCODE = '22007', HINT = 'Give one date or one range.';
	END IF;

	default_ms := extract(epoch FROM current_setting('mdd.find_timeout')::interval) * 1000;
	IF find_nodes IS NULL THEN
		want_local := true;
		SELECT coalesce(array_agg(x.name ORDER BY x.name), '{}') INTO names
		FROM mdd.node x
		WHERE x.host IS NOT NULL AND x.port IS NOT NULL
		  AND coalesce((x.options->>'find')::boolean, true);
	ELSE
		IF array_position(find_nodes, NULL) IS NOT NULL THEN
			RAISE EXCEPTION 'nodes must not contain NULL' USING ERRCODE = '22004';
		END IF;
		want_local := 'local' = ANY (find_nodes);
		SELECT string_agg(format('"%s"', u), ', ') INTO missing
		FROM unnest(find_nodes) u
		WHERE u <> 'local' AND NOT EXISTS (SELECT 1 FROM mdd.node x WHERE x.name = u);
		IF missing IS NOT NULL THEN
			RAISE EXCEPTION 'node % does not exist', missing
				USING ERRCODE = '42704', HINT = 'See mdd.nodes; ''local'' names the local catalog.';
		END IF;
		SELECT coalesce(array_agg(DISTINCT u ORDER BY u), '{}') INTO names
		FROM unnest(find_nodes) u WHERE u <> 'local';
		FOR n IN SELECT * FROM mdd.node x WHERE x.name = ANY (names) ORDER BY x.name LOOP
			IF n.host IS NULL OR n.port IS NULL THEN
				RAISE EXCEPTION 'node "%" has no host and port to query', n.name USING ERRCODE = '22023';
			END IF;
			IF NOT coalesce((n.options->>'find')::boolean, true) THEN
				RAISE EXCEPTION 'node "%" may not be queried', n.name
					USING ERRCODE = '42501', HINT = 'Its node option "find" is false.';
			END IF;
		END LOOP;
	END IF;
	SELECT coalesce(array_agg(x.ae_title ORDER BY x.name), '{}'),
		   coalesce(array_agg(x.host ORDER BY x.name), '{}'),
		   coalesce(array_agg(x.port ORDER BY x.name), '{}'),
		   coalesce(array_agg(coalesce(round((x.options->>'find_timeout')::numeric * 1000)::integer,
									   default_ms) ORDER BY x.name), '{}')
	INTO aes, hosts, ports, timeouts
	FROM mdd.node x WHERE x.name = ANY (names);

	PERFORM mdd._audit('find', NULL, find_patient_id,
					   concat_ws(', ', 'level ' || lvl,
								 'patient name ' || find_patient_name, 'study date ' || find_study_date,
								 'modality ' || find_modality, 'study ' || find_study_instance_uid,
								 'accession number ' || find_accession_number,
								 'in ' || array_to_string(CASE WHEN want_local THEN 'local'::text || names
															  ELSE names END, ', ')));

	-- the nodes' answers, matched again on what they returned
	FOREACH c IN ARRAY ARRAY[
		CASE WHEN find_patient_id IS NOT NULL THEN
			format('(r.patient_id IS NULL OR %s)', mdd._find_condition('r.patient_id', 'LO', find_patient_id)) END,
		CASE WHEN find_patient_name IS NOT NULL THEN
			format('(r.patient_name IS NULL OR %s)', mdd._find_condition('r.patient_name', 'PN', find_patient_name)) END,
		CASE WHEN find_study_date IS NOT NULL THEN
			format('(mdd._find_da(r.study_date) IS NULL OR %s)',
				   mdd._find_condition('mdd._find_da(r.study_date)', 'DA', find_study_date)) END,
		CASE WHEN find_study_instance_uid IS NOT NULL THEN
			format('(r.study_instance_uid IS NULL OR %s)',
				   mdd._find_condition('r.study_instance_uid', 'UI', find_study_instance_uid)) END,
		CASE WHEN find_modality IS NOT NULL AND lvl = 'STUDY' THEN
			format('(r.modality IS NULL OR %s)',
				   mdd._find_condition('string_to_array(r.modality, ''\'')', 'MODALITIES', find_modality))
			 WHEN find_modality IS NOT NULL THEN
			format('(r.modality IS NULL OR %s)', mdd._find_condition('r.modality', 'CS', find_modality)) END
	] LOOP
		IF c IS NOT NULL THEN
			conds := conds || c;
		END IF;
	END LOOP;

	RETURN QUERY EXECUTE format(
		'SELECT r.* FROM mdd._find_spanning($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) r '
		'WHERE r.location = ''local'' OR r.status <> ''ok'' OR (%s) '
		'ORDER BY r.location <> ''local'', r.location, r.status <> ''ok'', r.study_date, '
		'r.study_instance_uid, r.series_instance_uid, r.sop_instance_uid',
		coalesce(nullif(array_to_string(conds, ' AND '), ''), 'true'))
	USING lvl, find_patient_id, find_patient_name, find_study_date, find_modality,
		  find_study_instance_uid, find_accession_number, want_local, names, aes, hosts, ports,
		  timeouts, least(total_ms, 86400000)::integer;
END;
$$;

-- mdd.find: the public name of mdd._find.
CREATE FUNCTION mdd.find(patient_id text DEFAULT NULL, patient_name text DEFAULT NULL,
						 study_date text DEFAULT NULL, modality text DEFAULT NULL,
						 study_instance_uid text DEFAULT NULL, accession_number text DEFAULT NULL,
						 level text DEFAULT 'STUDY', nodes text[] DEFAULT NULL,
						 timeout interval DEFAULT '10 s')
RETURNS TABLE(location text, status text, level text, patient_id text, patient_name text,
			  study_instance_uid text, study_date text, series_instance_uid text,
			  sop_instance_uid text, modality text, description text, instances integer)
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
	SELECT * FROM mdd._find($1, $2, $3, $4, $5, $6, $7, $8, $9)
$$;

-- mdd.patient_list: everything known about one patient, one row per
-- series (and per tier, when a series is partly archived) and per
-- document here, and with include_remote one row per series on each node
-- that may be queried (from mdd.find at SERIES level), or one row saying
-- why a node could not answer.
CREATE FUNCTION mdd.patient_list(patient_id text, include_remote boolean DEFAULT false)
RETURNS TABLE(location text, tier text, status text, kind text,
			  study_instance_uid text, study_date date, study_description text,
			  series_instance_uid text, modality text, series_description text,
			  document_id bigint, objects integer, bytes bigint)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF patient_list.patient_id IS NULL THEN
		RAISE EXCEPTION 'patient ID must not be NULL' USING ERRCODE = '22004';
	END IF;
	PERFORM mdd._audit('patient list', NULL, patient_list.patient_id,
					   CASE WHEN include_remote THEN 'with remote nodes' END);
	RETURN QUERY
	WITH here AS (
		SELECT 'local'::text AS location, o.tier, 'ok'::text AS status, o.kind,
			   st.study_instance_uid, st.study_date, st.study_description,
			   se.series_instance_uid, se.modality,
			   CASE WHEN o.kind = 'document' THEN max(coalesce(o.description, o.filename))
					ELSE se.series_description END AS series_description,
			   CASE WHEN o.kind = 'document' THEN o.id END AS document_id,
			   count(*)::integer AS objects, sum(o.size)::bigint AS bytes
		FROM mdd.patient p
		JOIN mdd.object o ON o.patient = p.id
		LEFT JOIN mdd.study st ON st.id = o.study
		LEFT JOIN mdd.series se ON se.id = o.series
		WHERE p.patient_id = patient_list.patient_id
		GROUP BY o.tier, o.kind, st.id, se.id, CASE WHEN o.kind = 'document' THEN o.id END
	), remote AS (
		SELECT f.location, NULL::text AS tier, f.status,
			   CASE WHEN f.status = 'ok' THEN 'dicom' END AS kind,
			   f.study_instance_uid, mdd._find_da(f.study_date), NULL::text,
			   f.series_instance_uid, f.modality, f.description, NULL::bigint,
			   f.instances, NULL::bigint
		FROM mdd.find(patient_id => patient_list.patient_id, level => 'SERIES') f
		WHERE include_remote AND f.location <> 'local'
	)
	SELECT * FROM (SELECT * FROM here UNION ALL SELECT * FROM remote) x
	ORDER BY x.study_date NULLS LAST, x.study_instance_uid, x.series_instance_uid,
			 x.location <> 'local', x.location, x.tier, x.document_id;
END;
$$;
-- mdd: what the DICOM C-MOVE and C-GET services send, and where to

-- Where the C-MOVE destination with this AE title listens.  It must be a
-- registered node with a host and port that mdd may send to, whatever
-- mdd.accept_unknown_nodes says: an archive sends patient data only to
-- places it was told about.
CREATE FUNCTION mdd._dicom_destination(ae_title text, OUT host text, OUT port integer)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	n mdd.node;
BEGIN
	SELECT * INTO n FROM mdd.node x
	WHERE x.ae_title = _dicom_destination.ae_title AND x.host IS NOT NULL AND x.port IS NOT NULL
	ORDER BY x.may_send DESC, x.id LIMIT 1;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'move destination "%" is not a node with a host and port', ae_title
			USING ERRCODE = '42704', HINT = 'Register it with mdd.add_node.';
	END IF;
	IF NOT n.may_send THEN
		RAISE EXCEPTION 'move destination "%" is a node mdd may not send to', ae_title
			USING ERRCODE = '42704', HINT = 'Its node option "send" is false.';
	END IF;
	host := n.host;
	port := n.port;
END;
$$;

-- The DICOM objects a C-MOVE or C-GET identifier selects, in the order they
-- are sent.  The identifier must hold the unique key of its level, without
-- wildcards.  Each request is written to the audit trail.
CREATE FUNCTION mdd._dicom_retrieve(operation text, model text, level text, keys jsonb,
									destination text, calling_ae text, peer text)
RETURNS TABLE(object_id bigint, sop_class_uid text, sop_instance_uid text,
			  transfer_syntax_uid text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	q record := mdd._match_query(model, level, keys, true);
	unique_key text := (ARRAY['PatientID', 'StudyInstanceUID', 'SeriesInstanceUID',
							  'SOPInstanceUID'])[q.lvl + 1];
	n bigint;
	ids bigint[];
	patients text[];
BEGIN
	IF coalesce(btrim(keys->>unique_key), '') = '' OR keys->>unique_key ~ '[*?]' THEN
		RAISE EXCEPTION '% at level % needs the % of what to send, without wildcards',
			operation, level, unique_key
			USING ERRCODE = '22023';
	END IF;
	-- one matching pass: the objects in sending order, and their patients
	EXECUTE format('SELECT array_agg(o.id ORDER BY o.series, o.id), array_agg(DISTINCT p.patient_id) %s'
				   ' AND o.kind = ''dicom''', q.from_where)
	INTO ids, patients;
	n := coalesce(cardinality(ids), 0);
	RETURN QUERY
	SELECT o.id, o.sop_class_uid, o.sop_instance_uid, o.transfer_syntax_uid
	FROM unnest(ids) WITH ORDINALITY AS x(id, pos) JOIN mdd.object o ON o.id = x.id
	ORDER BY x.pos;
	INSERT INTO mdd.audit (role, action, patient_id, detail, client)
	VALUES (mdd._caller(), lower(operation),
			CASE WHEN cardinality(patients) = 1 THEN patients[1] END,
			format('%s level %s %s: %s objects to %s', operation, level, keys, n,
				   coalesce(destination, calling_ae)),
			format('%s@%s', calling_ae, peer));
END;
$$;

-- The stored bytes of one object for a C-MOVE or C-GET, checked against
-- their SHA-256 so that nothing corrupt ever leaves the archive.
CREATE FUNCTION mdd._dicom_fetch(object_id bigint) RETURNS bytea
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
	SELECT mdd._fetch(object_id, true)
$$;

-- An audit row for a DICOM peer (a refused C-MOVE or C-GET, say).
CREATE FUNCTION mdd._dicom_audit(action text, detail text, calling_ae text, peer text)
RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
	INSERT INTO mdd.audit (role, action, detail, client)
	VALUES (mdd._caller(), action, detail, format('%s@%s', calling_ae, peer))
$$;
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
	PERFORM mdd._audit((SELECT kind FROM mdd.job x WHERE x.id = _job_fail.job) || ' failed',
					   NULL, NULL, format('job %s: %s', job, message));
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
	PERFORM mdd._audit(j.kind || CASE WHEN j.failed > 0 THEN ' failed' ELSE ' done' END, NULL, NULL,
					   format('job %s: %s', j.id, what), j.client);
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
	PERFORM mdd._audit(kind || ' requested', NULL, NULL,
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
	SELECT mdd._caller(), j.kind, o.id, p.patient_id, format('job %s: to storage %s', j.id, target.name),
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
			PERFORM mdd._audit('verify failed', it.object, it.patient_id,
							   format('job %s: copy on storage %s of %s: %s', j.id, s.name,
									  it.sop_instance_uid, chk.problem), j.client);
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
-- mdd: mdd.send, C-STORE of archived objects to a DICOM node, as a job of
-- the durable queue (sql/jobs.sql; mdd._job_step hands send jobs to
-- mdd._send_step)
--
-- Each step of a send job takes the next batch of its pending objects,
-- opens one association to the node (extension/send.c), and for each
-- object reads its bytes from whichever copy is present, checked against
-- its SHA-256 (mdd._read_verified), and sends them by C-STORE: the data set
-- exactly as stored when the node accepted the stored transfer syntax, or
-- converted to an uncompressed syntax it accepted when the object is
-- uncompressed.  What each object came to is committed with the step, so
-- that a job resumed after a restart sends only what is still pending.

-- where a send job sends to
ALTER TABLE mdd.job ADD COLUMN node integer REFERENCES mdd.node(id);

-- The order objects go out in, so that a receiver that checks references
-- has what a plan refers to before the plan: images and other objects
-- first, then structure sets, plans, doses, and treatment records.
CREATE FUNCTION mdd._send_rank(sop_class_uid text) RETURNS integer
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
	SELECT CASE sop_class_uid
		WHEN '1.2.840.10008.5.1.4.1.1.481.3' THEN 1	-- RT Structure Set
		WHEN '1.2.840.10008.5.1.4.1.1.481.5' THEN 2	-- RT Plan
		WHEN '1.2.840.10008.5.1.4.1.1.481.8' THEN 2	-- RT Ion Plan
		WHEN '1.2.840.10008.5.1.4.1.1.481.2' THEN 3	-- RT Dose
		ELSE CASE WHEN sop_class_uid LIKE '1.2.840.10008.5.1.4.1.1.481.%' THEN 4 ELSE 0 END
	END
$$;

-- Queue a job sending these objects to the node of that name (a send
-- rule's run may have none to send: its job ends at once).
CREATE FUNCTION mdd._queue_send(ids bigint[], node text) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	n mdd.node;
	doc bigint;
	patients text[];
	job bigint;
BEGIN
	SELECT * INTO n FROM mdd.node x WHERE x.name = _queue_send.node;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'node "%" does not exist', coalesce(_queue_send.node, 'NULL')
			USING ERRCODE = '42704', HINT = 'See mdd.nodes.';
	END IF;
	IF n.host IS NULL OR n.port IS NULL THEN
		RAISE EXCEPTION 'node "%" has no host and port to send to', n.name
			USING ERRCODE = '22023';
	END IF;
	IF NOT n.may_send THEN
		RAISE EXCEPTION 'node "%" may not receive objects from this archive', n.name
			USING ERRCODE = '42501', HINT = 'Its node option "send" is false.';
	END IF;
	SELECT o.id INTO doc FROM mdd.object o WHERE o.id = ANY (ids) AND o.kind <> 'dicom'
	ORDER BY o.id LIMIT 1;
	IF FOUND THEN
		RAISE EXCEPTION 'object % is a document, not a DICOM object', doc
			USING ERRCODE = '22023', DETAIL = 'Only DICOM objects can be sent to a node.';
	END IF;

	INSERT INTO mdd.job (kind, node, created_by, client, total)
	VALUES ('send', n.id, mdd._caller(),
			coalesce(host(inet_client_addr()) || ':' || inet_client_port(), 'local'),
			cardinality(ids))
	RETURNING id INTO job;
	INSERT INTO mdd.job_item (job, object) SELECT job, x FROM unnest(ids) x;
	SELECT array_agg(DISTINCT p.patient_id) INTO patients
	FROM mdd.object o JOIN mdd.patient p ON p.id = o.patient WHERE o.id = ANY (ids);
	PERFORM mdd._audit('send requested', NULL,
					   CASE WHEN cardinality(patients) = 1 THEN patients[1] END,
					   format('job %s: %s objects to node %s (%s at %s:%s)', job, cardinality(ids),
							  n.name, n.ae_title, n.host, n.port));
	PERFORM mdd._wake_runners();
	RETURN job;
END;
$$;

-- mdd.send: queue a job sending objects to a node by C-STORE.  With
-- include_related, every object of mdd.related of each object goes too.
CREATE FUNCTION mdd.send(object_ids bigint[], node text, include_related boolean DEFAULT false)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF NOT EXISTS (SELECT 1 FROM mdd.node x WHERE x.name = send.node) THEN
		RAISE EXCEPTION 'node "%" does not exist', coalesce(send.node, 'NULL')
			USING ERRCODE = '42704', HINT = 'See mdd.nodes.';
	END IF;
	RETURN mdd._queue_send(mdd._closure(object_ids, coalesce(include_related, false)), node);
END;
$$;
COMMENT ON FUNCTION mdd.send(bigint[], text, boolean) IS
	'Queue a job sending objects (any tier) to a DICOM node by C-STORE; returns the job id';

CREATE FUNCTION mdd._send_open(ae_title text, host text, port integer, sop_classes text[],
							   transfer_syntaxes text[]) RETURNS text
	AS 'MODULE_PATHNAME', 'mdd_send_open_sql' LANGUAGE C VOLATILE;

CREATE FUNCTION mdd._send_object(data bytea, sop_class_uid text, sop_instance_uid text,
								 transfer_syntax_uid text,
								 OUT outcome text, OUT status integer, OUT detail text)
	AS 'MODULE_PATHNAME', 'mdd_send_object_sql' LANGUAGE C VOLATILE;

CREATE FUNCTION mdd._send_close(release boolean) RETURNS void
	AS 'MODULE_PATHNAME', 'mdd_send_close_sql' LANGUAGE C VOLATILE;

-- One step of a send job, called by mdd._job_step with the job's row
-- locked: the next batch (job options batch, default 100 objects, and
-- batch_bytes, default 64 MB) on one association.  Returns 'more',
-- 'wait' (the association failed: tried again later) or 'finished'.
--
-- An object that cannot be read, is corrupt, fits no context the node
-- accepted, or that the node answers with a failure status fails alone;
-- the others go on.  A node that cannot be reached raises its error
-- (class 08), which mdd._job_error retries with back-off; an association
-- that fails half way keeps what was sent and is retried the same way.
CREATE FUNCTION mdd._send_step(j mdd.job) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	batch int := coalesce((j.options->>'batch')::int, 100);
	batch_bytes bigint := coalesce((j.options->>'batch_bytes')::bigint, 64 * 1024 * 1024);
	n mdd.node;
	it record;
	ids bigint[] := '{}';
	pairs text[] := '{}';
	classes text[] := '{}';
	syntaxes text[] := '{}';
	sum_bytes bigint := 0;
	refused text;
	data bytea;
	failure text;
	r record;
	sent bigint[] := '{}';
	failures int := 0;
	written bigint := 0;
	broken text;
BEGIN
	IF j.state NOT IN ('queued', 'running') THEN
		-- cancelled or failed: nothing is half done between steps
		UPDATE mdd.job x SET finished_at = coalesce(x.finished_at, now()), next_attempt_at = NULL
		WHERE x.id = j.id;
		RETURN 'finished';
	END IF;
	SELECT * INTO n FROM mdd.node x WHERE x.id = j.node;
	IF n.host IS NULL OR n.port IS NULL OR NOT n.may_send THEN
		PERFORM mdd._job_fail(j.id, format('node %s may no longer be sent to (no host and port, or option "send" false)',
										   n.name));
		RETURN 'finished';
	END IF;

	-- the batch: bounded in objects and bytes, and in the presentation
	-- contexts it needs (60 SOP class and transfer syntax pairs, with an
	-- uncompressed fallback each, stay within the 128 an association has)
	FOR it IN SELECT o.id, o.size, o.sop_class_uid, o.transfer_syntax_uid
			  FROM mdd.job_item i JOIN mdd.object o ON o.id = i.object
			  WHERE i.job = j.id AND i.state = 'pending'
			  ORDER BY mdd._send_rank(o.sop_class_uid), o.series, o.id
	LOOP
		EXIT WHEN cardinality(ids) >= batch OR (cardinality(ids) > 0 AND sum_bytes + it.size > batch_bytes);
		IF NOT (it.sop_class_uid || ' ' || it.transfer_syntax_uid) = ANY (pairs) THEN
			EXIT WHEN cardinality(pairs) >= 60;
			pairs := pairs || (it.sop_class_uid || ' ' || it.transfer_syntax_uid);
			classes := classes || it.sop_class_uid;
			syntaxes := syntaxes || it.transfer_syntax_uid;
		END IF;
		ids := ids || it.id;
		sum_bytes := sum_bytes + it.size;
	END LOOP;

	IF cardinality(ids) = 0 THEN
		-- every object sent or failed: the job ends
		PERFORM mdd._job_end(j, format('%s objects sent to node %s, %s failed', j.done, n.name, j.failed));
		RETURN 'finished';
	END IF;

	UPDATE mdd.job_item i SET batch = j.batches + 1 WHERE i.job = j.id AND i.object = ANY (ids);
	UPDATE mdd.job x SET batches = j.batches + 1 WHERE x.id = j.id;
	refused := mdd._send_open(n.ae_title, n.host, n.port, classes, syntaxes);
	IF refused IS NOT NULL THEN
		-- the node takes none of these SOP classes in any syntax offered
		UPDATE mdd.job_item i
		SET state = 'failed',
			error = format('node %s accepts no presentation context for SOP class %s in %s%s: %s',
						   n.name, o.sop_class_uid, o.transfer_syntax_uid,
						   CASE WHEN o.transfer_syntax_uid IN ('1.2.840.10008.1.2', '1.2.840.10008.1.2.1',
															   '1.2.840.10008.1.2.2')
								THEN ' or another uncompressed syntax' ELSE '' END, refused)
		FROM mdd.object o
		WHERE i.job = j.id AND i.object = ANY (ids) AND o.id = i.object;
		UPDATE mdd.job x SET failed = x.failed + cardinality(ids), attempts = 0,
			   error = NULL WHERE x.id = j.id;
		RETURN 'more';
	END IF;

	FOR it IN SELECT o.id, o.size, o.sop_class_uid, o.sop_instance_uid, o.transfer_syntax_uid
			  FROM unnest(ids) WITH ORDINALITY AS b(id, pos) JOIN mdd.object o ON o.id = b.id
			  ORDER BY b.pos
	LOOP
		failure := NULL;
		BEGIN
			data := mdd._read_verified(it.id, NULL);
		EXCEPTION WHEN OTHERS THEN
			IF mdd._transient(SQLSTATE) THEN
				RAISE;
			END IF;
			failure := format('%s (SQLSTATE %s)', SQLERRM, SQLSTATE);
		END;
		IF failure IS NULL THEN
			SELECT * INTO r FROM mdd._send_object(data, it.sop_class_uid, it.sop_instance_uid,
											   it.transfer_syntax_uid);
			data := NULL;
			IF r.outcome = 'broken' THEN
				broken := r.detail;
				EXIT;
			ELSIF r.outcome = 'sent' THEN
				sent := sent || it.id;
				written := written + it.size;
				IF r.status <> 0 THEN
					UPDATE mdd.job_item i
					SET error = format('node %s answered warning status 0x%s%s', n.name,
									   upper(lpad(to_hex(r.status), 4, '0')), ': ' || r.detail)
					WHERE i.job = j.id AND i.object = it.id;
				END IF;
			ELSIF r.outcome = 'refused' THEN
				failure := format('node %s answered C-STORE status 0x%s%s', n.name,
								  upper(lpad(to_hex(r.status), 4, '0')), ': ' || r.detail);
			ELSE
				failure := format('cannot be sent to node %s: %s', n.name, r.detail);
			END IF;
		END IF;
		IF failure IS NOT NULL THEN
			UPDATE mdd.job_item i SET state = 'failed', error = failure
			WHERE i.job = j.id AND i.object = it.id;
			failures := failures + 1;
		END IF;
	END LOOP;
	PERFORM mdd._send_close(broken IS NULL);

	-- the bookkeeping of the batch, once
	UPDATE mdd.job_item i SET state = 'done' WHERE i.job = j.id AND i.object = ANY (sent);
	UPDATE mdd.job x SET done = x.done + cardinality(sent), failed = x.failed + failures,
		   bytes = x.bytes + written
	WHERE x.id = j.id;
	INSERT INTO mdd.audit (role, action, object_id, patient_id, detail, client)
	SELECT mdd._caller(), 'send', o.id, p.patient_id,
		   format('job %s: to node %s (%s at %s:%s)', j.id, n.name, n.ae_title, n.host, n.port),
		   j.client
	FROM unnest(sent) s(id) JOIN mdd.object o ON o.id = s.id JOIN mdd.patient p ON p.id = o.patient;

	IF broken IS NOT NULL THEN
		-- what was answered is kept; the rest is tried again later, and a
		-- step that got nothing through counts as one more failed attempt
		IF cardinality(sent) + failures > 0 THEN
			UPDATE mdd.job x SET attempts = 0 WHERE x.id = j.id;
		END IF;
		PERFORM mdd._job_retry(j.id, '08006',
							   format('the association with node %s (%s at %s:%s) failed: %s',
									  n.name, n.ae_title, n.host, n.port, broken));
		RETURN 'wait';
	END IF;
	UPDATE mdd.job x SET attempts = 0, error = NULL
	WHERE x.id = j.id AND (x.attempts > 0 OR x.error IS NOT NULL);
	RETURN 'more';
END;
$$;
-- mdd: Storage Commitment (Push Model, PS3.4 annex J) as SCP.  A modality
-- or PACS that sent objects asks mdd, by N-ACTION, to take responsibility
-- for them; mdd answers, on an association of its own, with an
-- N-EVENT-REPORT listing those it holds and those it does not.  Once mdd
-- reports an instance committed, the sender may delete its own copy: the
-- object is in the catalog with a verified copy (an object is committed
-- before its C-STORE is answered).
--
-- The listener (extension/dicom_commit.cpp) hands the request to
-- mdd._dicom_commit, which decides at once what is held and queues the
-- report as a job of kind 'commit'; a job runner sends it, again after a
-- failure, so that a requester that is down for a while still hears.

-- The request of a node: which instances are held, queued as the report
-- job; returns the job.  Failure reasons: 0x0112 no such object instance,
-- 0x0119 class-instance conflict (held under another SOP class).
CREATE FUNCTION mdd._dicom_commit(calling_ae text, peer text, transaction_uid text,
								  sop_classes text[], sop_instances text[])
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	n mdd.node;
	reasons integer[];
	missing integer;
	job bigint;
BEGIN
	IF transaction_uid !~ '^[0-9]+(\.[0-9]+)*$' OR length(transaction_uid) > 64 THEN
		RAISE EXCEPTION 'invalid Transaction UID "%"', transaction_uid USING ERRCODE = '22023';
	END IF;
	IF cardinality(sop_classes) IS DISTINCT FROM cardinality(sop_instances) OR cardinality(sop_classes) = 0 THEN
		RAISE EXCEPTION 'a storage commitment request needs one SOP class per instance, at least one'
			USING ERRCODE = '22023';
	END IF;
	-- the node that asked, as admission found it: its AE title, from its host
	SELECT * INTO n FROM mdd.node x
	WHERE x.ae_title = calling_ae AND x.host IS NOT NULL AND x.port IS NOT NULL
	ORDER BY (x.host = peer OR (x.host = 'localhost' AND peer IN ('127.0.0.1', '::1'))) DESC, x.id
	LIMIT 1;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'storage commitment from "%": no node with this AE title has a host and port for the report',
			calling_ae
			USING ERRCODE = '42704', HINT = 'Register it with mdd.add_node, or give it a host and port with mdd.alter_node.';
	END IF;

	SELECT array_agg(CASE WHEN o.id IS NULL THEN 274			-- 0x0112
						  WHEN o.sop_class_uid <> r.cls THEN 281	-- 0x0119
						  ELSE 0 END ORDER BY r.pos)
	INTO reasons
	FROM unnest(sop_classes, sop_instances) WITH ORDINALITY AS r(cls, inst, pos)
	LEFT JOIN mdd.object o ON o.sop_instance_uid = r.inst;
	missing := (SELECT count(*) FROM unnest(reasons) x WHERE x <> 0);

	INSERT INTO mdd.job (kind, node, created_by, client, total, options)
	VALUES ('commit', n.id, mdd._caller(), format('%s@%s', calling_ae, peer), cardinality(reasons),
			jsonb_build_object('transaction_uid', transaction_uid, 'sop_classes', to_jsonb(sop_classes),
							   'sop_instances', to_jsonb(sop_instances), 'reasons', to_jsonb(reasons),
							   'max_attempts', 10))
	RETURNING id INTO job;
	PERFORM mdd._audit('commitment requested', NULL, NULL,
					   format('job %s: transaction %s from node %s: %s instances, %s not held',
							  job, transaction_uid, n.name, cardinality(reasons), missing),
					   format('%s@%s', calling_ae, peer));
	PERFORM mdd._wake_runners();
	RETURN job;
END;
$$;

-- The report, sent by C (extension/commit.c, dicom_commit.cpp).
CREATE FUNCTION mdd._commit_report(ae_title text, host text, port integer, transaction_uid text,
								   sop_classes text[], sop_instances text[], reasons integer[])
RETURNS void
	AS 'MODULE_PATHNAME', 'mdd_commit_report_sql' LANGUAGE C VOLATILE;

-- The step of a commit job: send the report to the node; a failure is
-- raised and retried (class 08) until the job's max_attempts.
CREATE FUNCTION mdd._commit_step(j mdd.job) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	n mdd.node;
	reasons integer[] := ARRAY(SELECT x::integer FROM jsonb_array_elements_text(j.options->'reasons') x);
	missing integer := (SELECT count(*) FROM unnest(reasons) x WHERE x <> 0);
BEGIN
	IF j.state NOT IN ('queued', 'running') THEN
		UPDATE mdd.job x SET finished_at = coalesce(x.finished_at, now()), next_attempt_at = NULL
		WHERE x.id = j.id;
		RETURN 'finished';
	END IF;
	SELECT * INTO n FROM mdd.node x WHERE x.id = j.node;
	IF n.host IS NULL OR n.port IS NULL THEN
		PERFORM mdd._job_fail(j.id, format('node %s has no host and port any more for the report', n.name));
		RETURN 'finished';
	END IF;
	PERFORM mdd._commit_report(n.ae_title, n.host, n.port, j.options->>'transaction_uid',
							   ARRAY(SELECT jsonb_array_elements_text(j.options->'sop_classes')),
							   ARRAY(SELECT jsonb_array_elements_text(j.options->'sop_instances')),
							   reasons);
	UPDATE mdd.job x SET done = x.total, attempts = 0, error = NULL WHERE x.id = j.id;
	PERFORM mdd._job_end(j, format('transaction %s reported to node %s: %s instances committed, %s not',
								   j.options->>'transaction_uid', n.name, cardinality(reasons) - missing,
								   missing));
	RETURN 'finished';
END;
$$;
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
		SELECT mdd._caller(), 'retrieve', h.id, p.patient_id,
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
		PERFORM mdd._audit('retrieve' || CASE WHEN n_failed > 0 THEN ' failed' ELSE ' done' END, NULL, NULL,
						   format('job %s: %s instances of %s from node %s: %s retrieved, %s already here, %s failed',
								  j.id, j.total, mdd._fetch_what(j.request), n.name, n_fetched, n_here, n_failed),
						   j.client);
	ELSE
		PERFORM mdd._audit('move' || CASE WHEN n_failed > 0 THEN ' failed' ELSE ' done' END, NULL, NULL,
						   format('job %s: %s instances of %s from node %s to node %s: %s sent, %s failed',
								  j.id, j.total, mdd._fetch_what(j.request), n.name, d.name, n_fetched, n_failed),
						   j.client);
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
								OUT classes text[])
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
	IF whole_study AND pending <= batch AND NOT j.request ? 'series' AND NOT j.request ? 'instance' THEN
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
			IF s.whole AND NOT j.request ? 'instance' THEN
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
			FOR c IN 0 .. (cardinality(take) - 1) / 100 LOOP
				chunk := take[c * 100 + 1 : c * 100 + 100];
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
			VALUES (mdd._caller(), 'move',
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
-- mdd: dose-volume histograms of the ROIs of a structure set over a dose grid

-- The C side (extension/dvh.c): reads both objects from their bytes and
-- computes one row per ROI.  The ids only name the objects in messages.
CREATE FUNCTION mdd._dvh(dose_id bigint, dose bytea, structure_set_id bigint,
						 structure_set bytea, bin_width double precision)
RETURNS TABLE(roi_number integer, roi_name text, volume_cc double precision,
			  min_gy double precision, mean_gy double precision, max_gy double precision,
			  d95_gy double precision, dose_gy double precision[],
			  volume_pct double precision[], d2_gy double precision,
			  d50_gy double precision, d98_gy double precision,
			  v20_pct double precision, voxels bigint)
AS 'MODULE_PATHNAME', 'mdd_dvh_sql'
LANGUAGE C STRICT VOLATILE;

-- Cumulative DVH of each ROI of an RT Structure Set over an RT Dose, from
-- the stored bytes of both (any storage, any tier), with dicompyler-core's
-- method (see docs/sql.md).
CREATE FUNCTION mdd.dvh(dose_id bigint, structure_set_id bigint,
						bin_width_gy double precision DEFAULT 0.01)
RETURNS TABLE(roi_number integer, roi_name text, volume_cc double precision,
			  min_gy double precision, mean_gy double precision, max_gy double precision,
			  d95_gy double precision, dose_gy double precision[],
			  volume_pct double precision[], d2_gy double precision,
			  d50_gy double precision, d98_gy double precision,
			  v20_pct double precision, voxels bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	want constant text[] := ARRAY['1.2.840.10008.5.1.4.1.1.481.2', '1.2.840.10008.5.1.4.1.1.481.3'];
	label constant text[] := ARRAY['RT Dose', 'RT Structure Set'];
	ids bigint[] := ARRAY[dose_id, structure_set_id];
	cls text;
	modality text;
	patient text;
BEGIN
	IF dose_id IS NULL OR structure_set_id IS NULL OR bin_width_gy IS NULL THEN
		RAISE EXCEPTION 'dose id, structure set id and bin width must not be NULL'
			USING ERRCODE = '22004';
	END IF;
	IF NOT (bin_width_gy > 0 AND bin_width_gy < 'infinity') THEN
		RAISE EXCEPTION 'bin width % Gy is not a positive number', bin_width_gy
			USING ERRCODE = '22023';
	END IF;
	FOR i IN 1 .. 2 LOOP
		SELECT o.sop_class_uid, se.modality INTO cls, modality
		FROM mdd.object o LEFT JOIN mdd.series se ON se.id = o.series
		WHERE o.id = ids[i];
		IF NOT FOUND THEN
			RAISE EXCEPTION 'object % does not exist', ids[i] USING ERRCODE = '42704';
		END IF;
		IF cls IS DISTINCT FROM want[i] THEN
			RAISE EXCEPTION 'object % is not an %', ids[i], label[i]
				USING ERRCODE = '22023',
					  DETAIL = format('Its modality is %s and its SOP Class UID %s.',
									  coalesce(modality, 'none'), coalesce(cls, 'none'));
		END IF;
	END LOOP;

	RETURN QUERY
	SELECT * FROM mdd._dvh(dose_id, mdd._fetch(dose_id, false),
						   structure_set_id, mdd._fetch(structure_set_id, false),
						   bin_width_gy);

	FOR i IN 1 .. 2 LOOP
		SELECT p.patient_id INTO patient
		FROM mdd.object o JOIN mdd.patient p ON p.id = o.patient WHERE o.id = ids[i];
		PERFORM mdd._audit('dvh', ids[i], patient,
						   format('dose %s, structure set %s', dose_id, structure_set_id));
	END LOOP;
END;
$$;
COMMENT ON FUNCTION mdd.dvh(bigint, bigint, double precision) IS
	'Cumulative dose-volume histogram and dose statistics of each ROI of an RT Structure Set over an RT Dose';
-- mdd: what pg_dump keeps.  The tables of an extension are left out of a
-- dump unless marked as configuration; every table of the catalog is, with
-- its sequence, so that pg_dump (with the large objects it dumps anyway)
-- and pg_restore bring back the whole archive: catalog, copies, nodes,
-- rules, jobs and the audit trail.  The storage row 'online' is made by
-- CREATE EXTENSION itself (sql/storage.sql marks mdd.storage accordingly).
-- A test checks that no table of the extension is left unmarked.

DO $$
DECLARE
	rel regclass;
BEGIN
	-- one call a statement: each updates the extension's row
	FOR rel IN SELECT format('mdd.%I', t)::regclass
			   FROM unnest(ARRAY['patient', 'study', 'series', 'object', 'reference', 'copy', 'node',
								 'job', 'job_item', 'job_instance', 'rule', 'delivered', 'audit']) t
	LOOP
		PERFORM pg_catalog.pg_extension_config_dump(rel, '');
	END LOOP;
	-- the sequences of their serial columns, so that new ids follow the restored ones
	FOR rel IN SELECT s.oid::regclass
			   FROM pg_catalog.pg_class s
			   JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_class'::regclass
										  AND d.objid = s.oid AND d.deptype = 'a'
			   JOIN pg_catalog.pg_class t ON t.oid = d.refobjid
			   WHERE s.relkind = 'S' AND t.relnamespace = 'mdd'::regnamespace
	LOOP
		PERFORM pg_catalog.pg_extension_config_dump(rel, '');
	END LOOP;
END;
$$;
-- mdd: roles and privileges.  Everything runs through SECURITY DEFINER
-- functions and views; the tables themselves are private.

DO $$
BEGIN
	IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'mdd_reader') THEN
		CREATE ROLE mdd_reader NOLOGIN;
	END IF;
	IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'mdd_operator') THEN
		CREATE ROLE mdd_operator NOLOGIN IN ROLE mdd_reader;
	END IF;
	IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'mdd_admin') THEN
		CREATE ROLE mdd_admin NOLOGIN IN ROLE mdd_operator;
	END IF;
END;
$$;

REVOKE ALL ON ALL TABLES IN SCHEMA mdd FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA mdd FROM PUBLIC;
GRANT USAGE ON SCHEMA mdd TO mdd_reader;

-- readers: search, read, reports
GRANT SELECT ON mdd.objects, mdd.storages, mdd.nodes, mdd.jobs, mdd.rules TO mdd_reader;
GRANT EXECUTE ON FUNCTION mdd.read(bigint, boolean), mdd.related(bigint),
	mdd.parse(bytea), mdd.dvh(bigint, bigint, double precision),
	mdd.find(text, text, text, text, text, text, text, text[], interval),
	mdd.patient_list(text, boolean) TO mdd_reader;

-- operators: bring objects in, send them out
GRANT EXECUTE ON FUNCTION mdd.store(bytea, text), mdd.store_file(text, text),
	mdd.import(text), mdd.store_document(text, bytea, text, text, text, text),
	mdd.export(bigint, text, boolean, boolean), mdd.echo(text),
	mdd.archive(bigint[], text, boolean), mdd.restore(bigint[], boolean),
	mdd.wait(bigint, interval), mdd.cancel(bigint), mdd.verify(text), mdd.verify_storage(text, interval),
	mdd.preview_rule(text, boolean), mdd.run_rule(text, boolean),
	mdd.send(bigint[], text, boolean), mdd.retrieve(text, text, text, text),
	mdd.move(text, text, text, text, text) TO mdd_operator;

-- administrators: storages, the audit trail, the catalog tables for reports
GRANT EXECUTE ON FUNCTION mdd.add_storage(text, text, text, jsonb), mdd.alter_storage(text, jsonb),
	mdd.drop_storage(text),
	mdd.add_node(text, text, text, integer, jsonb), mdd.alter_node(text, text, text, integer, jsonb),
	mdd.drop_node(text),
	mdd.create_rule(text, text, text, text, text, time, time, integer, boolean, text),
	mdd.drop_rule(text), mdd.purge_jobs(interval) TO mdd_admin;
GRANT SELECT ON mdd.audit_log, mdd.patient, mdd.study, mdd.series, mdd.object,
	mdd.reference, mdd.copy, mdd.node, mdd.job, mdd.job_item, mdd.job_instance, mdd.rule, mdd.delivered TO mdd_admin;
