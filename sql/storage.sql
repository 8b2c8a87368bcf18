-- mdd: storages and the copies of each object's bytes they hold

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

-- mdd.add_storage: declare a storage.  kind 'file' takes options
-- {"root": "/absolute/dir", "fanout": 2}; the root must exist, be writable
-- by the server and lie under mdd.allowed_paths for non-superusers.
CREATE FUNCTION mdd.add_storage(name text, kind text, tier text, options jsonb DEFAULT '{}')
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	root text;
	fanout int;
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
	options := coalesce(options, '{}');
	IF jsonb_typeof(options) <> 'object' THEN
		RAISE EXCEPTION 'storage options must be a JSON object' USING ERRCODE = '22023';
	END IF;
	CASE kind
	WHEN 'large_object' THEN
		NULL;
	WHEN 'file' THEN
		root := options->>'root';
		IF root IS NULL THEN
			RAISE EXCEPTION 'file storage "%" needs option "root"', name
				USING ERRCODE = '22023', HINT = 'For example {"root": "/srv/mdd/archive"}.';
		END IF;
		root := mdd._check_directory(root, true);
		fanout := coalesce((options->>'fanout')::int, 2);
		IF fanout NOT BETWEEN 0 AND 4 THEN
			RAISE EXCEPTION 'option "fanout" of storage "%" must be between 0 and 4', name
				USING ERRCODE = '22023';
		END IF;
		options := options || jsonb_build_object('root', root, 'fanout', fanout);
	WHEN 'http', 's3' THEN
		RAISE EXCEPTION 'storage kind "%" is not available in this version of mdd', kind
			USING ERRCODE = '0A000';
	ELSE
		RAISE EXCEPTION 'unknown storage kind "%"', kind
			USING ERRCODE = '22023',
				  HINT = 'Use ''large_object'', ''file'', ''http'' or ''s3''.';
	END CASE;
	INSERT INTO mdd.storage (name, kind, tier, options)
	VALUES (add_storage.name, add_storage.kind, add_storage.tier, options);
EXCEPTION WHEN unique_violation THEN
	RAISE EXCEPTION 'storage "%" already exists', add_storage.name USING ERRCODE = '42710';
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

-- Write bytes of object obj to storage s; returns the locator.
CREATE FUNCTION mdd._put(s mdd.storage, obj bigint, digest bytea, data bytea) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	hex text := encode(digest, 'hex');
	fanout int;
	loc text := '';
BEGIN
	CASE s.kind
	WHEN 'large_object' THEN
		RETURN lo_from_bytea(0, data)::text;
	WHEN 'file' THEN
		fanout := (s.options->>'fanout')::int;
		FOR i IN 1..fanout LOOP
			loc := loc || substr(hex, 2 * i - 1, 2) || '/';
		END LOOP;
		loc := loc || obj || '-' || substr(hex, 1, 16);
		PERFORM mdd._file_put(s.options->>'root', loc, data);
		RETURN loc;
	ELSE
		RAISE EXCEPTION 'storage kind "%" cannot be written', s.kind USING ERRCODE = '0A000';
	END CASE;
END;
$$;

-- Read the bytes a copy holds.
CREATE FUNCTION mdd._get(s mdd.storage, locator text) RETURNS bytea
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	CASE s.kind
	WHEN 'large_object' THEN
		RETURN lo_get(locator::oid);
	WHEN 'file' THEN
		RETURN mdd._file_get(s.options->>'root', locator);
	ELSE
		RAISE EXCEPTION 'storage kind "%" cannot be read', s.kind USING ERRCODE = '0A000';
	END CASE;
END;
$$;
