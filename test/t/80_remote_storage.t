#!/usr/bin/python3
# The remote storage kinds against real servers that test/run starts: http
# (nginx with WebDAV) and s3 (s3rver behind scripts/peers/s3-server.js, which
# checks signatures V4, x-amz-content-sha256 and Content-MD5 like S3), path
# style and virtual-host style, with and without zstd compression.
#
# Objects stored there read back byte-identical; the blobs are on the
# servers at mdd._locator's place, compressed when the storage says so; a
# blob that does not decompress, or claims more than its object's size, is
# XX001 naming storage and locator; mdd._delete removes a blob once; the S3
# server refuses a wrong Content-MD5 and mdd's own PUTs carry the right one;
# wrong credentials are 42501 and no credential is in a message, the view or
# a log; a stopped or silent server is class 08 naming the storage; HTTP 507
# and a full capacity are 53100 and store nothing; read-only storages refuse
# writes; a transaction that aborts takes its blobs with it.
import glob
import json
import os
import socket
import subprocess
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from mddtap import *  # noqa: E402,F403

test_dir = env("MDD_TEST_DIR")
top = env("MDD_TOP")
allowed = os.path.join(test_dir, "allowed")

peer_vars = ("MDD_HTTP_URL", "MDD_HTTP_BASE", "MDD_HTTP_ROOT", "MDD_HTTP_DIR", "MDD_HTTP_PORT",
             "MDD_S3_ENDPOINT", "MDD_S3_VHOST_ENDPOINT", "MDD_S3_DIR", "MDD_S3_PORT", "MDD_S3_BUCKET",
             "MDD_S3_VHOST_BUCKET", "MDD_S3_ACCESS_KEY_ID", "MDD_S3_SECRET_ACCESS_KEY", "MDD_S3_REGION",
             "MDD_DAV_USER", "MDD_DAV_PASSWORD")
missing = [v for v in peer_vars if not os.environ.get(v)]
if not ok(not missing, "test/run started the WebDAV and S3 peers",
          f"    missing: {' '.join(missing)}; {os.environ.get('MDD_PEER_ERRORS', '')}"):
    done_testing()
    sys.exit(0)
E = {v: os.environ[v] for v in peer_vars}
http_base = E["MDD_HTTP_BASE"]
dav_root = E["MDD_HTTP_ROOT"]
s3_data = os.path.join(E["MDD_S3_DIR"], "data")
KEY, SECRET = E["MDD_S3_ACCESS_KEY_ID"], E["MDD_S3_SECRET_ACCESS_KEY"]
DAV_PASSWORD = E["MDD_DAV_PASSWORD"]
WRONG_SECRET = "wrong-" + os.urandom(10).hex()
WRONG_KEY = "MDDWRONG" + os.urandom(4).hex().upper()
WRONG_DAV_PASSWORD = "wrong-dav-" + os.urandom(6).hex()
CREDENTIALS = (KEY, SECRET, DAV_PASSWORD, WRONG_SECRET, WRONG_KEY, WRONG_DAV_PASSWORD)

conn = connect()
t_start = time.monotonic()


def s3_options(**extra):
    o = {"endpoint": E["MDD_S3_ENDPOINT"], "bucket": E["MDD_S3_BUCKET"], "region": E["MDD_S3_REGION"],
         "access_key_id": KEY, "secret_access_key": SECRET}
    o.update(extra)
    return o


def add_storage(name, kind, options, tier="archive"):
    e = sql_error(conn, "SELECT mdd.add_storage(%s, %s, %s, %s)", (name, kind, tier, json.dumps(options)))
    ok(e is None, f"mdd.add_storage creates {kind} storage {name}", describe_error(e))


def storage_row(name):
    return query_one(conn, "SELECT * FROM mdd.storages WHERE name = %s", (name,))


def blob_path(name, locator):
    """Where the server keeps the blob of a copy (nginx's root, s3rver's directory)."""
    s = query_one(conn, "SELECT kind, options FROM mdd.storage WHERE name = %s", (name,))
    o = s["options"]
    if s["kind"] == "http":
        return os.path.join(dav_root, o["url"][len(http_base):], locator)
    prefix = o.get("prefix", "")
    return os.path.join(s3_data, o["bucket"], prefix, locator) + "._S3rver_object"


