/*
 * parse_fuzzer.c
 *	  libFuzzer target for mdd_dicom_parse() (extension/dicom.h).
 *
 * Feeds arbitrary bytes to the DCMTK-backed parser and checks the contract
 * of dicom.h: on MDD_DICOM_OK a malloc()ed, NUL-terminated JSON object
 * ('{' ... '}') in valid UTF-8; on any other status no JSON and a
 * non-empty, NUL-terminated reason in errbuf.  Any violation abort()s so
 * libFuzzer records it as a crash.  Built and run by fuzz/Makefile
 * (make -C fuzz run).
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dicom.h"

#define ERRBUF_LEN 256

static int	internal_reports = 0;

static void
fail(const char *what, int status)
{
	fprintf(stderr, "parse_fuzzer: invariant violated (status %d): %s\n",
			status, what);
	abort();
}

/*
 * True when s[0..n) is valid UTF-8: no stray continuation bytes, no
 * truncated, overlong or surrogate sequences, nothing above U+10FFFF.
 */
static int
valid_utf8(const unsigned char *s, size_t n)
{
	size_t		i = 0;

	while (i < n)
	{
		unsigned char c = s[i];
		size_t		len;
		uint32_t	cp;

		if (c < 0x80)
		{
			i++;
			continue;
		}
		if (c >= 0xC2 && c <= 0xDF)
		{
			len = 2;
			cp = c & 0x1F;
		}
		else if (c >= 0xE0 && c <= 0xEF)
		{
			len = 3;
			cp = c & 0x0F;
		}
		else if (c >= 0xF0 && c <= 0xF4)
		{
			len = 4;
			cp = c & 0x07;
		}
		else
			return 0;
		if (n - i < len)
			return 0;
		for (size_t k = 1; k < len; k++)
		{
			if ((s[i + k] & 0xC0) != 0x80)
				return 0;
			cp = (cp << 6) | (s[i + k] & 0x3F);
		}
		if ((len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) ||
			cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
			return 0;
		i += len;
	}
	return 1;
}

/* errbuf must hold a NUL within its size, and something before it */
static size_t
errbuf_strlen(const char *errbuf)
{
	const char *nul = memchr(errbuf, '\0', ERRBUF_LEN);

	return nul ? (size_t) (nul - errbuf) : ERRBUF_LEN;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char	   *json = (char *) 0x1;	/* must be overwritten */
	char		errbuf[ERRBUF_LEN];
	MddDicomStatus st;

	/* poison the buffer so a missing terminator is caught */
	memset(errbuf, 'X', sizeof(errbuf));

	st = mdd_dicom_parse(data, size, &json, errbuf, sizeof(errbuf));

	if (st == MDD_DICOM_OK)
	{
		size_t		n;

		if (json == NULL)
			fail("OK but json is NULL", st);
		n = strlen(json);		/* ASan catches a missing NUL */
		if (n == 0 || json[0] != '{')
			fail("JSON does not start with '{'", st);
		if (json[n - 1] != '}')
			fail("JSON does not end with '}'", st);
		if (!valid_utf8((const unsigned char *) json, n))
			fail("JSON is not valid UTF-8", st);
		mdd_dicom_free_json(json);
	}
	else
	{
		size_t		n;

		if (st < MDD_DICOM_EMPTY || st > MDD_DICOM_INTERNAL)
			fail("unknown status code", st);
		if (json != NULL)
			fail("failure but json is not NULL", st);
		n = errbuf_strlen(errbuf);
		if (n == ERRBUF_LEN)
			fail("errbuf is not NUL-terminated", st);
		if (n == 0)
			fail("errbuf is empty on failure", st);
		if (size > 0 && st == MDD_DICOM_EMPTY)
			fail("MDD_DICOM_EMPTY for a non-empty input", st);
		/* a caught C++ exception is allowed, but worth seeing: report a few */
		if (st == MDD_DICOM_INTERNAL && internal_reports < 10)
		{
			internal_reports++;
			fprintf(stderr, "parse_fuzzer: MDD_DICOM_INTERNAL: %s\n", errbuf);
		}
	}
	return 0;
}
