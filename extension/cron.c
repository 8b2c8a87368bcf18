/*-------------------------------------------------------------------------
 *
 * cron.c
 *	  Schedules of archive rules in the 5-field cron syntax, and the next
 *	  time a schedule fires.
 *
 * Fields: minute (0-59), hour (0-23), day of month (1-31), month (1-12 or
 * jan-dec), day of week (0-7 or sun-sat, 0 and 7 both Sunday).  Each field
 * is a comma-separated list of items; an item is "*", a value or a range
 * "a-b", optionally followed by "/step" ("a/step" runs from a to the end
 * of the field's range).  As in cron, when both day fields are restricted
 * a day matches if either does.
 *
 * Times are those of the session's time zone: the rule scheduler runs in
 * the server's (postgresql.conf TimeZone), so schedules follow the clinic's
 * clock, daylight saving time included.  A local time that does not exist
 * (the hour skipped in spring) is read as PostgreSQL reads such a time
 * (02:30 becomes 03:30 summer time); a local time that happens twice (the
 * hour repeated in autumn) fires once.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <ctype.h>

#include "datatype/timestamp.h"
#include "fmgr.h"
#include "pgtime.h"
#include "utils/builtins.h"
#include "utils/datetime.h"
#include "utils/timestamp.h"

#include "mdd.h"

PG_FUNCTION_INFO_V1(mdd_cron_next_sql);

typedef struct CronSchedule
{
	uint64		minutes;		/* bit n: minute n */
	uint32		hours;
	uint32		days;			/* bit n: day n of the month, 1..31 */
	uint32		months;			/* bit n: month n, 1..12 */
	uint32		weekdays;		/* bit n: day n of the week, 0 = Sunday */
	bool		days_restricted;
	bool		weekdays_restricted;
} CronSchedule;

typedef struct CronField
{
	const char *name;
	int			min;
	int			max;
	const char *const *names;	/* names of values from min, or NULL */
} CronField;

static const char *const month_names[] = {"jan", "feb", "mar", "apr", "may", "jun", "jul",
"aug", "sep", "oct", "nov", "dec", NULL};
static const char *const weekday_names[] = {"sun", "mon", "tue", "wed", "thu", "fri", "sat", NULL};

static const CronField cron_fields[5] = {
	{"minute", 0, 59, NULL},
	{"hour", 0, 23, NULL},
	{"day of month", 1, 31, NULL},
	{"month", 1, 12, month_names},
	{"day of week", 0, 7, weekday_names},
};

static void
bad_schedule(const char *schedule, const char *field, const char *why)
{
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("invalid schedule \"%s\": %s field: %s", schedule, field, why),
			 errhint("A schedule has 5 fields: minute hour day-of-month month day-of-week, "
					 "for example \"30 1 * * 1-5\" (01:30 on weekdays).")));
}

/* a number or a name of the field at *p; advances *p */
static int
read_value(const char *schedule, const CronField *f, const char **p)
{
	const char *s = *p;

	if (isdigit((unsigned char) *s))
	{
		long		v = 0;

		while (isdigit((unsigned char) *s) && v <= 1000)
			v = v * 10 + (*s++ - '0');
		if (v < f->min || v > f->max)
			bad_schedule(schedule, f->name,
						 psprintf("value %ld is outside %d-%d", v, f->min, f->max));
		*p = s;
		return (int) v;
	}
	if (f->names != NULL && isalpha((unsigned char) *s))
	{
		for (int i = 0; f->names[i] != NULL; i++)
			if (pg_strncasecmp(s, f->names[i], 3) == 0 && !isalpha((unsigned char) s[3]))
			{
				*p = s + 3;
				return f->min + i;
			}
	}
	bad_schedule(schedule, f->name, psprintf("unexpected \"%s\"", s));
	return 0;					/* not reached */
}

/* the bits of one field's text (NUL-terminated) */
static uint64
parse_field(const char *schedule, const CronField *f, const char *text, bool *restricted)
{
	uint64		bits = 0;
	const char *p = text;

	*restricted = strcmp(text, "*") != 0;
	for (;;)
	{
		int			lo,
					hi,
					step = 1;

		if (*p == '*')
		{
			lo = f->min;
			hi = f->max;
			p++;
		}
		else
		{
			lo = hi = read_value(schedule, f, &p);
			if (*p == '-')
			{
				p++;
				hi = read_value(schedule, f, &p);
				if (hi < lo)
					bad_schedule(schedule, f->name, psprintf("range %d-%d runs backwards", lo, hi));
			}
			else if (*p == '/')
				hi = f->max;
		}
		if (*p == '/')
		{
			long		s = 0;

			p++;
			if (!isdigit((unsigned char) *p))
				bad_schedule(schedule, f->name, "a step must be a number");
			while (isdigit((unsigned char) *p) && s <= 1000)
				s = s * 10 + (*p++ - '0');
			if (s < 1 || s > f->max - f->min + 1)
				bad_schedule(schedule, f->name, psprintf("step %ld is out of range", s));
			step = (int) s;
		}
		for (int v = lo; v <= hi; v += step)
			bits |= UINT64CONST(1) << v;
		if (*p == '\0')
			break;
		if (*p != ',')
			bad_schedule(schedule, f->name, psprintf("unexpected \"%s\"", p));
		p++;
	}
	return bits;
}

