#!/usr/bin/python3
# The web viewer in a real browser: headless Chromium (driven through
# chromedriver, test/t/lib/browser.py) loads the page from mdd's own HTTP
# service on a private cluster (port PGPORT+111, HTTP on PGPORT+112,
# chromedriver on PGPORT+113) holding the demo patient and one other:
#   1. the patient list and search, the study tree;
#   2. the planning CT in three views, with the structure set, plan and dose;
#      the beams table against the plan file;
#   3. pixels of the axial canvas: the PTV's colour along the PTV contour of
#      the slice through the isocentre (and not there with structures off),
#      the dose wash where the dose is high, nothing added where it is zero;
#   4. the DVH plot in the ROI colours, the PDF document in the page, an
#      HTML document not shown there (it could run script in the page);
#   5. an operator's archive click makes a job the page shows finishing, and
#      the series with its RT objects is then on the archive tier; a restore
#      click brings them back; a reader's click is refused (403, audited)
#      and makes no job.
# Screenshots go to $MDD_TEST_OUTPUT/94_viewer, by default
# test/output/94_viewer in the repository.
import json
import math
import os
import shutil
import signal
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from mddtap import *  # noqa: E402,F403
import browser  # noqa: E402

import pydicom  # noqa: E402

TIME_LIMIT = 300


def _too_long(signum, frame):
    raise TimeoutError(f"94_viewer.t still running after {TIME_LIMIT} s")


signal.signal(signal.SIGALRM, _too_long)
signal.alarm(TIME_LIMIT)

why = browser.available()
if why:
    skip_all(why)

test_dir = env("MDD_TEST_DIR")
top = env("MDD_TOP")
pgport = int(env("PGPORT"))
port, http_port, driver_port = pgport + 111, pgport + 112, pgport + 113
datadir = os.path.join(test_dir, "viewer94")
work = make_server_dir(os.path.join(test_dir, "t94"), mode=0o755)
out = os.path.join(os.environ.get("MDD_TEST_OUTPUT") or os.path.join(top, "test", "output"), "94_viewer")
shutil.rmtree(out, ignore_errors=True)
os.makedirs(out)
BASE = f"http://127.0.0.1:{http_port}"
OPERATOR = ("t94_operator", "operator pass")
READER = ("t94_reader", "reader pass")

plan(28)

# --------------------------------------------------------------------------
# the cluster and its patients

generate_patient(os.path.join(work, "demo"), "RT-DEMO-001", seed=1, slices=40,
                 extra=["--patient-name", "Demo^Patient"])
generate_patient(os.path.join(work, "other"), "T94-OTHER", seed=2, slices=4,
                 extra=["--patient-name", "Other^Person", "--no-pdf"])
