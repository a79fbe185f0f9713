"""A small SQL sanitiser and summariser shared by the database instrumentors.

``summarize(sql)`` returns a :class:`SqlSummary`: the text with every literal
replaced by ``?`` (strings, dollar-quoted strings, numbers -- signed ones
included --, hex and bit strings, ``TRUE``/``FALSE``), comments removed and
``IN (...)`` lists of literals or placeholders collapsed to ``IN (?)``; the
operation name (``SELECT``, ``INSERT``, ... -- the main statement's, after a
``WITH`` clause); and the collection (table) name when the statement touches
exactly one table (best effort, a lexer -- not a parser).

Bound-parameter placeholders (``?``, ``%s``, ``%(name)s``, ``:name``, ``$1``)
are kept as they are. Two flavours exist because quoting differs:

* ``"ansi"`` (PostgreSQL, SQLite, most others): ``'...'`` with ``''`` escapes
  is a string, ``E'...'`` also takes backslash escapes, ``"..."`` is an
  identifier, ``$tag$...$tag$`` is a string.
* ``"mysql"`` (MySQL, MariaDB): backslash escapes in every string and
  ``"..."`` is a string too (without ANSI_QUOTES); ```...``` is an identifier.

An unterminated string or comment runs to the end of the text and is replaced
as a whole, so a truncated or malformed statement never leaks its tail.
Results are cached per ``(statement, flavour)`` in a bounded LRU cache: ORMs
issue the same few statements over and over.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import List, NamedTuple, Optional, Set

__all__ = ["SqlSummary", "summarize", "sanitize", "ANSI", "MYSQL", "CACHE_SIZE", "flavor_for"]

ANSI = "ansi"
MYSQL = "mysql"

#: Distinct statements remembered per process (all flavours together).
CACHE_SIZE = 2048
#: Statements longer than this are only lexed up to this many characters (the
#: rest is dropped: the text is truncated far earlier anyway).
MAX_LEX = 65536


class SqlSummary(NamedTuple):
    text: str
    operation: Optional[str]
    collection: Optional[str]


# Token kinds
_WS, _COMMENT, _LIT, _QID, _PARAM, _WORD, _OP = range(7)

_COMMON_HEAD = r"""
 (?P<ws>\s+)