def copies_of(name):
    return dict(query(conn, """SELECT c.object, c.locator FROM mdd.copy c JOIN mdd.storage s ON s.id = c.storage
                               WHERE s.name = %s AND c.state = 'present'""", (name,)))


def zstd_decompress(data):
    return subprocess.run(["zstd", "-d", "-c", "-q"], input=data, stdout=subprocess.PIPE, check=True).stdout


def zstd_compress(data):
    """A zstd frame that records its content size, as mdd's own do."""
    return subprocess.run(["zstd", "-q", "-c", f"--stream-size={len(data)}"], input=data,
                          stdout=subprocess.PIPE, check=True).stdout


def import_patient(storage, patient, seed):
    src = make_server_dir(os.path.join(allowed, f"p80-{patient.lower()}"), mode=0o755)
    generate_patient(src, patient, seed, slices=3)
    execute(conn, "SET mdd.default_storage = %s", (storage,))
    rows = query_dicts(conn, "SELECT * FROM mdd.import(%s)", (src,))
    execute(conn, "RESET mdd.default_storage")
    objs = {r["object_id"]: r["path"] for r in rows if r["object_id"] is not None}
    errors = [f"{os.path.basename(r['path'])}: {r['error']}" for r in rows
              if r["error"] is not None and not r["path"].endswith((".pdf", ".json"))]
    ok(not errors and len(objs) == 46, f"{storage}: the {len(objs)} DICOM objects of {patient} are imported",
       "\n".join(errors[:5]))
    return objs


# ---------------------------------------------------------------------------
# storages of every remote flavour

add_storage("tap80dav", "http", {"url": E["MDD_HTTP_URL"] + "tap80"})
add_storage("tap80davz", "http", {"url": E["MDD_HTTP_URL"] + "tap80z/", "compression": "zstd"})
add_storage("tap80s3", "s3", s3_options(prefix="tap80/plain"))
add_storage("tap80s3v", "s3", s3_options(endpoint=E["MDD_S3_VHOST_ENDPOINT"], bucket=E["MDD_S3_VHOST_BUCKET"],
                                         path_style=False, compression="zstd", level=5))
add_storage("tap80dava", "http", {"url": http_base + "auth/tap80/", "username": E["MDD_DAV_USER"],
                                  "password": DAV_PASSWORD})
add_storage("tap80strict", "http", {"url": http_base + "strict/"})

is_(storage_row("tap80s3v")["options"],
    {"endpoint": E["MDD_S3_VHOST_ENDPOINT"], "bucket": E["MDD_S3_VHOST_BUCKET"], "region": E["MDD_S3_REGION"],
     "path_style": False, "compression": "zstd", "level": 5, "fanout": 2, "timeout": 30},
    "mdd.storages shows the options of an s3 storage, completed, without its keys")
is_(storage_row("tap80dava")["options"],
    {"url": http_base + "auth/tap80/", "username": E["MDD_DAV_USER"], "fanout": 2, "timeout": 30},
    "and of an http storage without its password")

# bad options: 22023 naming the option, never echoing a secret.  (PostgreSQL
# itself logs the text of a failing statement, so these use throwaway values.)
THROWAWAY = "throwaway-" + os.urandom(6).hex()
for opts, option in (({"url": f"http://user:{THROWAWAY}@127.0.0.1/dav/"}, "url"),
                     ({"url": E["MDD_HTTP_URL"], "pasword": THROWAWAY}, "pasword"),
                     ({"url": E["MDD_HTTP_URL"], "password": THROWAWAY}, "password"),
                     ({"url": E["MDD_HTTP_URL"], "compression": "gzip"}, "compression"),
                     ({"url": E["MDD_HTTP_URL"], "compression": "zstd", "level": 99}, "level"),
                     ({"url": E["MDD_HTTP_URL"], "capacity": -5}, "capacity"),
                     ({"url": E["MDD_HTTP_URL"], "timeout": "soon"}, "timeout"),
                     ({"url": E["MDD_HTTP_URL"], "read_only": "yes"}, "read_only")):
    e = raises(conn, "SELECT mdd.add_storage('tap80bad', 'http', 'archive', %s)", (json.dumps(opts),),
               "22023", f"http option {option}: refused with 22023 naming it", f'"{option}"')
    unlike(e and str(e), THROWAWAY, "  and the error shows no password")
