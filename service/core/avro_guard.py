"""Bounds for reading Avro written by someone else: a writer schema checked once, each record's
bytes walked before fastavro reads them. Pure.

Why: fastavro trusts its input. A block count is a number the writer chose, and an item of
``null`` (or an empty record, or a zero-size fixed) takes no bytes, so a record of a few bytes
can declare 2**62 of them: fastavro then loops for ever without releasing the GIL (issue 19).
It also reads an enum index of -1 as the last symbol, and an 11-byte varint as a wrapped
number. A registered writer schema can be one fastavro cannot parse at all, or one whose
smallest record is a million values.

``compile_writer`` turns a parsed writer schema into a ``Program`` (or refuses it with
``PoisonMessage("incompatible_schema")``): nesting at most ``MAX_DEPTH`` deep, named types
resolved, and the smallest record of the schema within ``MAX_VALUES`` values.

``check_record`` walks one record's bytes with its ``Program``, exactly as fastavro will read
them (the same writer schema, the same order), and raises ``PoisonMessage`` unless:
- every varint is at most 10 bytes and fits in 64 bits (an ``int`` at most 5 bytes, 32 bits);
- every length is non-negative and within the record, every boolean is 0 or 1;
- every enum and union index names a symbol or branch;
- every array or map block count fits in what is left of the budget (each item is at least one
  value), a block's declared byte size matches its items, and a top-level field given a limit
  (``attributes``) holds at most that many entries in all;
- the walk visits at most ``MAX_VALUES`` values, nests at most ``MAX_DEPTH`` deep, and ends
  exactly at the end of the bytes.

So fastavro only ever reads records whose work is bounded by ``MAX_VALUES`` values and whose
strings are slices of the record: a few milliseconds at worst (measured in
``tests/fuzz``), and memory a small multiple of the record's size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from service.core.errors import PoisonMessage

MAX_VALUES = 4096  # values (fields, items, entries, strings...) one record may hold
MAX_DEPTH = 48  # nesting of records, unions, arrays and maps, in a schema and in a record

# Node kinds.
_NULL, _BOOLEAN, _INT, _LONG, _FLOAT, _DOUBLE, _BYTES, _FIXED = range(8)
_ENUM, _UNION, _RECORD, _ARRAY, _MAP = range(8, 13)
_PRIMITIVES = {
    "null": _NULL,
    "boolean": _BOOLEAN,
    "int": _INT,
    "long": _LONG,
    "float": _FLOAT,
    "double": _DOUBLE,
    "bytes": _BYTES,
    "string": _BYTES,  # on the wire, a string is its UTF-8 bytes (fastavro decodes them)
}


class _Node:
    """One type of the writer schema. ``size``: bytes of a fixed/float/double, symbols of an
    enum; ``items``: a record's fields, a union's branches, an array's item or a map's value;
    ``limit``: most entries in all (a limited top-level field), with its ``name``."""

    __slots__ = ("items", "kind", "limit", "name", "size")

    def __init__(self, kind: int, size: int = 0) -> None:
        self.kind = kind
        self.size = size
        self.items: tuple[_Node, ...] = ()
        self.limit = 0
        self.name = ""


class Program:
    """A checked writer schema, ready for ``check_record``."""

    __slots__ = ("min_values", "root")

    def __init__(self, root: _Node, min_values: int) -> None:
        self.root = root
        self.min_values = min_values


def _refuse(why: str) -> PoisonMessage:
    return PoisonMessage("incompatible_schema", why)


def compile_writer(schema: Any, limits: Mapping[str, int] | None = None) -> Program:
    """``schema`` as ``fastavro.parse_schema`` returns it. ``limits``: top-level field name ->
    most entries (in all blocks) of the array or map it holds. Raises ``PoisonMessage``
    (``incompatible_schema``) for a schema that cannot be read within the bounds."""
    if not isinstance(schema, dict) or schema.get("type") not in ("record", "error"):
        raise _refuse("the writer schema is not a record")
    try:
        root = _Compiler(limits or {}).record(schema, 0, top=True)
    except RecursionError:
        raise _refuse(f"the writer schema is nested deeper than {MAX_DEPTH}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise _refuse(f"the writer schema is malformed: {type(exc).__name__}") from None
    least = _Smallest().of(root)[0]
    if least > MAX_VALUES:
        raise _refuse(f"every record of the writer schema holds more than {MAX_VALUES} values")
    return Program(root, int(least))


class _Compiler:
    def __init__(self, limits: Mapping[str, int]) -> None:
        self.limits = limits
        self.named: dict[str, _Node] = {}
        self.shared = {kind: _Node(kind) for kind in set(_PRIMITIVES.values())}

    def node(self, schema: Any, depth: int, limited: str = "") -> _Node:
        if depth > MAX_DEPTH:
            raise _refuse(f"the writer schema is nested deeper than {MAX_DEPTH}")
        if isinstance(schema, str):
            kind = _PRIMITIVES.get(schema)
            if kind is not None:
                return self.shared[kind]
            named = self.named.get(schema)
            if named is None:
                raise _refuse(f"the writer schema uses an undefined type {schema[:80]!r}")
            return named
        if isinstance(schema, list):
            if not schema:
                raise _refuse("the writer schema has an empty union")
            node = _Node(_UNION)
            node.items = tuple(self.node(branch, depth + 1, limited) for branch in schema)
            return node
        if not isinstance(schema, dict):
            raise _refuse(
                "the writer schema has a type that is neither a name, a list nor an object"
            )
        kind = schema.get("type")
        if kind in ("record", "error"):
            return self.record(schema, depth)
        if kind == "enum":
            symbols = schema["symbols"]
            if not isinstance(symbols, list) or not symbols:
                raise _refuse("the writer schema has an enum without symbols")
            return self.define(schema, _Node(_ENUM, len(symbols)))
        if kind == "fixed":
            size = schema["size"]
            if type(size) is not int or size < 0:
                raise _refuse("the writer schema has a fixed type without a valid size")
            return self.define(schema, _Node(_FIXED, size))
        if kind in ("array", "map"):
            node = _Node(_ARRAY if kind == "array" else _MAP)
            node.items = (self.node(schema["items" if kind == "array" else "values"], depth + 1),)
            if limited:
                node.limit, node.name = self.limits[limited], limited
            return node
        # A primitive spelled as an object, with or without a logical type.
        return self.node(kind, depth + 1, limited)

    def define(self, schema: dict[str, Any], node: _Node) -> _Node:
        name = schema.get("name")
        if isinstance(name, str):
            self.named[name] = node
        return node

    def record(self, schema: dict[str, Any], depth: int, *, top: bool = False) -> _Node:
        node = self.define(schema, _Node(_RECORD))  # defined first: fields may refer to it
        fields = schema["fields"]
        if not isinstance(fields, list):
            raise _refuse("the writer schema has a record without a field list")
        node.items = tuple(
            self.node(
                field["type"],
                depth + 1,
                field["name"] if top and field["name"] in self.limits else "",
            )
            for field in fields
        )
        return node


class _Smallest:
    """Values walked by the smallest value of a node: 1 for a primitive, an enum, an array or a
    map (which may be empty); 1 + the sum of its fields for a record; 1 + the least branch for
    a union. Infinite for a record that contains itself without a union or a collection in
    between (no finite value exists).

    A depth-first walk with memory; a named type met again while it is being computed counts as
    infinite there (a smallest value never contains itself). A result that relied on that for
    an enclosing type is not remembered (``low``, as in Tarjan's algorithm): it holds only in
    that context. ``steps`` bounds the walk for schemas made to defeat the memory."""

    STEPS = 200_000

    def __init__(self) -> None:
        self.memo: dict[int, float] = {}
        self.active: dict[int, int] = {}  # node id -> its depth on the current path
        self.steps = 0

    def of(self, node: _Node) -> tuple[float, int]:
        """(smallest values, the shallowest active depth this result relied on or a large
        number)."""
        self.steps += 1
        if self.steps > self.STEPS:
            raise _refuse("the writer schema is too intricate to bound")
        if node.kind not in (_UNION, _RECORD):
            return 1, _NO_DEPTH
        key = id(node)
        found = self.memo.get(key)
        if found is not None:
            return found, _NO_DEPTH
        depth = self.active.get(key)
        if depth is not None:
            return math.inf, depth
        depth = len(self.active)
        self.active[key] = depth
        low = _NO_DEPTH
        values = []
        for child in node.items:
            value, child_low = self.of(child)
            values.append(value)
            low = min(low, child_low)
        del self.active[key]
        least = 1 + (sum(values) if node.kind == _RECORD else min(values))
        if low >= depth:
            self.memo[key] = least
            low = _NO_DEPTH
        return least, low


_NO_DEPTH = 1 << 30


class _Bad(Exception):
    """Raised inside the walk: the record is refused (``undecodable``) with this detail."""


class _Walk:
    __slots__ = ("end", "left", "value")

    def __init__(self, value: bytes) -> None:
        self.value = value
        self.end = len(value)
        self.left = MAX_VALUES

    def long(self, pos: int, most_bytes: int = 10, bits: int = 64) -> tuple[int, int]:
        """The zig-zag varint at ``pos`` (a long; an int with 5 and 32) and the position after."""
        value, end = self.value, self.end
        if pos < end and value[pos] < 0x80:  # one byte: most lengths, counts and indexes
            number = value[pos]
            return (number >> 1) ^ -(number & 1), pos + 1
        number = shift = 0
        for _ in range(most_bytes):
            if pos >= end:
                raise _Bad("the record ends inside a number")
            byte = value[pos]
            pos += 1
            number |= (byte & 0x7F) << shift
            if not byte & 0x80:
                if number >> bits:
                    raise _Bad(f"a number does not fit in {bits} bits")
                return (number >> 1) ^ -(number & 1), pos
            shift += 7
        raise _Bad(f"a number is longer than {most_bytes} bytes")

    def node(self, node: _Node, pos: int, depth: int) -> int:
        self.left -= 1
        if self.left < 0:
            raise _Bad(f"the record holds more than {MAX_VALUES} values")
        kind = node.kind
        if kind == _NULL:
            return pos
        if kind == _LONG:
            return self.long(pos)[1]
        if kind == _BYTES:
            return self.skip_bytes(pos)
        if kind == _INT:
            return self.long(pos, 5, 32)[1]
        if kind == _BOOLEAN:
            if pos >= self.end or self.value[pos] > 1:
                raise _Bad("a boolean is neither 0 nor 1")
            return pos + 1
        if kind in (_FIXED, _FLOAT, _DOUBLE):
            size = node.size if kind == _FIXED else 4 if kind == _FLOAT else 8
            if size > self.end - pos:
                raise _Bad("the record ends inside a fixed-size value")
            return pos + size
        if kind == _ENUM:
            index, pos = self.long(pos)
            if not 0 <= index < node.size:
                raise _Bad(f"enum index {index} names no symbol")
            return pos
        if depth >= MAX_DEPTH:
            raise _Bad(f"the record is nested deeper than {MAX_DEPTH}")
        if kind == _UNION:
            index, pos = self.long(pos)
            if not 0 <= index < len(node.items):
                raise _Bad(f"union index {index} names no branch")
            return self.node(node.items[index], pos, depth + 1)
        if kind == _RECORD:
            return self.fields(node.items, pos, depth + 1)
        return self.blocks(node, pos, depth + 1)

    def fields(self, fields: tuple[_Node, ...], pos: int, depth: int) -> int:
        """A record's fields. Strings with a one-byte length, and unions with a one-byte index
        whose branch is null, are read here (most fields of most records): the same checks as
        ``node``, without its calls."""
        value, end = self.value, self.end
        for field in fields:
            kind = field.kind
            if pos < end:
                x = value[pos]
                if kind == _BYTES and x < 0x80:
                    self.left -= 1
                    if x & 1 or self.left < 0:
                        pos = self.node(field, pos, depth)  # it names the problem
                        continue
                    pos += 1 + (x >> 1)
                    if pos > end:
                        raise _Bad("a length is negative or past the end of the record")
                    continue
                if kind == _UNION and x < 0x80 and not x & 1:
                    branches = field.items
                    if (x >> 1) < len(branches) and branches[x >> 1].kind == _NULL:
                        self.left -= 2
                        if self.left >= 0:
                            pos += 1
                            continue
                        self.left += 2
            pos = self.node(field, pos, depth)
        return pos

    def blocks(self, node: _Node, pos: int, depth: int) -> int:
        """An array's or a map's blocks: a count, (a byte size when the count is negative),
        the items; a zero count ends them."""
        item = node.items[0]
        is_map = node.kind == _MAP
        total = 0
        count, pos = self.long(pos)
        while count:
            block_end = -1
            if count < 0:
                count = -count
                size, pos = self.long(pos)
                if size < 0 or size > self.end - pos:
                    raise _Bad("a block size is negative or past the end of the record")
                block_end = pos + size
            total += count
            if node.limit and total > node.limit:
                raise PoisonMessage(
                    "invalid_field", f"{node.name} has more than {node.limit} entries"
                )
            # Each item is at least one value: a count beyond the budget is refused at once,
            # before a single item is read (the 2**62 nulls of issue 19).
            if count > self.left:
                raise _Bad(f"a block of {count} items is more than {MAX_VALUES} values")
            if item.kind in (_NULL, _LONG, _INT, _BYTES):
                pos = self.flat(item.kind, count, pos, is_map)
            else:
                for _ in range(count):
                    if is_map:
                        pos = self.skip_bytes(pos)  # the key: a string
                    pos = self.node(item, pos, depth)
            if block_end >= 0 and pos != block_end:
                raise _Bad("a block's byte size does not match its items")
            count, pos = self.long(pos)
        return pos

    def flat(self, kind: int, count: int, pos: int, keyed: bool) -> int:
        """``count`` items of a primitive ``kind`` (null, int, long, bytes or string), each after
        its key when ``keyed``: the common arrays and maps, without a ``node`` call each."""
        self.left -= count
        if self.left < 0:
            raise _Bad(f"the record holds more than {MAX_VALUES} values")
        if kind == _NULL and not keyed:
            return pos  # items of no bytes: the budget alone bounds them
        long, skip_bytes = self.long, self.skip_bytes
        for _ in range(count):
            if keyed:
                pos = skip_bytes(pos)
            if kind == _BYTES:
                pos = skip_bytes(pos)
            elif kind == _LONG:
                pos = long(pos)[1]
            elif kind == _INT:
                pos = long(pos, 5, 32)[1]
        return pos

    def skip_bytes(self, pos: int) -> int:
        size, pos = self.long(pos)
        if size < 0 or size > self.end - pos:
            raise _Bad("a length is negative or past the end of the record")
        return pos + size


def check_record(program: Program, value: bytes, start: int) -> None:
    """Raise ``PoisonMessage`` unless ``value[start:]`` is one record of ``program``'s schema
    within the bounds (see the module docstring)."""
    walk = _Walk(value)
    try:
        end = walk.node(program.root, start, 0)
    except _Bad as bad:
        raise PoisonMessage("undecodable", str(bad)) from None
    if end != len(value):
        raise PoisonMessage("undecodable", "trailing bytes after the Avro record")
