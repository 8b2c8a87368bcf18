/*-------------------------------------------------------------------------
 *
 * shmem.c
 *	  mdd's shared memory: the regions its subsystems ask for from
 *	  _PG_init, requested and set up once through PostgreSQL's hooks.
 *
 * A subsystem names a region, its size, where to keep the pointer, and a
 * function that fills a new region (called once per cluster start, under
 * AddinShmemInitLock).  Without shared_preload_libraries nothing is
 * registered and the pointers stay NULL.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"

#include "mdd.h"

#define MDD_MAX_SHMEM_REGIONS 4

typedef struct ShmemRegion
{
	const char *name;
	Size		size;
	void	  **pointer;
	void		(*init) (void *region);
} ShmemRegion;

static ShmemRegion regions[MDD_MAX_SHMEM_REGIONS];
static int	region_count = 0;
static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

static void
request_regions(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	for (int i = 0; i < region_count; i++)
		RequestAddinShmemSpace(MAXALIGN(regions[i].size));
}

static void
start_regions(void)
{
	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();
	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	for (int i = 0; i < region_count; i++)
	{
		bool		found;

		*regions[i].pointer = ShmemInitStruct(regions[i].name, regions[i].size, &found);
		if (!found)
			regions[i].init(*regions[i].pointer);
	}
	LWLockRelease(AddinShmemInitLock);
}

/* from _PG_init, while shared_preload_libraries are loaded */
void
mdd_shmem_region(const char *name, Size size, void **pointer, void (*init) (void *region))
{
	if (region_count == MDD_MAX_SHMEM_REGIONS)
		elog(ERROR, "mdd: too many shared memory regions");
	if (region_count == 0)
	{
		prev_shmem_request_hook = shmem_request_hook;
		shmem_request_hook = request_regions;
		prev_shmem_startup_hook = shmem_startup_hook;
		shmem_startup_hook = start_regions;
	}
	regions[region_count++] = (ShmemRegion) {name, size, pointer, init};
}