for change, option in (({"secret_access_key": None}, "secret_access_key"),
                       ({"bucket": "Not_A_Bucket"}, "bucket"),
                       ({"endpoint": "http://127.0.0.1:9/path"}, "endpoint"),
                       ({"endpoint": f"http://key:{THROWAWAY}@127.0.0.1:9"}, "endpoint"),
                       ({"endpoint": "http://127.0.0.1:9", "path_style": False}, "path_style"),
                       ({"prefix": "../up"}, "prefix"),
                       ({"region": "Mars 1"}, "region")):
    opts = s3_options(access_key_id="THROWAWAYKEY", secret_access_key=THROWAWAY)
    opts.update(change)
    opts = {k: v for k, v in opts.items() if v is not None}
    e = raises(conn, "SELECT mdd.add_storage('tap80bad', 's3', 'archive', %s)", (json.dumps(opts),),
               "22023", f"s3 option {option}: refused with 22023 naming it", f'"{option}"')
    unlike(e and str(e), THROWAWAY, "  and the error shows no secret")
raises(conn, "SELECT mdd.add_storage('tap80bad', 'large_object', 'archive', '{\"compression\": \"zstd\"}')",
       None, "22023", "large-object storages are not compressed", '"compression"')
is_(query_value(conn, "SELECT count(*) FROM mdd.storages WHERE name = 'tap80bad'"), 0, "no bad storage was added")

# ---------------------------------------------------------------------------
# store, read back, find the blobs on the servers

patients = {"tap80dav": ("TAP80D", 801), "tap80davz": ("TAP80Z", 802),
            "tap80s3": ("TAP80S", 803), "tap80s3v": ("TAP80V", 804)}
stored = {}
for name, (patient, seed) in patients.items():
    stored[name] = import_patient(name, patient, seed)

for name, objs in stored.items():
    compressed = name in ("tap80davz", "tap80s3v")
    sums = {oid: sha256_file(p) for oid, p in objs.items()}
    rows = dict(query(conn, "SELECT id, storage FROM mdd.objects WHERE id = ANY(%s)", (list(objs),)))
    is_(set(rows.values()), {name}, f"{name}: mdd.objects places every object there")
    bad = [oid for oid, s in query(conn, "SELECT id, encode(sha256(mdd.read(id, true)), 'hex') "
                                         "FROM unnest(%s::bigint[]) id", (list(objs),)) if s != sums[oid]]
    is_(bad, [], f"{name}: mdd.read(id, verify => true) gives back the original bytes of all {len(objs)}")
    locs = copies_of(name)
    want = dict(query(conn, """SELECT o.id, mdd._locator(s, o.id, o.sha256) FROM mdd.object o, mdd.storage s
                               WHERE s.name = %s AND o.id = ANY(%s)""", (name, list(objs))))
    is_(locs, want, f"{name}: each copy is at mdd._locator's place")
    ok(all(l.endswith(".zst") == compressed for l in locs.values()),
       f"{name}: locators {'end' if compressed else 'do not end'} in .zst")
    missing_blobs, wrong_blobs = [], []
    for oid, loc in locs.items():
        path = blob_path(name, loc)
        if not os.path.isfile(path):
            missing_blobs.append(path)
            continue
        with open(path, "rb") as fh:
            blob = fh.read()
        if (zstd_decompress(blob) if compressed else blob) != open(objs[oid], "rb").read():
            wrong_blobs.append(path)
    ok(not missing_blobs, f"{name}: the server holds a blob for every copy", "\n".join(missing_blobs[:3]))
    ok(not wrong_blobs, f"{name}: each holds its object's bytes" + (" (zstd -d)" if compressed else ""),
       "\n".join(wrong_blobs[:3]))
    row = storage_row(name)
    is_((row["objects"], row["bytes"]), (len(objs), sum(os.path.getsize(p) for p in objs.values())),
        f"{name}: mdd.storages counts {len(objs)} objects and their bytes")

# compression: smaller for a CT, a zstd frame
ct = sorted(oid for oid, p in stored["tap80davz"].items() if "/ct/" in p)[0]
loc = copies_of("tap80davz")[ct]
with open(blob_path("tap80davz", loc), "rb") as fh:
    blob = fh.read()
