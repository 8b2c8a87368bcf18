#!/usr/bin/python3
"""Check the C-FIND answers of bench/find against the studies that were sent.

    check_find.py MANIFEST RESPONSES_XML

MANIFEST is the TSV of bench/lib/make_studies.py; RESPONSES_XML is what
"findscu -Xs FILE" wrote for a STUDY-level query asking StudyInstanceUID,
PatientID, PatientName, StudyDate, NumberOfStudyRelatedSeries,
NumberOfStudyRelatedInstances and ModalitiesInStudy.  Every study must be
answered exactly once with the values it was sent with (one series, one
instance).  Prints one line; exits 1 on any difference.
"""

import sys
import xml.etree.ElementTree as ET


def main(argv):
    manifest, responses = argv[1], argv[2]
    expected = {}
    with open(manifest) as f:
        for line in f:
            uid, pid, name, date, modality = line.rstrip("\n").split("\t")
            expected[uid] = {"PatientID": pid, "PatientName": name, "StudyDate": date,
                             "ModalitiesInStudy": modality, "NumberOfStudyRelatedSeries": "1",
                             "NumberOfStudyRelatedInstances": "1"}

    problems = []
    seen = set()
    answers = 0
    for ds in ET.parse(responses).getroot().iter("data-set"):
        answers += 1
        values = {e.get("name"): (e.text or "").strip() for e in ds.iter("element")}
        uid = values.get("StudyInstanceUID", "")
        if uid not in expected:
            problems.append(f"answer {answers}: unknown StudyInstanceUID {uid!r}")
            continue
        if uid in seen:
            problems.append(f"answer {answers}: study {uid} answered twice")
        seen.add(uid)
        for key, want in expected[uid].items():
            got = values.get(key)
            if got != want:
                problems.append(f"study {uid}: {key} = {got!r}, expected {want!r}")
    missing = len(expected) - len(seen)
    if missing:
        problems.append(f"{missing} studies not answered")
    if problems:
        print(f"{answers} answers for {len(expected)} studies; {len(problems)} problems, first ones:")
        for p in problems[:5]:
            print("   " + p)
        return 1
    print(f"{answers} answers, one per study, every key as sent")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
