# Sourced by the peer scripts that install npm packages for the tests
# (s3.sh, dicomweb-client.sh): where their cache is.  MDD_NPM_CACHE_DIR,
# else /var/cache/mdd-test/npm when that can be written, else
# ~/.cache/mdd-test/npm.
npm_cache_top() {
	if [[ -n "${MDD_NPM_CACHE_DIR:-}" ]]; then
		echo "$MDD_NPM_CACHE_DIR"
	elif mkdir -p /var/cache/mdd-test/npm 2>/dev/null && [[ -w /var/cache/mdd-test/npm ]]; then
		echo /var/cache/mdd-test/npm
	else
		echo "${HOME:-/tmp}/.cache/mdd-test/npm"
	fi
}
