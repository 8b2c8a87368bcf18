#!/usr/bin/python3
# The documentation is tested:
#   1. every setting the C code defines (DefineCustom*Variable("mdd....")) is
#      documented in docs/admin.md;
#   2. every public function of schema mdd (no leading underscore) and every
#      view is documented in docs/ (sql.md, or the page its subject has);
#   3. every ```sql example of docs/*.md and README.md runs (those of
#      docs/emr.md build on each other: test/t/91_emr.t runs them), each in a
#      transaction that is rolled back, on a cluster with the demo's patient
#      (scripts/demo.sh with a small CT, plus the storages and nodes the
#      examples name; one that adds a node or storage runs without it): a block whose info string is "sql no-run" is left out
#      (it needs paths, servers or ids of a real installation) and must say
#      why on the line before it: <!-- no-run: reason -->;
#   4. the DICOM conformance statement names every SOP class and transfer
#      syntax UID that the C++ side names (DCMTK's UID_ constants and UID
#      strings; the storage SOP classes taken from DCMTK's list as a whole
#      are not checked one by one).
import glob
import os
import re
import subprocess
import sys

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from mddtap import *  # noqa: E402,F403

test_dir = env("MDD_TEST_DIR")
top = env("MDD_TOP")
PORT = int(env("PGPORT")) + 122
demo = os.path.join(test_dir, "demo99")


def read(path):
    with open(os.path.join(top, path), encoding="utf-8") as fh:
        return fh.read()


docs = {p: read(p) for p in sorted(glob.glob("docs/*.md", root_dir=top)) + ["README.md"]}
all_docs = "\n".join(docs.values())

# ------------------------------------------------------------ 1. settings
sources = {p: read(p) for p in glob.glob("extension/*.c", root_dir=top) + glob.glob("bgworker/*.c", root_dir=top)}
gucs = sorted({m for text in sources.values()
               for m in re.findall(r'DefineCustom\w+Variable\(\s*"(mdd\.[a-z_]+)"', text)})
ok(len(gucs) >= 10, f"the C code defines {len(gucs)} settings", gucs)
admin = docs["docs/admin.md"]
missing = [g for g in gucs if not re.search(r"`" + re.escape(g) + r"`", admin)]
is_(missing, [], "every setting is documented in docs/admin.md (as `mdd.name`)")

# ------------------------------------------------- the demo's cluster
environ = dict(os.environ, MDD_DEMO_DIR=demo, MDD_DEMO_PORT=str(PORT), MDD_DEMO_SLICES="10",
               MDD_DEMO_NO_BUILD="1")
