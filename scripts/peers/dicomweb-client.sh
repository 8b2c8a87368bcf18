#!/usr/bin/env bash
# Installs the DICOMweb client test 93_dicomweb_client.t runs in a browser:
# the npm package dicomweb-client (version pinned in
# scripts/peers/dicomweb-client/), into a cache directory, never into the
# repository.
#
#   scripts/peers/dicomweb-client.sh install   install it, unless it is there
#   scripts/peers/dicomweb-client.sh path      install it, then print the path
#                                              of its UMD build (global
#                                              DICOMwebClient)
#
# The cache is MDD_NPM_CACHE_DIR, else /var/cache/mdd-test/npm when that can
# be written, else ~/.cache/mdd-test/npm (as scripts/peers/s3.sh), in its
# subdirectory dicomweb-client; npm runs only when the installed lock file
# differs from the pinned one.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)

# shellcheck source=npm-cache.sh
source "$here/npm-cache.sh"
cache_dir() { echo "$(npm_cache_top)/dicomweb-client"; }

install() (
	local dir
	dir=$(cache_dir)
	mkdir -p "$dir"
	# one installer at a time (test runs may share the cache)
	exec 9>"$dir/.install.lock"
	flock 9
	if [[ -f "$dir/node_modules/dicomweb-client/build/dicomweb-client.js" ]] &&
		cmp -s "$here/dicomweb-client/package-lock.json" "$dir/package-lock.json"; then
		return 0
	fi
	command -v npm >/dev/null || { echo "dicomweb-client.sh: npm is missing (scripts/install-deps.sh)" >&2; exit 1; }
	echo "dicomweb-client.sh: installing dicomweb-client into $dir" >&2
	rm -f "$dir/package-lock.json"
	cp "$here/dicomweb-client/package.json" "$dir/"
	# the lock file last, so that a failed install is tried again next time
	cp "$here/dicomweb-client/package-lock.json" "$dir/package-lock.json.new"
	mv "$dir/package-lock.json.new" "$dir/package-lock.json"
	if ! (cd "$dir" && npm_config_cache="$dir/.npm" npm ci --no-audit --no-fund --loglevel=error >&2); then
		rm -f "$dir/package-lock.json"
		echo "dicomweb-client.sh: npm ci failed (is the npm registry reachable?)" >&2
		exit 1
	fi
	chmod -R a+rX "$dir"
)

cmd=${1:?usage: dicomweb-client.sh install | path}
case "$cmd" in
install)
	install
	;;
path)
	install
	echo "$(cache_dir)/node_modules/dicomweb-client/build/dicomweb-client.js"
	;;
*)
	echo "dicomweb-client.sh: unknown command $cmd" >&2
	exit 2
	;;
esac
