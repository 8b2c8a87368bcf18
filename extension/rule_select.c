/*-------------------------------------------------------------------------
 *
 * rule_select.c
 *	  The objects an archive rule selects: its predicate, run with the
 *	  rights of the rule's owner and nothing more, unable to write.
 *
 * A rule's predicate is an SQL boolean expression over mdd.objects o,
 * written by an administrator, that may read the EMR's own tables.  Three
 * things keep it in its place:
 *
 *	- it must parse as one expression on its own, so that it cannot close
 *	  the WHERE clause it is put into and add to the statement around it;
 *	- the query runs as the rule's owner, in a security-restricted operation
 *	  (no SET ROLE, no temporary objects), as autovacuum runs index
 *	  expressions: mdd's own rights never reach the predicate;
 *	- the transaction is read-only while it runs, so that neither the query
 *	  nor any function it calls can write (SQLSTATE 25006); and it runs in
 *	  a subtransaction that is rolled back at the end, so that what the
 *	  read-only check lets through (large objects in PostgreSQL 15, rows of
 *	  temporary tables) is undone.
 *
 * Errors of the predicate are PostgreSQL's own, with their SQLSTATEs:
 * 42601 syntax, 42P01 unknown table, 42703 unknown column, 42804 not a
 * boolean, 42501 no permission.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "parser/parser.h"
#include "utils/acl.h"
#include "utils/resowner.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/syscache.h"

#include "mdd.h"

PG_FUNCTION_INFO_V1(mdd_rule_select_sql);

/*
 * Check that the predicate is one expression and nothing else: no second
 * column, no FROM, WHERE, GROUP BY, ORDER BY, LIMIT or locking clause that
 * the PL/pgSQL expression grammar would also take.
 */
static void
check_single_expression(const char *predicate)
{
	MemoryContext caller = CurrentMemoryContext;
	List	   *volatile parsed = NIL;
	RawStmt    *raw;
	SelectStmt *select;
	ResTarget  *target;

	/* a syntax error is reported against the predicate, not mdd's query */
	PG_TRY();
	{
		parsed = raw_parser(predicate, RAW_PARSE_PLPGSQL_EXPR);
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(caller);
		edata = CopyErrorData();
		FlushErrorState();
		ereport(ERROR,
				(errcode(edata->sqlerrcode),
				 errmsg("rule predicate: %s", edata->message),
				 edata->cursorpos > 0 ?
				 errdetail("At character %d of the predicate: %s", edata->cursorpos, predicate) :
				 errdetail("The predicate was: %s", predicate)));
	}
	PG_END_TRY();

	if (list_length(parsed) != 1)
		goto not_one;
	raw = linitial_node(RawStmt, parsed);
	if (!IsA(raw->stmt, SelectStmt))
		goto not_one;
	select = (SelectStmt *) raw->stmt;
	if (list_length(select->targetList) != 1 || select->distinctClause != NIL ||
		select->fromClause != NIL || select->whereClause != NULL ||
		select->groupClause != NIL || select->havingClause != NULL ||
		select->windowClause != NIL || select->sortClause != NIL ||
		select->limitCount != NULL || select->limitOffset != NULL ||
		select->lockingClause != NIL || select->intoClause != NULL ||
		select->withClause != NULL || select->valuesLists != NIL ||
		select->op != SETOP_NONE)
		goto not_one;
	target = linitial_node(ResTarget, select->targetList);
	if (target->name != NULL ||
		(IsA(target->val, ColumnRef) &&
		 IsA(llast(((ColumnRef *) target->val)->fields), A_Star)))
		goto not_one;
	return;

not_one:
	ereport(ERROR,
			(errcode(ERRCODE_SYNTAX_ERROR),
			 errmsg("rule predicate must be a single boolean expression"),
			 errdetail("The predicate was: %s", predicate),
			 errhint("Write a condition over mdd.objects o, for example "
					 "o.modality = 'CT' AND o.study_date < current_date - 365.")));
}

/* leave the selection's subtransaction, undoing all it did */
static void
end_selection(bool save_read_only, int save_nestlevel, Oid save_userid, int save_sec_context,
			  MemoryContext caller, ResourceOwner owner_resources)
{
	XactReadOnly = save_read_only;
	AtEOXact_GUC(false, save_nestlevel);
	SetUserIdAndSecContext(save_userid, save_sec_context);
	RollbackAndReleaseCurrentSubTransaction();
	MemoryContextSwitchTo(caller);
	CurrentResourceOwner = owner_resources;
}

