/*-------------------------------------------------------------------------
 *
 * http_auth.c
 *	  HTTP Basic authentication against PostgreSQL roles.
 *
 * The password is checked against the role's secret in pg_authid (SCRAM
 * or md5) with the server's own plain_crypt_verify, the way a password
 * login is; the role must be allowed to log in and its password must not
 * have expired.  A SCRAM check costs thousands of hash rounds, and a
 * viewer sends hundreds of requests: a successful check is remembered as a
 * salted SHA-256 of the password together with the secret it matched, so
 * the next request with the same password and an unchanged secret is let
 * in without those rounds.  A changed password (secret) is checked again.
 * Runs inside a transaction (it reads the catalog).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "catalog/pg_authid.h"
#include "common/cryptohash.h"
#include "libpq/crypt.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/syscache.h"

#include "http.h"

#define CACHE_SIZE 16

typedef struct Remembered
{
	char	   *role;
	char	   *secret;			/* the pg_authid secret the password matched */
	uint8		digest[32];		/* SHA-256 of salt and password */
} Remembered;

static Remembered cache[CACHE_SIZE];
static int	cache_next = 0;
static uint8 salt[32];
static bool salted = false;

static bool
digest_password(const char *password, uint8 *out)
{
	pg_cryptohash_ctx *ctx;
	bool		ok;

	if (!salted)
	{
		if (!pg_strong_random(salt, sizeof(salt)))
			return false;
		salted = true;
	}
	ctx = pg_cryptohash_create(PG_SHA256);
	ok = ctx != NULL &&
		pg_cryptohash_init(ctx) == 0 &&
		pg_cryptohash_update(ctx, salt, sizeof(salt)) == 0 &&
		pg_cryptohash_update(ctx, (const uint8 *) password, strlen(password)) == 0 &&
		pg_cryptohash_final(ctx, out, 32) == 0;
	pg_cryptohash_free(ctx);
	return ok;
}

static bool
remembered(const char *user, const char *secret, const uint8 *digest)
{
	for (int i = 0; i < CACHE_SIZE; i++)
		if (cache[i].role && strcmp(cache[i].role, user) == 0 &&
			strcmp(cache[i].secret, secret) == 0 &&
			memcmp(cache[i].digest, digest, 32) == 0)
			return true;
	return false;
}

static void
remember(const char *user, const char *secret, const uint8 *digest)
{
	Remembered *r = &cache[cache_next];

	cache_next = (cache_next + 1) % CACHE_SIZE;
	if (r->role)
	{
		pfree(r->role);
		pfree(r->secret);
	}
	r->role = MemoryContextStrdup(TopMemoryContext, user);
	r->secret = MemoryContextStrdup(TopMemoryContext, secret);
	memcpy(r->digest, digest, 32);
}

/*
 * Check user and password.  NULL when they are good (*roleid set), else
 * why not, for the log and the audit trail (never for the client).
 */
char *
mdd_http_check_password(const char *user, const char *password, Oid *roleid)
{
	HeapTuple	tuple;
	Form_pg_authid form;
	bool		canlogin;
	char	   *secret;
	const char *logdetail = NULL;
	uint8		digest[32];
	bool		have_digest;

	*roleid = InvalidOid;
	if (user[0] == '\0' || strlen(user) >= NAMEDATALEN)
		return pstrdup("user name empty or too long");
	tuple = SearchSysCache1(AUTHNAME, CStringGetDatum(user));
	if (!HeapTupleIsValid(tuple))
		return psprintf("role \"%s\" does not exist", user);
	form = (Form_pg_authid) GETSTRUCT(tuple);
	*roleid = form->oid;
	canlogin = form->rolcanlogin;
	ReleaseSysCache(tuple);
	if (!canlogin)
		return psprintf("role \"%s\" is not permitted to log in", user);

	secret = get_role_password(user, &logdetail);
	if (secret == NULL)
		return psprintf("password authentication failed for user \"%s\"%s%s", user,
						logdetail ? ": " : "", logdetail ? logdetail : "");
	have_digest = digest_password(password, digest);
	if (have_digest && remembered(user, secret, digest))
		return NULL;
	if (plain_crypt_verify(user, secret, password, &logdetail) != STATUS_OK)
		return psprintf("password authentication failed for user \"%s\"%s%s", user,
						logdetail ? ": " : "", logdetail ? logdetail : "");
	if (have_digest)
		remember(user, secret, digest);
	return NULL;
}