try:
    p = subprocess.run([os.path.join(top, "scripts", "demo.sh")], cwd=top, env=environ,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    ok(p.returncode == 0, "the demo's cluster is ready", p.stdout.decode("utf-8", "replace")[-2000:])
    conn = connect(port=PORT)

    # ------------------------------------------------------ 2. functions
    public = [r[0] for r in query(conn, """
        SELECT DISTINCT p.proname::text FROM pg_proc p
        WHERE p.pronamespace = 'mdd'::regnamespace AND p.proname !~ '^_' ORDER BY 1""")]
    views = [r[0] for r in query(conn, """
        SELECT c.relname::text FROM pg_class c
        WHERE c.relnamespace = 'mdd'::regnamespace AND c.relkind = 'v' ORDER BY 1""")]
    ok(len(public) >= 30, f"schema mdd has {len(public)} public functions")
    missing = [f for f in public if not re.search(r"mdd\." + re.escape(f) + r"\b", all_docs)]
    is_(missing, [], "every public function is documented in docs/ (as mdd.name)")
    missing = [v for v in views if not re.search(r"mdd\." + re.escape(v) + r"\b", all_docs)]
    is_(missing, [], "every view is documented in docs/")

    # ------------------------------------------------------- 3. examples
    # the names the examples use, beside the demo's (its node "pacs" among
    # them, stopped by now): storages, nodes (on a port where nothing
    # listens), and not the demo's rule, which the examples create
    for name in ("vault", "cloud", "old-nas"):
        d = os.path.join(demo, "fixture-" + name)
        os.makedirs(d, exist_ok=True)
        if os.getuid() == 0:
            subprocess.run(["chown", "postgres:", d], check=True)
        execute(conn, "SELECT mdd.add_storage(%s, 'file', %s, jsonb_build_object('root', %s::text))",
                (name, "online" if name == "old-nas" else "archive", d))
    execute(conn, "SELECT mdd.drop_rule('cbct-after-course')")
    execute(conn, "ALTER SYSTEM SET mdd.archive_storage = 'demo_archive'")
    execute(conn, "SELECT pg_reload_conf()")
    for name, ae in (("tps", "TPS1"), ("pacs1", "PACS1"), ("pacs2", "PACS2"), ("oldpacs", "OLDPACS")):
        execute(conn, "SELECT mdd.add_node(%s, %s, '127.0.0.1', %s)", (name, ae, PORT + 4))
    fence = re.compile(r"^```sql([^\n]*)\n(.*?)^```", re.M | re.S)
    ran = skipped = 0
    for path, text in docs.items():
        if path == "docs/emr.md":
            continue    # its examples build on each other: test/t/91_emr.t runs them in order
        for m in fence.finditer(text):
            info, body = m.group(1).strip(), m.group(2)
            line = text.count("\n", 0, m.start()) + 1
            if info == "no-run":
                skipped += 1
                before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
                ok(re.match(r"<!-- no-run: \S.* -->$", before), f"{path}:{line}: a block left out says why",
                   "the line before it must be <!-- no-run: reason -->", before)
                continue
            ran += 1
            # a node or storage the example adds is first removed (in the same
            # transaction): it runs as on an installation without it
            added_nodes = re.findall(r"mdd\.add_node\('([^']+)'", body)
            added_storages = re.findall(r"mdd\.add_storage\('([^']+)'", body)
            prefix = ("SELECT mdd.drop_node(name) FROM mdd.nodes WHERE name = ANY (%s);"
                      "SELECT mdd.drop_storage(name) FROM mdd.storages WHERE name = ANY (%s);") % (
                "ARRAY[" + ",".join(f"'{n}'" for n in added_nodes) + "]::text[]",
                "ARRAY[" + ",".join(f"'{n}'" for n in added_storages) + "]::text[]")
            # psql, as a user would paste it: one transaction, rolled back
            r = subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
                                "-p", str(PORT), "-U", "postgres", "-d", "postgres",
                                "-c", "BEGIN", "-c", "SET LOCAL statement_timeout = '20s'", "-c", prefix,
                                "-f", "-", "-c", "ROLLBACK"],
                               input=body.encode(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               timeout=60)
            err = r.stderr.decode("utf-8", "replace").strip()
            ok(r.returncode == 0 and "ERROR" not in err, f"{path}:{line}: the example runs",
               err[-800:], body[:400])
    ok(ran >= 20, f"{ran} examples ran, {skipped} marked no-run")
    conn.close()
finally:
    subprocess.run([os.path.join(top, "scripts", "cluster.sh"), "stop", os.path.join(demo, "pgdata")],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

# ------------------------------------------------------ 4. conformance
conformance = docs["docs/conformance.md"]
cpp = "\n".join(read(p) for p in glob.glob("extension/dicom_*.cpp", root_dir=top)
                + glob.glob("extension/dicom_*.hpp", root_dir=top))
doc_uids = set(re.findall(r"\b1\.2\.840\.10008\.[0-9.]*[0-9]\b", conformance))
ok(len(doc_uids) >= 10, f"the conformance statement names {len(doc_uids)} UIDs")
# the UID constants (DCMTK's UID_... names) the service side uses
names = set(re.findall(r"\bUID_(\w+)", cpp))
ok(names, f"the C++ side uses {len(names)} DCMTK UID constants")
dcmtk_uids = {}
header = "/usr/include/dcmtk/dcmdata/dcuid.h"
if os.path.exists(header):
    with open(header, encoding="latin-1") as fh:
        for m in re.finditer(r'#define\s+UID_(\w+)\s+"([0-9.]+)"', fh.read()):
            dcmtk_uids[m.group(1)] = m.group(2)
used = {dcmtk_uids[n] for n in names if n in dcmtk_uids}
used |= set(re.findall(r'"(1\.2\.840\.10008\.[0-9.]*[0-9])"', cpp))
# all but the DICOM application context name, which is no SOP class
missing = sorted(u for u in used if u not in doc_uids and u != "1.2.840.10008.3.1.1.1")
is_(missing, [], "every SOP class and transfer syntax the code names is in docs/conformance.md")

done_testing()
