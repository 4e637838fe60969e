"""Hostile variations of the model order (publisher/model.json), driven by a ``random.Random``
(hypothesis hands the property tests one it controls, so that it can shrink what it finds).

Each message starts from the model with a uid of the caller's, goes through one to three
mutations of the tree (type swaps at random paths, missing and unknown fields, huge strings and
arrays, uid tricks), is serialised, and may then be mutated as bytes (truncation, invalid UTF-8,
NUL, duplicate keys, padding past 1 MiB). Values JSON encoders never write (NaN, Infinity, deep
nesting, lone surrogates, numbers out of any range, bytes that are not UTF-8) go in through
placeholders replaced after serialisation.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from typing import Any, Final

import orjson

from tests.orders import MODEL

Path = tuple[str | int, ...]

_PLACEHOLDER: Final = "\u2063fuzz-raw-{}\u2063"
_MEMBER: Final = b"member:"

# Raw JSON values, inserted verbatim where a value goes.
RAW_VALUES: Final[tuple[bytes, ...]] = (
    b"NaN",
    b"Infinity",
    b"-Infinity",
    b"1e999",
    b"-1e999",
    b"1e1000000",
    b"1e-1000000",
    b"-0",
    b"1" + b"0" * 30,
    b"1" + b"0" * 200_000,
    b"18446744073709551616",
    b"-9223372036854775809",
    b'"\\ud800"',
    b'"\\udfff"',
    b'"a\\ud800b"',
    b'"\\udc00\\ud800"',
    b'"\\ud83d\\ude00"',
    b'"\\u0000"',
    b'"a\\u0000"',
    b'"\\\\u0000"',
    b'"a\x00b"',
    b'"\xff"',
    b'"\xc3\x28"',
    b'"\xed\xa0\x80"',
    b'"\xc0\xaf"',
    b'"\xe2\x82"',
    b'"\xf4\x90\x80\x80"',
    b'"\x01\x1f"',
    b'"\\x41"',
    b"true",
    b"null",
    b"[]",
    b"{}",
)
_MOST_BYTES: Final = 2_000_000
NESTING_DEPTHS: Final = (2, 50, 200, 500, 900, 1_000, 5_000, 100_000)
STRING_LENGTHS: Final = (0, 1, 64, 65, 1_000, 100_000, 600_000, 1_100_000)
STRING_CHARS: Final = ("x", "é", "日", "😀", '"', "\\", "\n", "\x7f", "\u2028", "\ufeff", " ")
UID_TRICKS: Final = (
    "",
    "a" * 64,
    "a" * 65,
    "abc\n",
    "abc\r\n",
    "\nabc",
    "ü",
    "a b",
    "../etc",
    "a/b",
    "a%2Fb",
    "%00",
    "a.b",
    "😀",
    "ａｂｃ",  # fullwidth letters: \w would take them, the pattern must not
    "١٢٣",  # Arabic-Indic digits, likewise
)
INVALID_BYTES: Final = (
    b"\xff",
    b"\xfe\xff",
    b"\xc3\x28",
    b"\xed\xa0\x80",
    b"\xc0\xaf",
    b"\xe2\x82",
    b"\x00",
    b"\x80",
)


def message(rng: random.Random, uid: str) -> bytes:
    """One hostile message made from the model order with ``uid`` as its order_uid."""
    tree: Any = copy.deepcopy(MODEL)
    tree["order_uid"] = tree["payment"]["transaction"] = uid
    raws: list[bytes] = []
    for _ in range(rng.randint(1, 3)):
        tree = rng.choice(_TREE_MUTATIONS)(rng, tree, raws)
    data = orjson.dumps(tree, option=orjson.OPT_INDENT_2 if rng.random() < 0.3 else 0)
    for index, raw in enumerate(raws):
        quoted = orjson.dumps(_PLACEHOLDER.format(index))
        if raw.startswith(_MEMBER):
            # A whole member stands in for '"<placeholder>": null'.
            member = raw.removeprefix(_MEMBER)
            data = data.replace(quoted + b": null", member).replace(quoted + b":null", member)
        else:
            data = data.replace(quoted, raw)
    if rng.random() < 0.35:
        data = rng.choice(_BYTE_MUTATIONS)(rng, data)
    return data


def nesting_depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in ``data`` (outside strings)."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


# -- the tree ---------------------------------------------------------------------------------


def _paths(tree: Any, prefix: Path = ()) -> list[Path]:
    found: list[Path] = [prefix] if prefix else []
    if isinstance(tree, dict):
        for key, value in tree.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            found += _paths(value, (*prefix, index))
    return found


def _containers(tree: Any, prefix: Path = ()) -> list[Path]:
    """Paths of the objects in the tree (the root is ``()``)."""
    found: list[Path] = [prefix] if isinstance(tree, dict) else []
    if isinstance(tree, dict):
        for key, value in tree.items():
            found += _containers(value, (*prefix, key))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            found += _containers(value, (*prefix, index))
    return found


def _get(tree: Any, path: Path) -> Any:
    for step in path:
        tree = tree[step]
    return tree


def _set(tree: Any, path: Path, value: Any) -> Any:
    if not path:
        return value
    _get(tree, path[:-1])[path[-1]] = value
    return tree


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return rng.choice([0, -1, 1, 2**31, 2**63 - 1, -(2**63), 2**64 - 1, 101, -100])
    if kind == 1:
        return rng.choice([0.0, -0.0, 1.5, 1e308, -1e-308, 3.0])
    if kind == 2:
        return rng.choice(STRING_CHARS) * rng.choice((0, 1, 3, 64, 65))
    if kind == 3:
        return rng.choice([True, False])
    if kind == 4:
        return None
    if kind == 5:
        return rng.choice(["2021-11-26T06:22:19Z", "2021-13-45T99:99:99Z", "yesterday", ""])
    if kind == 6:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if kind == 7:
        return {f"k{index}": _random_value(rng, depth + 1) for index in range(rng.randint(0, 3))}
    return copy.deepcopy(_get(MODEL, rng.choice(_paths(MODEL))))


def _type_swap(rng: random.Random, tree: Any, raws: list[bytes]) -> Any:
    paths = _paths(tree)
    return _set(tree, rng.choice(paths), _random_value(rng)) if paths else _random_value(rng)


def _remove_field(rng: random.Random, tree: Any, raws: list[bytes]) -> Any:
    keyed = [path for path in _paths(tree) if isinstance(path[-1], str)]
    if not keyed:
        return tree
    path = rng.choice(keyed)
    del _get(tree, path[:-1])[path[-1]]
    return tree


def _unknown_field(rng: random.Random, tree: Any, raws: list[bytes]) -> Any:
    containers = _containers(tree)
    if containers:
        where = _get(tree, rng.choice(containers))
        where[rng.choice(["zz", "order_uid_", "é", "", " ", "items "])] = _random_value(rng)
    return tree


def _raw_value(rng: random.Random, tree: Any, raws: list[bytes]) -> Any:
    """A value no encoder writes, at a known path or in a field the order does not name."""
    choice = rng.randrange(3)
    if choice == 0:
        raw = rng.choice(RAW_VALUES)
    elif choice == 1:
        depth = rng.choice(NESTING_DEPTHS)
        raw = (
            b"[" * depth + b"]" * depth
            if rng.random() < 0.5
            else b'{"a":' * depth + b"1" + b"}" * depth
        )
    else:
        raw = b'"' + rng.choice(INVALID_BYTES) + b'"'
    placeholder = _PLACEHOLDER.format(len(raws))
    raws.append(raw)
    paths, containers = _paths(tree), _containers(tree)
    if paths and (rng.random() < 0.5 or not containers):
        return _set(tree, rng.choice(paths), placeholder)
    if containers:
        _get(tree, rng.choice(containers))["zz"] = placeholder
        return tree
    return placeholder


def _raw_key(rng: random.Random, tree: Any, raws: list[bytes]) -> Any:
    """A key with a NUL, a lone surrogate or invalid UTF-8 in it, in a random object."""
    containers = _containers(tree)
    if not containers:
        return tree
    placeholder = _PLACEHOLDER.format(len(raws))
    member = rng.choice([b'"\\u0000": 1', b'"\\ud800": 1', b'"\xff": 1', b'"a\x00": 1'])
    raws.append(_MEMBER + member)
    _get(tree, rng.choice(containers))[placeholder] = None
    return tree


def _huge_string(rng: random.Random, tree: Any, raws: list[bytes]) -> Any:
    strings = [path for path in _paths(tree) if isinstance(_get(tree, path), str)]
    if not strings:
        return tree
    char = rng.choice(STRING_CHARS)
    length = min(rng.choice(STRING_LENGTHS), _MOST_BYTES // len(char.encode()))
    return _set(tree, rng.choice(strings), char * length)


def _huge_array(rng: random.Random, tree: Any, raws: list[bytes]) -> Any:
    """Many items (none at all, or up to some 2 MB of them)."""
    if not isinstance(tree, dict) or not isinstance(tree.get("items"), list) or not tree["items"]:
        return tree
    if raws:
        return tree  # a raw value in the items would be copied too: keep the size in hand
    size = len(orjson.dumps(tree["items"]))
    times = min(rng.choice((0, 2, 100, 1_000, 5_000)), max(1, _MOST_BYTES // size))
    # Separate copies: a later mutation of one item must not change thousands of them.
    tree["items"] = orjson.loads(orjson.dumps(tree["items"] * times))
    return tree


def _uid_trick(rng: random.Random, tree: Any, raws: list[bytes]) -> Any:
    if isinstance(tree, dict):
        tree["order_uid"] = rng.choice(UID_TRICKS)
    return tree


def _not_an_object(rng: random.Random, tree: Any, raws: list[bytes]) -> Any:
    return rng.choice([[tree], "order", 42, None, []])


_TREE_MUTATIONS: Final[tuple[Callable[[random.Random, Any, list[bytes]], Any], ...]] = (
    _type_swap,
    _type_swap,
    _remove_field,
    _unknown_field,
    _raw_value,
    _raw_value,
    _raw_value,
    _raw_key,
    _huge_string,
    _huge_array,
    _uid_trick,
    _not_an_object,
)


# -- the bytes --------------------------------------------------------------------------------


def _truncate(rng: random.Random, data: bytes) -> bytes:
    return data[: rng.randrange(len(data) + 1)]


def _insert_bytes(rng: random.Random, data: bytes) -> bytes:
    at = rng.randrange(len(data) + 1)
    return data[:at] + rng.choice(INVALID_BYTES) + data[at:]


def _flip_byte(rng: random.Random, data: bytes) -> bytes:
    if not data:
        return data
    at = rng.randrange(len(data))
    return data[:at] + bytes([data[at] ^ (1 << rng.randrange(8))]) + data[at + 1 :]


def _duplicate_key(rng: random.Random, data: bytes) -> bytes:
    """A second member with a key the object already has, first or last."""
    if not data.startswith(b"{"):
        return data
    member = rng.choice(
        [b'"order_uid":"dup-first"', b'"items":[]', b'"locale":1', b'"order_uid":"x\\n"']
    )
    if rng.random() < 0.5:
        return b"{" + member + b"," + data[1:]
    return data.rstrip()[:-1].rstrip() + b"," + member + b"}"


def _past_one_mib(rng: random.Random, data: bytes) -> bytes:
    padding = b" " * (1024 * 1024 + 1 - len(data) + rng.randrange(1000))
    return padding + data if rng.random() < 0.5 else data + padding


def _bom(rng: random.Random, data: bytes) -> bytes:
    return b"\xef\xbb\xbf" + data


_BYTE_MUTATIONS: Final[tuple[Callable[[random.Random, bytes], bytes], ...]] = (
    _truncate,
    _insert_bytes,
    _flip_byte,
    _duplicate_key,
    _duplicate_key,
    _past_one_mib,
    _bom,
)