original = os.path.getsize(stored["tap80davz"][ct])
ok(blob[:4] == bytes.fromhex("28b52ffd"), "a compressed blob starts with the zstd frame magic number")
ok(len(blob) < 0.8 * original, "a compressed CT slice is smaller than the original",
   f"    {len(blob)} bytes for {original}")
total_stored = sum(os.path.getsize(blob_path("tap80s3v", l)) for l in copies_of("tap80s3v").values())
ok(total_stored < storage_row("tap80s3v")["bytes"],
   "the compressed s3 storage holds fewer bytes than it stores (mdd.storages counts the original bytes)",
   f"    {total_stored} on the server for {storage_row('tap80s3v')['bytes']}")

# one signed GET of the S3 API outside mdd finds the object too
s3_ct = sorted(oid for oid, p in stored["tap80s3"].items() if "/ct/" in p)[0]
got = subprocess.run(["curl", "-s", "-f", "--aws-sigv4", f"aws:amz:{E['MDD_S3_REGION']}:s3", "--user", f"{KEY}:{SECRET}",
                      "-H", "x-amz-content-sha256: " + sha256_bytes(b""),
                      f"{E['MDD_S3_ENDPOINT']}/{E['MDD_S3_BUCKET']}/tap80/plain/{copies_of('tap80s3')[s3_ct]}"],
                     stdout=subprocess.PIPE).stdout
is_(sha256_bytes(got), sha256_file(stored["tap80s3"][s3_ct]), "a signed S3 GET by curl returns the object's bytes")

# WebDAV with basic authentication, and a server that needs MKCOL
pdf = os.path.join(allowed, "p80-tap80d", "document.pdf")
for name in ("tap80dava", "tap80strict"):
    execute(conn, "SET mdd.default_storage = %s", (name,))
    e = sql_error(conn, "SELECT mdd.store_document('TAP80D', %s, %s)", (open(pdf, "rb").read(), f"{name}.pdf"))
    execute(conn, "RESET mdd.default_storage")
    ok(e is None, f"{name}: a document is stored", describe_error(e))
    doc, loc = (list(copies_of(name).items()) or [(None, None)])[0]
    ok(doc is not None and os.path.isfile(blob_path(name, loc)), f"{name}: its blob is on the server")
    is_(query_value(conn, "SELECT encode(sha256(mdd.read(%s, true)), 'hex')", (doc,)), sha256_file(pdf),
        f"{name}: it reads back")
ok(os.path.isdir(os.path.join(dav_root, "strict", loc.split("/")[0])),
   "tap80strict: the collections above the blob were made with MKCOL (the server does not make them)")

# ---------------------------------------------------------------------------
# damaged compressed blobs: XX001 naming storage and locator


def get_error(name, locator):
    return sql_error(conn, "SELECT mdd._get(s, %s) FROM mdd.storage s WHERE s.name = %s", (locator, name))


victim = sorted(stored["tap80davz"])[5]
vloc = copies_of("tap80davz")[victim]
vpath = blob_path("tap80davz", vloc)
saved = open(vpath, "rb").read()
try:
    with open(vpath, "wb") as fh:
        fh.write(saved[:4] + bytes(len(saved) - 4))
    e = get_error("tap80davz", vloc)
    is_(e and e.pgcode, "XX001", "a compressed blob that does not decompress: XX001")
    like(e and e.diag.message_primary, rf'{vloc}.*"tap80davz"', "naming the blob and the storage")
    e = sql_error(conn, "SELECT mdd.read(%s, true)", (victim,))
    is_(e and e.pgcode, "XX001", "mdd.read of its object fails with XX001 too")

    big = zstd_compress(bytes(os.path.getsize(stored["tap80davz"][victim]) + 1))
    with open(vpath, "wb") as fh:
        fh.write(big)
    e = get_error("tap80davz", vloc)
    is_(e and e.pgcode, "XX001", "a zstd frame claiming more than the object's catalog size: XX001")
    like(e and e.diag.message_primary, r"claims \d+ bytes, more than the \d+ expected", "  saying so")
    with open(vpath, "wb") as fh:
        fh.write(b"plain bytes, no frame")
    e = get_error("tap80davz", vloc)
    like(e and e.diag.message_primary, "not zstd-compressed", "a blob without the magic number: XX001, not compressed")