static void
parse_schedule(const char *schedule, CronSchedule *cs)
{
	char	   *copy = pstrdup(schedule);
	char	   *fields[6];
	int			n = 0;
	char	   *save = NULL;
	bool		restricted;

	for (char *tok = strtok_r(copy, " \t", &save); tok != NULL; tok = strtok_r(NULL, " \t", &save))
	{
		if (n == 5)
			bad_schedule(schedule, "every", "more than 5 fields");
		fields[n++] = tok;
	}
	if (n != 5)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid schedule \"%s\": %d fields instead of 5", schedule, n),
				 errhint("A schedule has 5 fields: minute hour day-of-month month day-of-week.")));

	memset(cs, 0, sizeof(*cs));
	cs->minutes = parse_field(schedule, &cron_fields[0], fields[0], &restricted);
	cs->hours = (uint32) parse_field(schedule, &cron_fields[1], fields[1], &restricted);
	cs->days = (uint32) parse_field(schedule, &cron_fields[2], fields[2], &cs->days_restricted);
	cs->months = (uint32) parse_field(schedule, &cron_fields[3], fields[3], &restricted);
	cs->weekdays = (uint32) parse_field(schedule, &cron_fields[4], fields[4], &cs->weekdays_restricted);
	if (cs->weekdays & (1 << 7))
		cs->weekdays |= 1;		/* 7 is Sunday too */
	pfree(copy);
}

static bool
day_matches(const CronSchedule *cs, int year, int month, int day)
{
	bool		dom = (cs->days >> day) & 1;
	bool		dow = (cs->weekdays >> j2day(date2j(year, month, day))) & 1;

	if (cs->days_restricted && cs->weekdays_restricted)
		return dom || dow;
	return dom && dow;
}

/*
 * The first whole minute strictly after "after" at which the schedule
 * fires, in the session's time zone; false when there is none within
 * five years (such as "0 0 30 2 *").
 */
static bool
next_fire(const CronSchedule *cs, TimestampTz after, TimestampTz *result)
{
	struct pg_tm tm;
	fsec_t		fsec;
	int			tz;
	Timestamp	local;
	Timestamp	limit;

	/* work on local wall-clock time, as a timestamp without time zone */
	if (timestamp2tm(after, &tz, &tm, &fsec, NULL, NULL) != 0)
		ereport(ERROR, (errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
						errmsg("timestamp out of range")));
	tm.tm_sec = 0;
	fsec = 0;
	if (tm2timestamp(&tm, 0, NULL, &local) != 0)
		ereport(ERROR, (errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
						errmsg("timestamp out of range")));
	local += USECS_PER_MINUTE;
	limit = local + 5 * 366 * USECS_PER_DAY;

	while (local < limit)
	{
		struct pg_tm t;
		fsec_t		f;
		TimestampTz candidate;

		timestamp2tm(local, NULL, &t, &f, NULL, NULL);
		if (!((cs->months >> t.tm_mon) & 1))
		{
			/* to the first day of the next month */
			t.tm_mday = 1;
			t.tm_hour = t.tm_min = 0;
			if (++t.tm_mon > 12)
			{
				t.tm_mon = 1;
				t.tm_year++;
			}
			tm2timestamp(&t, 0, NULL, &local);
			continue;
		}
		if (!day_matches(cs, t.tm_year, t.tm_mon, t.tm_mday))
		{
			local += USECS_PER_DAY - (t.tm_hour * USECS_PER_HOUR + t.tm_min * USECS_PER_MINUTE);
			continue;
		}
		if (!((cs->hours >> t.tm_hour) & 1))
		{
			local += USECS_PER_HOUR - t.tm_min * USECS_PER_MINUTE;
			continue;
		}
		if (!((cs->minutes >> t.tm_min) & 1))
		{
			local += USECS_PER_MINUTE;
			continue;
		}

		/* a match in local time: which instant is it? */
		t.tm_sec = 0;
		tz = DetermineTimeZoneOffset(&t, session_timezone);
		if (tm2timestamp(&t, 0, &tz, &candidate) != 0)
			ereport(ERROR, (errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
							errmsg("timestamp out of range")));
		if (candidate > after)
		{
			*result = candidate;
			return true;
		}
		/* the hour repeated in autumn: already past, look further */
		local += USECS_PER_MINUTE;
	}
	return false;
}

/*
 * mdd._cron_next(schedule text, after timestamptz) RETURNS timestamptz
 *
 * When the schedule next fires after the given time; an error naming the
 * field when the schedule is not valid or never fires.
 */
Datum
mdd_cron_next_sql(PG_FUNCTION_ARGS)
{
	char	   *schedule;
	CronSchedule cs;
	TimestampTz result;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		PG_RETURN_NULL();
	schedule = text_to_cstring(PG_GETARG_TEXT_PP(0));
	parse_schedule(schedule, &cs);
	if (!next_fire(&cs, PG_GETARG_TIMESTAMPTZ(1), &result))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid schedule \"%s\": it never fires", schedule),
				 errdetail("No minute in the next five years matches every field.")));
	PG_RETURN_TIMESTAMPTZ(result);
}
