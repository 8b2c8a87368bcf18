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
	-- the option names only: their values may be credentials
	PERFORM mdd._audit('add storage', NULL, NULL,
					   format('storage %s: %s, %s tier, options %s', add_storage.name, add_storage.kind,
							  add_storage.tier,
							  coalesce((SELECT string_agg(k, ', ' ORDER BY k) FROM jsonb_object_keys(options) k),
									   'none')));
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
	-- the option names only: their values may be credentials
	PERFORM mdd._audit('alter storage', NULL, NULL,
					   format('storage %s: options %s', s.name,
							  coalesce((SELECT string_agg(k, ', ' ORDER BY k) FROM jsonb_object_keys(options) k),
									   'none')));
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