finally:
    with open(vpath, "wb") as fh:
        fh.write(saved)
is_(get_error("tap80davz", vloc), None, "repaired, it reads again")

huge = zstd_compress(bytes(4 << 20))
e = sql_error(conn, "SELECT mdd._zstd_decompress(%s, NULL, 'x', 'y')", (huge,))
ok(e is None, "without a catalog size, a 4 MiB frame decompresses (only the 1 GiB bound applies)",
   describe_error(e))
e = sql_error(conn, "SELECT mdd._zstd_decompress(%s, 1000, 'x', 'y')", (huge,))
is_(e and e.pgcode, "XX001", "with a catalog size of 1000 bytes it is refused before decompressing")

# ---------------------------------------------------------------------------
# mdd._locator, mdd._put and mdd._delete outside the catalog

file_root = make_server_dir(os.path.join(allowed, "tap80files"))
add_storage("tap80files", "file", {"root": file_root, "compression": "zstd"})
payload = os.urandom(1000) + bytes(30000)
digest = bytes.fromhex(sha256_bytes(payload))
for name in ("tap80dav", "tap80davz", "tap80s3", "tap80s3v", "tap80strict", "tap80files", "online"):
    loc = query_value(conn, "SELECT mdd._put(s, 99999999, %s, %s) FROM mdd.storage s WHERE s.name = %s",
                      (digest, payload, name))
    expect_loc = query_value(conn, "SELECT mdd._locator(s, 99999999, %s) FROM mdd.storage s WHERE s.name = %s",
                             (digest, name))
    if name != "online":
        is_(loc, expect_loc, f"{name}: mdd._put writes at mdd._locator's place")
    else:
        is_(expect_loc, None, "online: mdd._locator is NULL for large objects")
    back = query_value(conn, "SELECT mdd._get(s, %s) FROM mdd.storage s WHERE s.name = %s", (loc, name))
    is_(bytes(back) == payload, True, f"{name}: mdd._get gives the bytes back")
    if name not in ("online", "tap80files"):
        ok(os.path.isfile(blob_path(name, loc)), f"{name}: the blob is on the server")
    is_(query_value(conn, "SELECT mdd._delete(s, %s) FROM mdd.storage s WHERE s.name = %s", (loc, name)), True,
        f"{name}: mdd._delete removes it (true)")
    is_(query_value(conn, "SELECT mdd._delete(s, %s) FROM mdd.storage s WHERE s.name = %s", (loc, name)), False,
        f"{name}: a second mdd._delete finds nothing (false)")
    if name not in ("online", "tap80files"):
        ok(not os.path.exists(blob_path(name, loc)), f"{name}: the blob is gone from the server")
        e = get_error(name, loc)
        is_(e and e.pgcode, "58P01", f"{name}: mdd._get of a missing blob: 58P01")
ok(not glob.glob(os.path.join(file_root, "**", "99999999-*"), recursive=True),
   "tap80files: no blob is left in the file storage")

# ---------------------------------------------------------------------------
# the checksums the S3 server checks

s3_plain = "SELECT s FROM mdd.storage s WHERE s.name = 'tap80s3'"
e = sql_error(conn, f"SELECT mdd._remote_put(s, 'checks/wrong-md5', %s, %s) FROM ({s3_plain}) x",
              (payload, bytes(16)))
is_(e and e.pgcode, "58030", "a PUT with a wrong Content-MD5 (test hook) is refused by the S3 server: 58030")
like(e and e.diag.message_primary, r"HTTP status 400 \(BadDigest\)", "  the server said BadDigest")
is_(query_value(conn, f"SELECT mdd._remote_head(s, 'checks/wrong-md5') FROM ({s3_plain}) x"), None,
    "  and stored nothing")
body = b"no checksum"
r = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PUT", "--data-binary", "@-",
                    "--aws-sigv4", f"aws:amz:{E['MDD_S3_REGION']}:s3", "--user", f"{KEY}:{SECRET}",
                    "-H", "x-amz-content-sha256: " + sha256_bytes(body),
                    f"{E['MDD_S3_ENDPOINT']}/{E['MDD_S3_BUCKET']}/checks/no-md5"],
                   input=body, stdout=subprocess.PIPE)
