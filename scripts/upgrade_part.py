#!/usr/bin/python3
"""The generated part of an upgrade script (docs/admin.md, "Upgrades").

    scripts/upgrade_part.py --old sql/mdd--0.1.0.sql [--handwritten FILE] -- PARTS...

Compares the SQL parts of this version (in install order) with the frozen
install script of the old version, statement by statement, and prints what
brings an old installation up to date, after the hand-written part (which
changes the existing tables):

  - functions and procedures that are new or changed, as CREATE OR REPLACE;
    a function whose arguments, defaults or result type changed, or that is
    gone, is dropped first (by its old signature);
  - views that are new or changed, as CREATE OR REPLACE VIEW (one whose
    columns changed other than at its end must be dropped by the
    hand-written part);
  - comments that are new or changed, and every GRANT and REVOKE again
    (they are idempotent and cover the new objects);
  - every other statement that the old script does not have and the
    hand-written part does not already hold (new tables, indexes, rows,
    ALTER TABLE of new parts, ...), as it is.

A CREATE TABLE that differs from the old one of the same name cannot be
generated: unless the hand-written part alters or drops that table, this
script warns and the upgrade script it makes fails at once, naming the
table (the build and fresh installs still work).  test/t/97_upgrade.t
runs the upgrade and compares the result with a fresh install.
"""
import argparse
import re
import sys