|(?P<comment>--[^\n]*|\#[^\n]*MYSQLHASH|/\*.*?(?:\*/|\Z))
|(?P<dollar>\$(?P<tag>(?:[A-Za-z_\x80-\uffff][A-Za-z_0-9\x80-\uffff]*)?)\$.*?(?:\$(?P=tag)\$|\Z))
|(?P<estr>[Ee]'(?:[^'\\]|''|\\.)*(?:'|\Z))
"""

_ANSI_STR = r"""
|(?P<str>(?:[XxBbNn]|_[A-Za-z0-9]+)?'(?:[^']|'')*(?:'|\Z))
|(?P<qid>"(?:[^"]|"")*(?:"|\Z)|`(?:[^`]|``)*(?:`|\Z))
"""

_MYSQL_STR = r"""
|(?P<str>(?:[XxBbNn]|_[A-Za-z0-9]+)?'(?:[^'\\]|''|\\.)*(?:'|\Z)|"(?:[^"\\]|""|\\.)*(?:"|\Z))
|(?P<qid>`(?:[^`]|``)*(?:`|\Z))
"""

_COMMON_TAIL = r"""
|(?P<hex>0[xX][0-9A-Fa-f]+|0[bB][01]+)
|(?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
|(?P<param>\$\d+|%\(\w+\)s|%s|:[A-Za-z_]\w*|:\d+|\?\d*)
|(?P<word>[A-Za-z_\x80-\uffff][\w$\x80-\uffff]*)
|(?P<op>.)
"""


def _compile(flavor: str) -> "re.Pattern[str]":
    head = _COMMON_HEAD
    # ``#`` starts a comment only in MySQL.
    head = head.replace(r"|\#[^\n]*MYSQLHASH", r"|\#[^\n]*" if flavor == MYSQL else "")
    body = _MYSQL_STR if flavor == MYSQL else _ANSI_STR
    return re.compile(head + body + _COMMON_TAIL, re.VERBOSE | re.DOTALL)


_LEXERS = {ANSI: _compile(ANSI), MYSQL: _compile(MYSQL)}

_KIND = {
    "ws": _WS,
    "comment": _COMMENT,
    "dollar": _LIT,
    "estr": _LIT,
    "str": _LIT,
    "hex": _LIT,
    "num": _LIT,
    "qid": _QID,
    "param": _PARAM,
    "word": _WORD,
    "op": _OP,
}

_BOOLEANS = frozenset({"TRUE", "FALSE"})

#: Words after which ``-5`` is a negative literal rather than a subtraction.
_PREFIX_KEYWORDS = frozenset(
    """SELECT WHERE AND OR NOT ON THEN ELSE WHEN CASE VALUES IN BETWEEN LIKE ILIKE IS BY
    LIMIT OFFSET SET RETURN RETURNING HAVING DEFAULT INTERVAL AS ALL ANY SOME DISTINCT""".split()
)

#: Words that end a FROM list (or are never a table name).
_CLAUSE_WORDS = frozenset(
    """WHERE GROUP ORDER HAVING LIMIT OFFSET FETCH FOR UNION INTERSECT EXCEPT MINUS WINDOW
    JOIN INNER LEFT RIGHT FULL OUTER CROSS NATURAL STRAIGHT_JOIN ON USING RETURNING SET VALUES
    SELECT LATERAL ONLY WITH AS DEFAULT INTO LOCK SHARE NOWAIT SKIP QUALIFY""".split()
)

_INTRODUCERS = frozenset({"FROM", "JOIN", "STRAIGHT_JOIN", "INTO", "USING"})
_TABLE_MODIFIERS = frozenset({"ONLY", "LOW_PRIORITY", "IGNORE", "QUICK", "DELAYED", "HIGH_PRIORITY", "LATERAL"})
_MULTI_SET = frozenset({"UNION", "INTERSECT", "EXCEPT", "MINUS"})
_MAIN_OPERATIONS = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "VALUES", "TABLE", "UPSERT", "REPLACE"})
_DDL = frozenset({"CREATE", "DROP", "ALTER", "TRUNCATE"})
_DDL_SKIP = frozenset(
    {"TABLE", "TEMPORARY", "TEMP", "GLOBAL", "LOCAL", "UNLOGGED", "IF", "NOT", "EXISTS", "ONLY", "OR", "REPLACE"}
)


class _Tok:
    __slots__ = ("kind", "text", "upper")

    def __init__(self, kind: int, text: str) -> None:
        self.kind = kind
        self.text = text
        self.upper = text.upper() if kind == _WORD else text


def _unterminated(text: str) -> bool:
    """``"a""`` style: the closing quote is really an escaped one."""
    q = text[0]
    inner = text[1:-1]
    return (len(inner) - len(inner.rstrip(q))) % 2 == 1


def _lex(sql: str, flavor: str) -> List[_Tok]:
    lexer = _LEXERS.get(flavor) or _LEXERS[ANSI]
    tokens = []
    for match in lexer.finditer(sql):
        kind = _KIND[match.lastgroup or "op"]  # type: ignore[index]
        if kind == _WS or kind == _COMMENT:
            # Whitespace and comments become one separator token.
            if tokens and tokens[-1].kind == _WS:
                continue
            tokens.append(_Tok(_WS, " "))
            continue
        text = match.group()
        if kind == _WORD and text.upper() in _BOOLEANS:
            kind = _LIT
        elif kind == _QID and (len(text) < 2 or text[-1] != text[0] or _unterminated(text)):
            kind = _LIT  # a quoted name running to the end: malformed, hide it
        tokens.append(_Tok(kind, text))
    return tokens


def _is_operand(tok: Optional[_Tok]) -> bool:
    """True when ``tok`` ends an operand (so a following ``-`` is binary)."""
    if tok is None:
        return False
    if tok.kind in (_LIT, _QID, _PARAM):
        return True
    if tok.kind == _WORD:
        return tok.upper not in _PREFIX_KEYWORDS
    return tok.text == ")"


def _sanitize_tokens(tokens: List[_Tok]) -> List[_Tok]:
    """Literals -> ``?``, signed numbers merged, ``IN (...)`` lists collapsed."""
    out: List[_Tok] = []
    last_sig: Optional[_Tok] = None  # last significant token in ``out``
    before_last: Optional[_Tok] = None
    i, n = 0, len(tokens)
    while i < n:
        tok = tokens[i]
        kind = tok.kind
        if kind == _WS:
            out.append(tok)
            i += 1
            continue
        if kind == _LIT:
            # A sign directly before a number, where an operand cannot end, belongs to it.
            if (
                last_sig is not None
                and last_sig.kind == _OP
                and last_sig.text in "-+"
                and out
                and out[-1] is last_sig
                and not _is_operand(before_last)
            ):
                out.pop()
                last_sig = before_last
            tok = _Tok(_LIT, "?")
        elif kind == _OP and tok.text == "(" and last_sig is not None and last_sig.kind == _WORD and last_sig.upper == "IN":
            # IN ( literal-or-placeholder [, ...] ) -> IN (?)
            j, only_values, seen = i + 1, True, False
            while j < n:
                t = tokens[j]
                if t.kind in (_LIT, _PARAM):
                    seen = True
                elif t.kind == _WS or (t.kind == _OP and t.text in ",-+"):
                    pass
                elif t.kind == _OP and t.text == ")":
                    break
                else:
                    only_values = False
                    break
                j += 1
            if only_values and seen and j < n:
                out.append(_Tok(_OP, "(?)"))
                before_last, last_sig = last_sig, out[-1]
                i = j + 1
                continue
        out.append(tok)
        before_last, last_sig = last_sig, tok
        i += 1
    return out


def _name_at(sig: List[_Tok], k: int) -> "tuple[Optional[str], int]":
    """A possibly qualified table name starting at ``sig[k]``: ``(name, next index)``."""
    parts = []
    while k < len(sig):
        tok = sig[k]
        if tok.kind == _WORD:
            if not parts and tok.upper in _CLAUSE_WORDS:
                return None, k
            parts.append(tok.text)
        elif tok.kind == _QID:
            text = tok.text
            q = text[0]
            inner = text[1:-1] if len(text) > 1 and text.endswith(q) else text[1:]
            parts.append(inner.replace(q + q, q))
        else:
            break
        k += 1
        if k < len(sig) and sig[k].kind == _OP and sig[k].text == ".":
            k += 1
            continue
        break
    return (".".join(parts) if parts else None), k


def _analyze(tokens: List[_Tok]) -> "tuple[Optional[str], Optional[str]]":
    sig = [t for t in tokens if t.kind != _WS]
    if not sig:
        return None, None
    k = 0
    while k < len(sig) and sig[k].kind == _OP and sig[k].text == "(":
        k += 1
    if k >= len(sig) or sig[k].kind != _WORD:
        return None, None
    first = sig[k].upper
    operation = first
    main = k
    ctes: Set[str] = set()

    if first == "WITH":
        depth, expect_name = 0, True
        main = -1
        for idx in range(k + 1, len(sig)):
            tok = sig[idx]
            if tok.kind == _OP:
                if tok.text == "(":
                    depth += 1
                elif tok.text == ")":
                    depth -= 1
                elif tok.text == "," and depth == 0:
                    expect_name = True
                continue
            if depth != 0:
                continue
            if tok.kind in (_WORD, _QID):
                if expect_name:
                    if tok.kind == _WORD and tok.upper == "RECURSIVE":
                        continue
                    name, _ = _name_at(sig, idx)
                    if name:
                        ctes.add(name.lower())
                    expect_name = False
                    continue
                if tok.kind == _WORD and tok.upper in _MAIN_OPERATIONS:
                    main = idx
                    break
        if main < 0:
            return "WITH", None
        operation = sig[main].upper

    # Collection: every table named (in the statement and its subqueries);
    # exactly one distinct name, CTE names aside -> that name.
    if operation in _DDL:
        j = main + 1
        while j < len(sig) and sig[j].kind == _WORD and sig[j].upper in _DDL_SKIP:
            j += 1
        if any(t.upper == "TABLE" for t in sig[main + 1 : j]) or (operation == "TRUNCATE" and j == main + 1):
            return operation, _name_at(sig, j)[0]
        return operation, None

    tables: List[str] = []
    # One entry per open parenthesis: True for a subquery, False for a
    # function call or list (``EXTRACT(YEAR FROM ts)`` names no table).
    parens: List[bool] = []
    in_from = -1  # paren depth of the FROM list being read, -1 when none
    idx, count = k, len(sig)
    while idx < count:
        tok = sig[idx]
        kind = tok.kind
        if kind == _OP:
            text = tok.text
            if text == "(":
                nxt_tok = sig[idx + 1] if idx + 1 < count else None
                parens.append(
                    nxt_tok is not None
                    and (nxt_tok.upper in ("SELECT", "WITH", "VALUES") or nxt_tok.text == "(")
                )
            elif text == ")":
                if parens:
                    parens.pop()
                if in_from > len(parens):
                    in_from = -1
            elif text == "," and in_from == len(parens):
                name, nxt = _name_at(sig, idx + 1)
                if name and not (nxt < count and sig[nxt].text == "("):
                    tables.append(name)
                idx = max(nxt, idx + 1)
                continue
            idx += 1
            continue
        if kind != _WORD or (parens and not parens[-1]):
            idx += 1
            continue
        word = tok.upper
        if word in _MULTI_SET:
            return operation, None
        if in_from == len(parens) and word in _CLAUSE_WORDS:
            in_from = -1
        if word in _INTRODUCERS or (idx == main and word in ("UPDATE", "TABLE")):
            j = idx + 1
            while j < count and sig[j].kind == _WORD and sig[j].upper in _TABLE_MODIFIERS:
                j += 1
            name, nxt = _name_at(sig, j)
            is_function = word != "INTO" and nxt < count and sig[nxt].text == "("
            if name and not is_function:
                tables.append(name)
            if word == "FROM":
                in_from = len(parens)
            idx = max(nxt, idx + 1)
            continue
        idx += 1

    names = [t for t in tables if t.lower() not in ctes]
    if len({t.lower() for t in names}) == 1:
        return operation, names[0]
    return operation, None


def _build(sql: str, flavor: str) -> SqlSummary:
    tokens = _lex(sql if len(sql) <= MAX_LEX else sql[:MAX_LEX], flavor)
    operation, collection = _analyze(tokens)
    text = "".join(t.text for t in _sanitize_tokens(tokens)).strip()
    return SqlSummary(text, operation, collection)


@lru_cache(maxsize=CACHE_SIZE)
def summarize(sql: str, flavor: str = ANSI) -> SqlSummary:
    """Sanitised text, operation and collection of ``sql`` (cached)."""
    try:
        return _build(sql, flavor)
    except RecursionError:  # pragma: no cover - nothing here recurses
        return SqlSummary("?", None, None)


def sanitize(sql: str, flavor: str = ANSI) -> str:
    """Only the sanitised text of ``sql``."""
    return summarize(sql, flavor).text


def flavor_for(system: str) -> str:
    """The lexer flavour for a ``db.system.name`` value."""
    return MYSQL if system in ("mysql", "mariadb") else ANSI


def cache_clear() -> None:
    summarize.cache_clear()