is_(r.stdout.decode(), "400", "the S3 server refuses a PUT without Content-MD5 (so every PUT of mdd above had one)")
r = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PUT", "--data-binary", "@-",
                    "-H", "Content-MD5: " + __import__("base64").b64encode(__import__("hashlib").md5(body).digest()).decode(),
                    "--aws-sigv4", f"aws:amz:{E['MDD_S3_REGION']}:s3", "--user", f"{KEY}:{SECRET}",
                    "-H", "x-amz-content-sha256: " + sha256_bytes(b"other bytes"),
                    f"{E['MDD_S3_ENDPOINT']}/{E['MDD_S3_BUCKET']}/checks/bad-sha"],
                   input=body, stdout=subprocess.PIPE)
is_(r.stdout.decode(), "400", "and one whose x-amz-content-sha256 does not match the body")

# ---------------------------------------------------------------------------
# wrong credentials: 42501, and no credential anywhere

add_storage("tap80s3badsecret", "s3", s3_options(secret_access_key=WRONG_SECRET))
add_storage("tap80s3badkey", "s3", s3_options(access_key_id=WRONG_KEY))
add_storage("tap80davbad", "http", {"url": http_base + "auth/tap80/", "username": E["MDD_DAV_USER"],
                                    "password": WRONG_DAV_PASSWORD})
errors = []
before = query_value(conn, "SELECT count(*) FROM mdd.object")
for name, said in (("tap80s3badsecret", "SignatureDoesNotMatch"), ("tap80s3badkey", "InvalidAccessKeyId"),
                   ("tap80davbad", "HTTP status 401")):
    execute(conn, "SET mdd.default_storage = %s", (name,))
    e = raises(conn, "SELECT mdd.store_document('TAP80D', %s, %s)", (b"%PDF-1.4 credentials", f"{name}.pdf"),
               "42501", f"{name}: storing fails with 42501", rf'storage "{name}".*{said}')
    execute(conn, "RESET mdd.default_storage")
    if e is not None:
        errors.append(e)
        like(e.diag.message_hint, "credentials", f"{name}: the hint says to check the credentials")
is_(query_value(conn, "SELECT count(*) FROM mdd.object"), before, "nothing was stored by the refused writes")
texts = "\n".join(" | ".join(str(x) for x in (e.diag.message_primary, e.diag.message_detail, e.diag.message_hint,
                                               e.diag.context, e.pgerror)) for e in errors)
leaked = [c for c in CREDENTIALS if c in texts]
is_(leaked, [], "no credential in any error (message, detail, hint, context)")
view = json.dumps(query_dicts(conn, "SELECT * FROM mdd.storages"), default=str)
is_([c for c in CREDENTIALS if c in view], [], "no credential in mdd.storages")
ok(all(k not in view for k in ('"password"', '"secret_access_key"', '"access_key_id"')),
   "mdd.storages has no password, secret_access_key or access_key_id option")

# ---------------------------------------------------------------------------
# a transaction that aborts takes its blobs with it

aconn = connect(autocommit=False)
cur = aconn.cursor()
cur.execute("SET LOCAL mdd.default_storage = 'tap80s3'")
cur.execute("SELECT mdd.store_document('TAP80D', %s, 'rollback.pdf')", (b"%PDF-1.4 to be rolled back",))
doc = cur.fetchone()[0]
cur.execute("""SELECT c.locator FROM mdd.copy c JOIN mdd.storage s ON s.id = c.storage
               WHERE c.object = %s AND s.name = 'tap80s3'""", (doc,))
rloc = cur.fetchone()[0]
ok(os.path.isfile(blob_path("tap80s3", rloc)), "a document stored in an open transaction is on the S3 server")
aconn.rollback()
aconn.close()
ok(not os.path.exists(blob_path("tap80s3", rloc)), "after ROLLBACK its blob is gone from the server")

# ---------------------------------------------------------------------------
# capacity, 507, read-only


def blobs_under(path):
    return sorted(p for p in glob.glob(os.path.join(path, "**", "*"), recursive=True) if os.path.isfile(p))