def statements(text):
    """The SQL statements of a script, in order, without comments and psql
    meta-commands, each with its whitespace as written."""
    out = []
    i = 0
    n = len(text)
    start = 0
    buf = []

    def flush(upto):
        chunk = "".join(buf) + text[start:upto]
        return chunk

    while i < n:
        c = text[i]
        if c == "-" and text.startswith("--", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            buf.append(text[start:i])
            i = j
            start = i
            continue
        if c == "/" and text.startswith("/*", i):
            depth = 0
            j = i
            while j < n:
                if text.startswith("/*", j):
                    depth += 1
                    j += 2
                elif text.startswith("*/", j):
                    depth -= 1
                    j += 2
                    if depth == 0:
                        break
                else:
                    j += 1
            buf.append(text[start:i])
            i = j
            start = i
            continue
        if c == "\\" and (i == 0 or text[i - 1] == "\n"):
            j = text.find("\n", i)
            j = n if j < 0 else j
            buf.append(text[start:i])
            i = j
            start = i
            continue
        if c == "'":
            j = i + 1
            while j < n:
                if text[j] == "'":
                    if j + 1 < n and text[j + 1] == "'":
                        j += 2
                        continue
                    break
                if text[j] == "\\" and i > 0 and text[i - 1] in "eE":
                    j += 2
                    continue
                j += 1
            i = j + 1
            continue
        if c == '"':
            j = text.find('"', i + 1)
            i = (n if j < 0 else j) + 1
            continue
        if c == "$":
            m = re.match(r"\$([A-Za-z_][A-Za-z_0-9]*)?\$", text[i:])
            if m and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
                tag = m.group(0)
                j = text.find(tag, i + len(tag))
                if j < 0:
                    raise SystemExit(f"upgrade_part.py: unterminated {tag} quote")
                i = j + len(tag)
                continue
        if c == ";":
            stmt = flush(i).strip()
            buf = []
            if stmt:
                out.append(stmt)
            i += 1
            start = i
            continue
        i += 1
    rest = flush(n).strip()
    if rest:
        raise SystemExit(f"upgrade_part.py: statement without its semicolon at the end: {rest[:80]}")
    return out


def norm(stmt):
    """A statement with its whitespace made uniform, for comparisons."""
    return re.sub(r"\s+", " ", stmt).strip()


def split_top(s, sep=","):
    """s split at top-level separators (outside parentheses and quotes)."""
    parts, depth, cur, i = [], 0, [], 0
    while i < len(s):
        c = s[i]
        if c in "'\"":
            j = s.find(c, i + 1)
            j = len(s) - 1 if j < 0 else j
            cur.append(s[i:j + 1])
            i = j + 1
            continue
        if c in "([":
            depth += 1
        elif c in ")]":
            depth -= 1
        if c == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return [p.strip() for p in parts]


def balanced(s, i):
    """The end (exclusive) of the parenthesised group starting at s[i]."""
    depth = 0
    j = i
    while j < len(s):
        c = s[j]
        if c in "'\"":
            k = s.find(c, j + 1)
            j = (len(s) if k < 0 else k) + 1
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return j + 1
        j += 1
    raise SystemExit(f"upgrade_part.py: unbalanced parentheses in {s[:80]}")


FUNC = re.compile(r"CREATE\s+(?:OR\s+REPLACE\s+)?(FUNCTION|PROCEDURE)\s+([\w.\"]+)\s*\(", re.I)
OPTION_WORDS = r"LANGUAGE|AS|SECURITY|SET|IMMUTABLE|STABLE|VOLATILE|STRICT|CALLED|PARALLEL|COST|ROWS|WINDOW|LEAKPROOF|TRANSFORM|SUPPORT|BEGIN|RETURNS\s+NULL|NOT\s+LEAKPROOF|EXTERNAL"


class Function:
    def __init__(self, stmt):
        m = FUNC.match(stmt)
        self.stmt = stmt
        self.kind = m.group(1).upper()
        self.name = m.group(2).lower()
        open_at = m.end() - 1
        close = balanced(stmt, open_at)
        params = split_top(stmt[open_at + 1:close - 1])
        self.params = [norm(p) for p in params if p.strip()]
        rest = stmt[close:]
        r = re.match(r"\s*RETURNS\s+(.*?)(?=\s(?:%s)\b)" % OPTION_WORDS, rest, re.I | re.S)
        self.returns = norm(r.group(1)).lower() if r else ""
        # identity: the input arguments' types, without defaults and names
        ident = []
        for p in self.params:
            p = re.split(r"\s+DEFAULT\s+|\s*=\s*", p, maxsplit=1, flags=re.I)[0]
            words = p.split()
            mode = "IN"
            if words and words[0].upper() in ("IN", "OUT", "INOUT", "VARIADIC"):
                mode = words[0].upper()
                words = words[1:]
            if mode == "OUT":
                continue
            self_type = " ".join(words[1:]) if len(words) > 1 and not self._is_type_start(words) else " ".join(words)
            ident.append(("VARIADIC " if mode == "VARIADIC" else "") + self_type.lower())
        self.identity = f"{self.name}({', '.join(ident)})"
        self.header = (self.params, self.returns)

    @staticmethod
    def _is_type_start(words):
        # "double precision", "timestamp with time zone", "character varying":
        # a type of several words with no parameter name before it
        first = words[0].lower()
        return first in ("double", "character", "bit", "timestamp", "time", "interval") and \
            words[1].lower() in ("precision", "varying", "with", "without", "varying(")

    def drop(self):
        return f"DROP {self.kind} IF EXISTS {self.identity};"

    def replace(self):
        return FUNC.sub(lambda m: f"CREATE OR REPLACE {m.group(1)} {m.group(2)}(", self.stmt, count=1) + ";"


VIEW = re.compile(r"CREATE\s+(?:OR\s+REPLACE\s+)?VIEW\s+([\w.\"]+)", re.I)
TABLE = re.compile(r"CREATE\s+(?:UNLOGGED\s+)?TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?([\w.\"]+)", re.I)
COMMENT = re.compile(r"COMMENT\s+ON\s+(.*?)\s+IS\s", re.I | re.S)
GRANT = re.compile(r"(GRANT|REVOKE)\s", re.I)
ALTERED = re.compile(r"(?:ALTER|DROP)\s+TABLE\s+(?:IF\s+EXISTS\s+)?(?:ONLY\s+)?([\w.\"]+)", re.I)


def catalog(stmts):
    """What a script defines: functions by identity, views, tables and
    comments by name, every other statement by its text."""
    funcs, views, tables, comments, others = {}, {}, {}, {}, set()
    for s in stmts:
        if FUNC.match(s):
            f = Function(s)
            funcs[f.identity] = f
        elif VIEW.match(s):
            views[VIEW.match(s).group(1).lower()] = norm(s)
        elif TABLE.match(s):
            tables[TABLE.match(s).group(1).lower()] = norm(s)
        elif COMMENT.match(s):
            comments[norm(COMMENT.match(s).group(1)).lower()] = norm(s)
        others.add(norm(s))
    return funcs, views, tables, comments, others


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", required=True, help="the old version's install script")
    ap.add_argument("--handwritten", help="the hand-written part that runs before this one")
    ap.add_argument("parts", nargs="+", help="this version's SQL parts, in install order")
    a = ap.parse_args()

    with open(a.old, encoding="utf-8") as fh:
        old_funcs, old_views, old_tables, old_comments, old_others = catalog(statements(fh.read()))
    hand_tables, hand_others = set(), set()
    if a.handwritten:
        with open(a.handwritten, encoding="utf-8") as fh:
            for s in statements(fh.read()):
                hand_others.add(norm(s))
                for m in ALTERED.finditer(s):
                    hand_tables.add(m.group(1).lower())
                if TABLE.match(s):
                    hand_tables.add(TABLE.match(s).group(1).lower())

    out = []
    new_funcs = {}
    missed = []
    for part in a.parts:
        with open(part, encoding="utf-8") as fh:
            stmts = statements(fh.read())
        section = []
        for s in stmts:
            n = norm(s)
            if FUNC.match(s):
                f = Function(s)
                new_funcs[f.identity] = f
                old = old_funcs.get(f.identity)
                if old is not None and norm(old.stmt) == norm(f.stmt):
                    continue
                if old is not None and old.header != f.header:
                    section.append(old.drop())
                section.append(f.replace())
            elif VIEW.match(s):
                name = VIEW.match(s).group(1).lower()
                if old_views.get(name) == n:
                    continue
                section.append(VIEW.sub(lambda m: f"CREATE OR REPLACE VIEW {m.group(1)}", s, count=1) + ";")
            elif COMMENT.match(s):
                if old_comments.get(norm(COMMENT.match(s).group(1)).lower()) == n:
                    continue
                section.append(s + ";")
            elif GRANT.match(s):
                section.append(s + ";")
            elif n in old_others or n in hand_others:
                continue
            elif TABLE.match(s):
                name = TABLE.match(s).group(1).lower()
                if name in hand_tables:
                    continue
                if name in old_tables:
                    missed.append(f"{name} (in {part})")
                    continue
                section.append(s + ";")
            else:
                section.append(s + ";")
        if section:
            out.append(f"-- from {part}\n" + "\n\n".join(section))

    if missed:
        # the build goes on (everything else still works); the upgrade
        # itself fails at once, saying what to do
        message = ("these tables differ from the old version's and the hand-written upgrade does "
                   "not ALTER them: " + ", ".join(missed) + "; write their ALTER TABLE into "
                   + (a.handwritten or "the hand-written upgrade"))
        sys.stderr.write("upgrade_part.py: warning: " + message + "\n")
        out.insert(0, "-- tables this script cannot bring up to date\n"
                   "DO $upgrade$ BEGIN RAISE EXCEPTION '%', "
                   + "'" + ("mdd upgrade incomplete: " + message).replace("'", "''") + "'"
                   + " USING ERRCODE = 'XX000'; END $upgrade$;")

    # functions of the old version that this one no longer has (by that
    # signature): dropped before anything is created, so that a call that
    # matched them now finds the new ones
    gone = [f.drop() for ident, f in old_funcs.items() if ident not in new_funcs]
    print("-- generated by scripts/upgrade_part.py from " + ", ".join(a.parts))
    if gone:
        print("-- functions of the old version that are gone\n" + "\n".join(gone) + "\n")
    print("\n\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
