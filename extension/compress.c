/*-------------------------------------------------------------------------
 *
 * compress.c
 *	  Lossless zstd compression of blobs, for storages whose option
 *	  "compression" is "zstd".
 *
 * A compressed blob is one zstd frame that records the size of the
 * original bytes (ZSTD_compress always writes it).  Reading it back is
 * bounded before any memory is taken: a frame that is not exactly one
 * frame, that does not say how large its content is, or that claims more
 * than the catalog size of the object (or more than fits in a bytea) is
 * refused as corrupt (SQLSTATE XX001), naming the storage and the blob.
 *
 * The storage option is only the switch for new blobs: whether a blob is
 * compressed is part of its locator (suffix ".zst", see sql/storage.sql),
 * so a storage switched from one setting to the other still reads the
 * blobs it holds.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <zstd.h>

#include "fmgr.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/memutils.h"

PG_FUNCTION_INFO_V1(mdd_zstd_compress_sql);
PG_FUNCTION_INFO_V1(mdd_zstd_decompress_sql);

/*
 * Every zstd frame starts with the magic number ZSTD_MAGICNUMBER,
 * 0xFD2FB528 stored little-endian: the bytes 28 B5 2F FD.
 */

/* largest content a blob may have: what fits in one bytea */
#define MDD_MAX_BLOB_SIZE ((Size) MaxAllocSize - VARHDRSZ)

/* contexts kept for the life of the backend (allocated by zstd with malloc) */
static ZSTD_CCtx *cctx = NULL;
static ZSTD_DCtx *dctx = NULL;

/*
 * mdd._zstd_compress(data bytea, level integer) RETURNS bytea
 *
 * One zstd frame holding data, at the given compression level.
 */
Datum
mdd_zstd_compress_sql(PG_FUNCTION_ARGS)
{
	bytea	   *data;
	int			level;
	Size		len;
	Size		bound;
	size_t		n;
	bytea	   *result;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("data and compression level must not be NULL")));
	data = PG_GETARG_BYTEA_PP(0);
	level = PG_GETARG_INT32(1);
	if (level < 1 || level > ZSTD_maxCLevel())
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("zstd compression level %d is out of range", level),
				 errhint("Use a level between 1 and %d.", ZSTD_maxCLevel())));
	len = VARSIZE_ANY_EXHDR(data);
	bound = ZSTD_compressBound(len);
	if (ZSTD_isError(bound) || bound > MDD_MAX_BLOB_SIZE)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("%zu bytes are too many to compress into one blob", len)));

	if (cctx == NULL && (cctx = ZSTD_createCCtx()) == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory"),
				 errdetail("Could not create a zstd compression context.")));

	result = (bytea *) palloc_extended(VARHDRSZ + bound, MCXT_ALLOC_HUGE);
	n = ZSTD_compressCCtx(cctx, VARDATA(result), bound, VARDATA_ANY(data), len, level);
	if (ZSTD_isError(n))
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("zstd compression failed: %s", ZSTD_getErrorName(n))));
	SET_VARSIZE(result, VARHDRSZ + n);
	PG_RETURN_BYTEA_P(result);
}

/*
 * mdd._zstd_decompress(data bytea, max_size bigint, storage text,
 *						locator text) RETURNS bytea
 *
 * The original bytes of a compressed blob.  max_size is the catalog size
 * of the object (NULL when unknown: then only the bytea limit applies);
 * storage and locator name the blob in errors.
 */
Datum
mdd_zstd_decompress_sql(PG_FUNCTION_ARGS)
{
	bytea	   *data;
	const char *src;
	Size		len;
	Size		limit = MDD_MAX_BLOB_SIZE;
	char	   *storage;
	char	   *locator;
	unsigned long long content;
	size_t		frame;
	size_t		n;
	bytea	   *result;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(2) || PG_ARGISNULL(3))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("data, storage and locator must not be NULL")));
	data = PG_GETARG_BYTEA_PP(0);
	storage = text_to_cstring(PG_GETARG_TEXT_PP(2));
	locator = text_to_cstring(PG_GETARG_TEXT_PP(3));
	if (!PG_ARGISNULL(1) && PG_GETARG_INT64(1) >= 0 &&
		(uint64) PG_GETARG_INT64(1) < (uint64) limit)
		limit = (Size) PG_GETARG_INT64(1);
	src = VARDATA_ANY(data);
	len = VARSIZE_ANY_EXHDR(data);

	if (len < 4 ||
		((uint32) (unsigned char) src[0] |
		 (uint32) (unsigned char) src[1] << 8 |
		 (uint32) (unsigned char) src[2] << 16 |
		 (uint32) (unsigned char) src[3] << 24) != ZSTD_MAGICNUMBER)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("blob \"%s\" of storage \"%s\" is not zstd-compressed",
						locator, storage),
				 errdetail("It does not start with the zstd frame magic number.")));

	content = ZSTD_getFrameContentSize(src, len);
	if (content == ZSTD_CONTENTSIZE_ERROR)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("blob \"%s\" of storage \"%s\" has a damaged zstd frame header",
						locator, storage)));
	if (content == ZSTD_CONTENTSIZE_UNKNOWN)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("blob \"%s\" of storage \"%s\" does not record its original size",
						locator, storage),
				 errdetail("mdd only reads zstd frames that record their content size.")));
	if (content > (unsigned long long) limit)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("blob \"%s\" of storage \"%s\" claims %llu bytes, more than the %zu expected",
						locator, storage, content, limit)));
	frame = ZSTD_findFrameCompressedSize(src, len);
	if (ZSTD_isError(frame) || frame != len)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("blob \"%s\" of storage \"%s\" is not exactly one zstd frame",
						locator, storage),
				 ZSTD_isError(frame) ?
				 errdetail("zstd says: %s.", ZSTD_getErrorName(frame)) :
				 errdetail("The frame is %zu bytes long, the blob %zu.", frame, len)));

	if (dctx == NULL && (dctx = ZSTD_createDCtx()) == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory"),
				 errdetail("Could not create a zstd decompression context.")));

	result = (bytea *) palloc_extended(VARHDRSZ + (Size) content, MCXT_ALLOC_HUGE);
	n = ZSTD_decompressDCtx(dctx, VARDATA(result), (size_t) content, src, len);
	if (ZSTD_isError(n))
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("blob \"%s\" of storage \"%s\" does not decompress",
						locator, storage),
				 errdetail("zstd says: %s.", ZSTD_getErrorName(n))));
	if (n != content)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("blob \"%s\" of storage \"%s\" decompresses to %zu bytes, not the %llu it records",
						locator, storage, n, content)));
	SET_VARSIZE(result, VARHDRSZ + n);
	PG_RETURN_BYTEA_P(result);
}