first = b"%PDF-1.4 fits " + os.urandom(50000)
second = b"%PDF-1.4 too much " + os.urandom(60000)
add_storage("tap80cap", "http", {"url": E["MDD_HTTP_URL"] + "tap80cap/", "capacity": len(first) + 1000})
cap_dir = os.path.join(dav_root, "dav", "tap80cap")
execute(conn, "SET mdd.default_storage = 'tap80cap'")
cdoc = query_value(conn, "SELECT mdd.store_document('TAP80D', %s, 'fits.pdf')", (first,))
ok(cdoc is not None, "tap80cap: an object within the capacity is stored")
before = (query_value(conn, "SELECT count(*) FROM mdd.object"), blobs_under(cap_dir))
e = raises(conn, "SELECT mdd.store_document('TAP80D', %s, 'too-much.pdf')", (second,),
           "53100", "tap80cap: an object beyond the capacity is refused with 53100", 'storage "tap80cap" is full')
is_((query_value(conn, "SELECT count(*) FROM mdd.object"), blobs_under(cap_dir)), before,
    "tap80cap: and nothing is stored: no catalog row, no blob")
execute(conn, "RESET mdd.default_storage")
row = storage_row("tap80cap")
is_((row["objects"], row["bytes"]), (1, len(first)), "mdd.storages: one object and its bytes")
execute(conn, "SELECT mdd.alter_storage('tap80cap', '{\"capacity\": null}')")
execute(conn, "SET mdd.default_storage = 'tap80cap'")
e = sql_error(conn, "SELECT mdd.store_document('TAP80D', %s, 'now-fits.pdf')", (second,))
execute(conn, "RESET mdd.default_storage")
ok(e is None, "after mdd.alter_storage removes the capacity it is stored", describe_error(e))

add_storage("tap80full", "http", {"url": http_base + "full/"})
add_storage("tap80busy", "http", {"url": http_base + "busy/"})
for name, state, what in (("tap80full", "53100", "HTTP 507 Insufficient Storage"),
                          ("tap80busy", "08006", "HTTP 503")):
    execute(conn, "SET mdd.default_storage = %s", (name,))
    raises(conn, "SELECT mdd.store_document('TAP80D', %s, 'x.pdf')", (b"%PDF-1.4 " + name.encode(),), state,
           f"{what}: {state}", rf'storage "{name}"')
    execute(conn, "RESET mdd.default_storage")

add_storage("tap80ro", "http", {"url": E["MDD_HTTP_URL"] + "tap80ro/", "read_only": True})
is_(storage_row("tap80ro")["read_only"], True, "a storage added with read_only shows it in mdd.storages")
execute(conn, "SET mdd.default_storage = 'tap80ro'")
raises(conn, "SELECT mdd.store_document('TAP80D', %s, 'ro.pdf')", (b"%PDF-1.4 read-only",), "25006",
       "storing into a read-only storage is refused (25006)", "read-only")
execute(conn, "RESET mdd.default_storage")
raises(conn, "SELECT mdd._put(s, 99999998, %s, %s) FROM mdd.storage s WHERE s.name = 'tap80ro'", (digest, payload),
       "25006", "mdd._put refuses it too")
raises(conn, "SELECT mdd._delete(s, 'ab/cd/1-x') FROM mdd.storage s WHERE s.name = 'tap80ro'", None,
       "25006", "and so does mdd._delete")
ok(not os.path.exists(os.path.join(dav_root, "dav", "tap80ro")), "nothing was written for it on the server")
execute(conn, "SELECT mdd.alter_storage('tap80ro', '{\"read_only\": false}')")
execute(conn, "SET mdd.default_storage = 'tap80ro'")
e = sql_error(conn, "SELECT mdd.store_document('TAP80D', %s, 'rw.pdf')", (b"%PDF-1.4 now writable",))
execute(conn, "RESET mdd.default_storage")
ok(e is None, "mdd.alter_storage(name, '{\"read_only\": false}') makes it writable", describe_error(e))
execute(conn, "SELECT mdd.alter_storage('tap80ro', '{\"read_only\": true}')")
is_(storage_row("tap80ro")["read_only"], True, "and '{\"read_only\": true}' read-only again")
raises(conn, "SELECT mdd.alter_storage('tap80dav', %s)", (json.dumps({"url": E["MDD_HTTP_URL"] + "elsewhere/"}),),
       "55000", "the url of a storage holding copies cannot change", '"url"')

# ---------------------------------------------------------------------------
# servers that are down or silent: class 08 naming the storage

