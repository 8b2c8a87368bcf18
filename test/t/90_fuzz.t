#!/bin/bash
# The DICOM parser under libFuzzer with AddressSanitizer and UBSan: first the
# reproducers of past findings (each must now be handled), then a bounded
# fuzz run (MDD_FUZZ_SECONDS, default 60) that must end with no crash, leak,
# hang or out-of-memory.
top=${MDD_TOP:-$(cd "$(dirname "$0")/../.." && pwd)}
seconds=${MDD_FUZZ_SECONDS:-60}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
echo "1..2"

report() {
	local n=$1 desc=$2 rc=$3
	if [[ $rc -eq 0 ]]; then
		echo "ok $n - $desc"
	else
		echo "not ok $n - $desc"
		tail -n 40 "$log" | sed 's/^/# /'
	fi
}

make -s -C "$top/fuzz" regress >"$log" 2>&1
report 1 "every reproducer in fuzz/regressions is handled without crash, leak or OOM" $?

make -s -C "$top/fuzz" run FUZZ_SECONDS="$seconds" >"$log" 2>&1
rc=$?
grep -E "^stat::number_of_executed_units|^#[0-9]+.*DONE" "$log" | tail -2 | sed 's/^/# /'
report 2 "${seconds}s of fuzzing mdd_dicom_parse finds nothing" $rc
