/*-------------------------------------------------------------------------
 *
 * throttle.c
 *	  The bandwidth cap of rule-driven work (mdd.rule_bandwidth, MB/s),
 *	  shared by every job runner.
 *
 * A virtual clock in shared memory says when the cap allows the next
 * rule-driven step to begin.  A runner that finished a step of a rule's job
 * reports the bytes it moved and when the step began; the clock advances
 * by bytes / cap from the later of that start and its current reading, and
 * the job waits (mdd.job.next_attempt_at) until then.  Whatever the number
 * of runners and rules, the bytes moved by rule jobs over any long period
 * stay within the cap.  Jobs that users queue themselves are not held back.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "fmgr.h"
#include "miscadmin.h"
#include "storage/spin.h"
#include "utils/timestamp.h"

#include "mdd.h"

double		mdd_rule_bandwidth = 0;

typedef struct ThrottleClock
{
	slock_t		mutex;
	TimestampTz next_free;		/* when the next rule step may begin */
} ThrottleClock;

static ThrottleClock *throttle_clock = NULL;

static void
init_clock(void *region)
{
	ThrottleClock *clock = region;

	SpinLockInit(&clock->mutex);
	clock->next_free = 0;
}

/* from _PG_init when preloading */
void
mdd_throttle_init(void)
{
	mdd_shmem_region("mdd rule bandwidth", sizeof(ThrottleClock), (void **) &throttle_clock,
					 init_clock);
}

PG_FUNCTION_INFO_V1(mdd_throttle_sql);

/*
 * mdd._throttle(bytes bigint, began timestamptz) RETURNS timestamptz
 *
 * Account for a rule-driven step that moved bytes and began at began;
 * returns when the next such step may begin (began itself when there is
 * no cap, or no shared memory because mdd is not preloaded).
 */
Datum
mdd_throttle_sql(PG_FUNCTION_ARGS)
{
	int64		bytes = PG_GETARG_INT64(0);
	TimestampTz began = PG_GETARG_TIMESTAMPTZ(1);
	TimestampTz next;
	double		usecs;

	if (mdd_rule_bandwidth <= 0 || throttle_clock == NULL || bytes <= 0)
		PG_RETURN_TIMESTAMPTZ(began);
	usecs = (double) bytes / (mdd_rule_bandwidth * 1000000.0) * USECS_PER_SEC;
	usecs = Min(usecs, (double) USECS_PER_DAY);
	SpinLockAcquire(&throttle_clock->mutex);
	next = Max(throttle_clock->next_free, began) + (TimestampTz) usecs;
	throttle_clock->next_free = next;
	SpinLockRelease(&throttle_clock->mutex);
	PG_RETURN_TIMESTAMPTZ(next);
}