one_dav = sorted(stored["tap80dav"])[0]
one_s3 = sorted(stored["tap80s3v"])[0]
subprocess.run([os.path.join(top, "scripts", "peers", "nginx-dav.sh"), "stop", E["MDD_HTTP_DIR"]], check=True)
subprocess.run([os.path.join(top, "scripts", "peers", "s3.sh"), "stop", E["MDD_S3_DIR"]], check=True)
try:
    for name, oid in (("tap80dav", one_dav), ("tap80s3v", one_s3)):
        e = raises(conn, "SELECT mdd.read(%s)", (oid,), ("08001", "08006"),
                   f"{name}: reading while its server is stopped fails with class 08")
        like(e and e.diag.message_primary, rf'storage "{name}"', "  naming the storage")
        like(e and e.diag.message_primary, r"^GET \S+ on storage", "  the method and the blob")
        before = query_value(conn, "SELECT count(*) FROM mdd.object")
        execute(conn, "SET mdd.default_storage = %s", (name,))
        raises(conn, "SELECT mdd.store_document('TAP80D', %s, 'down.pdf')", (b"%PDF-1.4 down " + name.encode(),),
               ("08001", "08006"), f"{name}: storing while its server is stopped fails with class 08")
        execute(conn, "RESET mdd.default_storage")
        is_(query_value(conn, "SELECT count(*) FROM mdd.object"), before, f"{name}: and stores nothing")
finally:
    subprocess.run([os.path.join(top, "scripts", "peers", "nginx-dav.sh"), "start", E["MDD_HTTP_DIR"],
                    E["MDD_HTTP_PORT"]], check=True)
    subprocess.run([os.path.join(top, "scripts", "peers", "s3.sh"), "start", E["MDD_S3_DIR"], E["MDD_S3_PORT"]],
                   check=True)
is_([sql_error(conn, "SELECT mdd.read(%s, true)", (o,)) for o in (one_dav, one_s3)], [None, None],
    "once the servers are back, the objects read again")

# a server that accepts connections and never answers
silent = socket.socket()
silent.bind(("127.0.0.1", 0))
silent.listen(8)
silent_url = f"http://127.0.0.1:{silent.getsockname()[1]}/"
add_storage("tap80silent", "http", {"url": silent_url, "timeout": 1})
add_storage("tap80silent60", "http", {"url": silent_url, "timeout": 60})
t0 = time.monotonic()
e = raises(conn, "SELECT mdd._put(s, 99999997, %s, %s) FROM mdd.storage s WHERE s.name = 'tap80silent'",
           (digest, payload), "08006", "a server that does not answer: 08006 after the storage's timeout",
           r'storage "tap80silent".*timed out')
ok(time.monotonic() - t0 < 5, "  within a few seconds", f"    {time.monotonic() - t0:.1f} s")
execute(conn, "SET statement_timeout = '1s'")
t0 = time.monotonic()
raises(conn, "SELECT mdd._put(s, 99999997, %s, %s) FROM mdd.storage s WHERE s.name = 'tap80silent60'",
       (digest, payload), "57014", "a query cancel (statement_timeout) stops a stuck transfer")
ok(time.monotonic() - t0 < 4, "  at once, not after the 60 s timeout", f"    {time.monotonic() - t0:.1f} s")
execute(conn, "RESET statement_timeout")
silent.close()

# ---------------------------------------------------------------------------
# no credential in the logs

logs = {"PostgreSQL server log": os.path.join(env("MDD_DATADIR"), "server.log"),
        "S3 server log": os.path.join(E["MDD_S3_DIR"], "s3.log"),
        "nginx access log": os.path.join(E["MDD_HTTP_DIR"], "access.log"),
        "nginx error log": os.path.join(E["MDD_HTTP_DIR"], "error.log")}
for what, path in logs.items():
    with open(path, "rb") as fh:
        text = fh.read().decode("utf-8", "replace")
    is_([c for c in CREDENTIALS if c in text], [], f"no credential in the {what}")
with open(logs["PostgreSQL server log"], encoding="utf-8", errors="replace") as fh:
    pglog = fh.read()
like(pglog, r'storage "tap80s3badsecret"', "(the server log does hold the 42501 errors, without them)")

ok(time.monotonic() - t_start < 120, "the test took less than 2 minutes", f"    {time.monotonic() - t_start:.0f} s")
conn.close()
done_testing()