/*
 * mdd._rule_select(owner oid, predicate text, scope text, row_limit integer)
 *		RETURNS bigint[]
 *
 * The ids of mdd.objects o for which the predicate holds, and the scope (a
 * condition mdd itself writes, such as o.tier = 'online'), in id order; at
 * most row_limit of them (0: no row at all, which checks the predicate,
 * its tables, columns and permissions without reading; NULL: all).
 * Internal: callable only by mdd's own functions.
 */
Datum
mdd_rule_select_sql(PG_FUNCTION_ARGS)
{
	Oid			owner;
	char	   *predicate;
	char	   *scope;
	StringInfoData sql;
	Oid			save_userid;
	int			save_sec_context;
	int			save_nestlevel;
	bool		save_read_only = XactReadOnly;
	MemoryContext caller = CurrentMemoryContext;
	ResourceOwner owner_resources = CurrentResourceOwner;
	ArrayBuildState *volatile ids = NULL;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1) || PG_ARGISNULL(2))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("rule owner, predicate and scope must not be NULL")));
	owner = PG_GETARG_OID(0);
	predicate = text_to_cstring(PG_GETARG_TEXT_PP(1));
	scope = text_to_cstring(PG_GETARG_TEXT_PP(2));

	if (!SearchSysCacheExists1(AUTHOID, ObjectIdGetDatum(owner)))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("the owner of the rule (role %u) no longer exists", owner),
				 errhint("Drop the rule and create it again as an existing role.")));
	check_single_expression(predicate);

	/*
	 * The predicate alone in a WHERE clause, so that its errors are the
	 * ones PostgreSQL gives for a WHERE clause, and on lines of its own, so
	 * that a trailing -- comment ends there.
	 */
	initStringInfo(&sql);
	appendStringInfo(&sql,
					 "SELECT o.id FROM (SELECT * FROM mdd.objects o WHERE (\n%s\n)) o WHERE %s ORDER BY o.id",
					 predicate, scope);
	if (!PG_ARGISNULL(3))
		appendStringInfo(&sql, " LIMIT %d", Max(PG_GETARG_INT32(3), 0));

	/*
	 * In a subtransaction that is always rolled back: what slips past the
	 * read-only check (PostgreSQL 15 lets lo_create through, and writes to
	 * temporary tables) is undone, and the role, the settings and the
	 * read-only state are restored whatever happens.
	 */
	BeginInternalSubTransaction(NULL);
	GetUserIdAndSecContext(&save_userid, &save_sec_context);
	SetUserIdAndSecContext(owner, save_sec_context | SECURITY_LOCAL_USERID_CHANGE |
						   SECURITY_RESTRICTED_OPERATION);
	save_nestlevel = NewGUCNestLevel();
	/* rules scan large catalogs once: compiling them costs more than it saves */
	(void) set_config_option("jit", "off", PGC_USERSET, PGC_S_SESSION, GUC_ACTION_SAVE, true, 0, false);
	XactReadOnly = true;
	PG_TRY();
	{
		if (SPI_connect() != SPI_OK_CONNECT)
			elog(ERROR, "SPI_connect failed");
		if (SPI_execute(sql.data, true, 0) != SPI_OK_SELECT)
			elog(ERROR, "the query of a rule did not run as a SELECT");
		for (uint64 i = 0; i < SPI_processed; i++)
		{
			bool		isnull;
			Datum		id = SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1, &isnull);

			ids = accumArrayResult(ids, id, isnull, INT8OID, caller);
		}
		SPI_finish();
		end_selection(save_read_only, save_nestlevel, save_userid, save_sec_context,
					  caller, owner_resources);
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(caller);
		edata = CopyErrorData();
		FlushErrorState();
		end_selection(save_read_only, save_nestlevel, save_userid, save_sec_context,
					  caller, owner_resources);
		ReThrowError(edata);
	}
	PG_END_TRY();

	if (ids == NULL)
		PG_RETURN_ARRAYTYPE_P(construct_empty_array(INT8OID));
	PG_RETURN_DATUM(makeArrayResult(ids, caller));
}
