#!/usr/bin/env bash
# Installs the Debian packages mdd needs to build, run its demo and its tests
# (only those missing), with apt-get as root or through sudo.
set -euo pipefail

packages=(
	build-essential g++ pkg-config
	postgresql-15 postgresql-server-dev-15 postgresql-15-pgtap libtap-parser-sourcehandler-pgtap-perl
	libdcmtk-dev dcmtk orthanc orthanc-postgresql curl
	python3-pydicom python3-numpy python3-psycopg2
	clang libclang-rt-14-dev
	libcurl4-openssl-dev libzstd-dev zstd openssl libssl-dev
	libmicrohttpd-dev
	chromium chromium-driver
	nginx libnginx-mod-http-dav-ext
	orthanc-dicomweb chromium
)
# the S3 test peer (s3rver) runs on Node.js, and npm installs it and the
# DICOMweb client of test 93_dicomweb_client; a Node.js from elsewhere will do
command -v node >/dev/null || packages+=(nodejs)
command -v npm >/dev/null || packages+=(npm)

missing=()
for p in "${packages[@]}"; do
	status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
	[[ "$status" == "install ok installed" ]] || missing+=("$p")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

echo "mdd: installing Debian packages: ${missing[*]}"
sudo=()
[[ $(id -u) -eq 0 ]] || sudo=(sudo)
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