archive_root = make_server_dir(os.path.join(work, "archive"))
cluster("start", datadir, str(port), f"mdd.allowed_paths = '{work}'", f"mdd.http_port = {http_port}")
b = None
try:
    db = connect_when_up(port)
    execute(db, "CREATE EXTENSION mdd")
    for d in ("demo", "other"):
        execute(db, "SELECT count(*) FROM mdd.import(%s)", (os.path.join(work, d),))
    pdf_path = os.path.join(work, "demo", "document.pdf")
    pdf_size = os.path.getsize(pdf_path)
    execute(db, """SELECT mdd.store_document('RT-DEMO-001', pg_read_binary_file(%s), 'document.pdf',
                                              description => 'Treatment summary')""", (pdf_path,))
    execute(db, """SELECT mdd.store_document('RT-DEMO-001', convert_to(%s, 'UTF8'), 'note.html', 'text/html',
                                              description => 'A planted page')""",
            ("<html><script>parent.document.title = 'planted'</script></html>",))
    execute(db, "SELECT mdd.add_storage('vault94', 'file', 'archive', jsonb_build_object('root', %s::text))",
            (archive_root,))
    execute(db, f"CREATE ROLE {OPERATOR[0]} LOGIN PASSWORD %s IN ROLE mdd_operator", (OPERATOR[1],))
    execute(db, f"CREATE ROLE {READER[0]} LOGIN PASSWORD %s IN ROLE mdd_reader", (READER[1],))
    ct_series = query_value(db, """SELECT series_instance_uid FROM mdd.objects
                                   WHERE patient_id = 'RT-DEMO-001' AND series_description LIKE 'Planning CT%%'
                                   LIMIT 1""")

    # what the page must show, from the files themselves
    rtplan = pydicom.dcmread(os.path.join(work, "demo", "rtplan.dcm"))
    rtstruct = pydicom.dcmread(os.path.join(work, "demo", "rtstruct.dcm"))
    mu = {r.ReferencedBeamNumber: float(r.BeamMeterset)
          for r in rtplan.FractionGroupSequence[0].ReferencedBeamSequence}
    beams_expected = [[bm.BeamName, f"{float(bm.ControlPointSequence[0].NominalBeamEnergy):g}",
                       f"{float(bm.ControlPointSequence[0].GantryAngle):g}",
                       f"{float(bm.ControlPointSequence[0].PatientSupportAngle):g}",
                       f"{mu[bm.BeamNumber]:.1f}"] for bm in rtplan.BeamSequence]
    iso = [float(x) for x in rtplan.BeamSequence[0].ControlPointSequence[0].IsocenterPosition]
    ptv_number = next(r.ROINumber for r in rtstruct.StructureSetROISequence if r.ROIName == "PTV")
    ptv = next(c for c in rtstruct.ROIContourSequence if c.ReferencedROINumber == ptv_number)
    ptv_colour = [int(x) for x in ptv.ROIDisplayColor]
    # the PTV contour nearest the isocentre's plane
    contour = min(ptv.ContourSequence, key=lambda c: abs(float(c.ContourData[2]) - iso[2]))
    pts = [float(x) for x in contour.ContourData]
    ptv_points = [pts[i:i + 3] for i in range(0, len(pts), 3)]

    # ----------------------------------------------------------------------
    # the browser, as the operator

    b = browser.Browser(driver_port, work)
    b.basic_auth(*OPERATOR)
    b.get(f"{BASE}/")
    n = b.wait_for("return document.querySelectorAll('#patients li').length >= 2 && "
                   "document.querySelectorAll('#patients li').length", what="the patient list")
    is_(n, 2, "the page lists the patients")
    b.js("const s = document.querySelector('#search'); s.value = 'demo pat'; s.dispatchEvent(new Event('input'));")
    ids = b.wait_for("""const li = [...document.querySelectorAll('#patients li')];
                        return li.length === 1 && li.map(x => x.dataset.patientId);""", what="the search")
    is_(ids, ["RT-DEMO-001"], "searching 'demo pat' finds the demo patient only")
    b.js("document.querySelector('#patients li').click()")
    tree = b.wait_for("""const s = [...document.querySelectorAll('#tree li.series')];
                         return s.length && s.map(x => x.dataset.modality);""", what="the study tree")
    ok(sorted(set(tree)) == ["CT", "RTDOSE", "RTPLAN", "RTSTRUCT"] and tree.count("CT") == 2,
       "the study tree: planning CT, structures, plan, dose and the CBCT", repr(tree))

    b.js("document.querySelector(`#tree li.series[data-series-uid='${arguments[0]}'] a`).click()", ct_series)
    t0 = time.monotonic()
    st = b.wait_for("""const s = mddStatus();
                       return (s.error || (s.total && s.slices === s.total && s.structures && s.dose && s.plan)) && s;""",
                    timeout=120, what="the CT with its RT objects")
    load_s = time.monotonic() - t0
    ok(not st.get("error") and st["slices"] == 40, "the planning CT loads: 40 slices, structures, plan and dose",
       repr(st))
    note(f"CT (40 slices of 512x512) with structures, plan and dose loaded in {load_s:.1f} s")
    b.js("document.querySelector('#views').scrollIntoView()")
    time.sleep(0.5)
    b.screenshot(os.path.join(out, "01_views.png"))

    beams = b.js("""return [...document.querySelectorAll('#beams tbody tr')].map(tr =>
                        [...tr.children].map(td => td.textContent.trim()));""")
    got = [[r[0], r[2], r[3], r[5], r[6]] for r in beams]
    exp = [[e[0], e[1], e[2], e[3], e[4]] for e in beams_expected]
    ok(len(got) == 5 and all(g[0].startswith(e[0]) and [float(x) for x in g[1:]] == [float(x) for x in e[1:]]
                             for g, e in zip(got, exp)),
       "the beams table: name, energy, gantry, couch and MU of each beam as in the plan",
       f"page: {got}", f"plan: {exp}")
    ok(b.js("return mddViewer.plan && mddViewer.plan.beams.length === 5 && mddViewer.show.beams"),
       "the beams are drawn on the views")

    # ----------------------------------------------------------------------
    # pixels of the axial view through the isocentre

    PIXELS = """
        const [points, show] = arguments;
        const v = mddViewer.views.axial;
        Object.assign(mddViewer.show, show);
        mddViewer.renderNow();
        const ctx = v.canvas.getContext('2d');
        return points.map(p => {
            const c = v.worldToCanvas(p);
            const x = Math.round(c.x), y = Math.round(c.y);
            const d = ctx.getImageData(x - 2, y - 2, 5, 5).data;
            const px = [];
            for (let i = 0; i < d.length; i += 4) px.push([d[i], d[i + 1], d[i + 2]]);
            return {x, y, off: c.off, px};
        });"""
    b.js("mddViewer.moveTo(arguments[0])", iso)
    everything_off = {"structures": False, "dose": False, "isodose": False, "beams": False, "crosshair": False}

    def near_colour(px, rgb, tol=40):
        return any(all(abs(p[i] - rgb[i]) <= tol for i in range(3)) for p in px)

    on = b.js(PIXELS, ptv_points, dict(everything_off, structures=True))
    off = b.js(PIXELS, ptv_points, everything_off)
    hits = sum(near_colour(s["px"], ptv_colour) for s in on)
    ok(all(abs(s["off"]) < 1 for s in on) and hits >= 0.9 * len(on),
       f"the PTV's colour {ptv_colour} is drawn along its contour on the isocentre's slice",
       f"{hits} of {len(on)} contour points")
    hits_off = sum(near_colour(s["px"], ptv_colour) for s in off)
    is_(hits_off, 0, "and not there when the structures are hidden")
    b.screenshot(os.path.join(out, "02_ct_only.png"))

    # the dose: high at the isocentre, zero in the air beside the body
    body = next(r.ROINumber for r in rtstruct.StructureSetROISequence if r.ROIName == "BODY")
    bc = min(next(c for c in rtstruct.ROIContourSequence if c.ReferencedROINumber == body).ContourSequence,
             key=lambda c: abs(float(c.ContourData[2]) - iso[2]))
    bx = [float(x) for x in bc.ContourData[0::3]]
    air = [max(bx) + 15.0, 0.0, iso[2]]
    probe = [iso, [iso[0] + 4, iso[1] + 4, iso[2]], air]
    wash = b.js(PIXELS, probe, dict(everything_off, dose=True))
    plain = b.js(PIXELS, probe, everything_off)
    centre = lambda s: s["px"][12]  # noqa: E731
    r, g, bl = centre(wash[0])
    r0, g0, b0 = centre(plain[0])
    ok(r - r0 >= 40 and r > g + 40 and r > bl + 40 and r0 == g0 == b0,
       "the dose wash is red where the dose is high (the isocentre)",
       f"with wash {centre(wash[0])}, without {centre(plain[0])}")
    ok(centre(wash[1]) != centre(plain[1]), "and around it", f"{centre(wash[1])} vs {centre(plain[1])}")
    ok(wash[2]["px"] == plain[2]["px"] and all(p[0] == p[1] == p[2] for p in wash[2]["px"]),
       "nothing is added where the dose is zero (air beside the body)", repr(wash[2]["px"][:3]))
    levels = b.js("return mddViewer.isodoseLevels().map(l => l.pct)")
    ok(levels and b.js("return mddViewer.referenceDose()") == 60,
       "isodose levels are relative to the plan's prescription (60 Gy)", repr(levels))
    b.js("Object.assign(mddViewer.show, {structures: true, dose: true, isodose: true, beams: true, crosshair: true});"
         "mddViewer.renderNow();")
    b.screenshot(os.path.join(out, "03_axial_structures_dose_beams.png"))
    views = b.js("""return ['coronal', 'sagittal'].map(n => {
                        const c = mddViewer.views[n].canvas;
                        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                        let lit = 0;
                        for (let i = 0; i < d.length; i += 4) if (d[i] + d[i + 1] + d[i + 2] > 60) lit++;
                        return lit / (d.length / 4);
                    });""")
    ok(all(x > 0.05 for x in views), "the coronal and sagittal reslices show the patient", repr(views))

    # ----------------------------------------------------------------------
    # DVH and document

    b.js("document.querySelector(\"nav button[data-tab='dvh']\").click()")
    red = b.wait_for("""const c = document.querySelector('#dvh');
                        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                        let n = 0;
                        for (let i = 0; i < d.length; i += 4) if (d[i] > 200 && d[i + 1] < 60 && d[i + 2] < 60) n++;
                        return n > 100 && n;""", timeout=60, what="the DVH plot")
    ok(red > 100, "the DVH plot draws the PTV's curve in its colour", f"{red} red pixels")
    rois = b.js("return document.querySelector('#dvh-rois').textContent")
    ok(all(name in rois for name in ("BODY", "PTV", "SpinalCord", "Lung_L")), "with every ROI listed")
    b.screenshot(os.path.join(out, "04_dvh.png"))

    b.js("document.querySelector(\"#tree button[data-action='open-document']\").click()")
    size = b.wait_for("return document.querySelector('#document-frame').dataset.size", what="the document")
    is_(int(size), pdf_size, "the PDF opens in the page, all its bytes")
    time.sleep(3)  # Chromium's PDF viewer draws the page a moment later
    b.screenshot(os.path.join(out, "05_document.png"))
    b.js("""[...document.querySelectorAll("#tree li.doc")].find(li => li.textContent.includes('A planted page'))
              .querySelector('button').click()""")
    shown = b.wait_for("""const f = document.querySelector('#document-frame');
                         return f.dataset.size === arguments[0] && [f.getAttribute('src'), document.title];""",
                       str(len("<html><script>parent.document.title = 'planted'</script></html>")), what="the HTML document")
    time.sleep(0.5)
    ok(shown[0] == "about:blank" and b.js("return document.title") != "planted",
       "an HTML document is not shown in the page (it could run script there): a download only", repr(shown))

    # ----------------------------------------------------------------------
    # data management: archive by the operator

    b.js("document.querySelector(\"nav button[data-tab='data']\").click()")
    storages = b.wait_for("""const r = [...document.querySelectorAll('#storages tbody tr')].map(t => t.dataset.storage);
                             return r.length >= 2 && r;""", what="the storages")
    ok("vault94" in storages and "online" in storages, "the storages with their usage", repr(storages))
    b.js("document.querySelector(`#tree button[data-action='archive'][data-series-uid='${arguments[0]}']`).click()",
         ct_series)
    job = b.wait_for("return document.body.dataset.lastJob", what="the archive job")
    t0 = time.monotonic()
    final = b.wait_for("""const tr = document.querySelector(`#jobs tr[data-job='${arguments[0]}']`);
                          return tr && ['done', 'failed', 'cancelled'].includes(tr.dataset.state) && tr.dataset.state;""",
                       job, timeout=90, what="the job to finish")
    note(f"archive job {job} seen {final} in the page after {time.monotonic() - t0:.1f} s")
    is_(final, "done", "the operator's archive click makes a job the page shows finishing")
    seen = b.wait_for("""const t = document.querySelector(`#tree li.series[data-series-uid='${arguments[0]}'] .tier`);
                          const v = document.querySelector(\"#storages tr[data-storage='vault94']\");
                          return t && t.textContent === 'archive' && v && v.children[4].textContent === '43'
                                 && [t.textContent, v.children[4].textContent];""", ct_series,
                      timeout=30, what="the tree and storages after the job")
    ok(seen, "then the tree shows the series on the archive tier and the storage its 43 objects", repr(seen))
    b.screenshot(os.path.join(out, "06_jobs.png"))
    tiers = query_value(db, """SELECT array_agg(DISTINCT tier::text) FROM mdd.objects
                               WHERE series_instance_uid = %s
                                  OR (patient_id = 'RT-DEMO-001' AND modality IN ('RTSTRUCT', 'RTPLAN', 'RTDOSE'))""",
                        (ct_series,))
    is_(tiers, ["archive"], "the series and its structure set, plan and dose are on the archive tier")
    is_(query_value(db, "SELECT total FROM mdd.jobs WHERE id = %s", (int(job),)), 43,
        "one job for the 40 slices and the 3 RT objects")
    msg = b.wait_for("""const m = document.querySelector('#message').textContent;
                        return /archive job \\d+ done/.test(m) && m;""", what="the job's message")
    ok(msg, "the page says the job is done", msg)

    # and restores it
    b.js("document.querySelector(`#tree button[data-action='restore'][data-series-uid='${arguments[0]}']`).click()",
         ct_series)
    job2 = b.wait_for("return document.body.dataset.lastJob !== arguments[0] && document.body.dataset.lastJob",
                      str(job), what="the restore job")
    final = b.wait_for("""const tr = document.querySelector(`#jobs tr[data-job='${arguments[0]}']`);
                          return tr && ['done', 'failed', 'cancelled'].includes(tr.dataset.state) && tr.dataset.state;""",
                       job2, timeout=90, what="the restore job to finish")
    tiers = query_value(db, """SELECT array_agg(DISTINCT tier::text) FROM mdd.objects
                               WHERE series_instance_uid = %s
                                  OR (patient_id = 'RT-DEMO-001' AND modality IN ('RTSTRUCT', 'RTPLAN', 'RTDOSE'))""",
                        (ct_series,))
    ok(final == "done" and tiers == ["online"], "a restore click brings them back online, the job seen finishing",
       f"job {job2} {final}, tiers {tiers}")

    # ----------------------------------------------------------------------
    # a reader may look but not archive

    b.basic_auth(*READER)
    b.get(f"{BASE}/")
    b.wait_for("return document.querySelectorAll('#patients li').length", what="the reader's patient list")
    b.js("document.querySelector(\"#patients li[data-patient-id='RT-DEMO-001']\").click()")
    b.wait_for("return document.querySelectorAll('#tree li.series').length", what="the reader's study tree")
    ok(b.js("return [...document.querySelectorAll(\"#tree button[data-action='archive'], #tree button[data-action='restore']\")].every(x => x.offsetParent === null)"),
       "a reader sees no archive or restore buttons")
    jobs_now = query_value(db, "SELECT count(*) FROM mdd.jobs")
    b.js("document.querySelector(`#tree button[data-action='restore'][data-series-uid='${arguments[0]}']`).click()",
         ct_series)
    err = b.wait_for("""const m = document.querySelector('#message');
                        return m.className === 'error' && m.textContent;""", what="the refusal")
    ok("42501" in err and query_value(db, "SELECT count(*) FROM mdd.jobs") == jobs_now,
       "and when a reader's page asks to restore, the archive refuses (42501) and makes no job", err)
    is_(query_value(db, "SELECT count(*) FROM mdd.audit WHERE action = 'http refused' AND role = %s AND detail LIKE %s",
                    (READER[0], "POST /api/restore%-> 403%")), 1, "the refusal is audited")
    b.screenshot(os.path.join(out, "07_reader.png"))
    # expected: the reader's refused restore, and the one probe for
    # WADO-RS frames while no DICOMweb route is installed (the page then
    # reads the stored objects through /api/object)
    severe = [m["message"] for m in b.console() if m.get("level") == "SEVERE"]
    probes = [m for m in severe if "/dicomweb/" in m and "404" in m]
    severe = [m for m in severe if "/api/restore" not in m and "permission denied for function restore" not in m
              and m not in probes[:1]]
    is_deeply(severe, [], "no other error in the page's console")
    for m in severe:
        diag(m)
    note(f"screenshots in {out}")
except Exception:
    if b:
        try:
            b.screenshot(os.path.join(out, "failure.png"))
            diag(*[m.get("message", "") for m in b.console()][-10:])
        except Exception:
            pass
    raise
finally:
    if b:
        b.quit()
    cluster("stop", datadir)
done_testing()
