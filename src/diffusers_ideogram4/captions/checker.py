"""Check structured JSON captions (SPEC 7): every issue at once, each with a JSON path and a fix.

`check_caption` first measures the caption: one whose size alone proves it over the 2048-token limit gets that one
issue and nothing else is read (`limits.py`). Then three passes:

1. parse: the raw text (invalid JSON, plain text, `ensure_ascii=True` escapes, duplicate keys, non-minified text)
   and a depth / size guard so that nothing below can recurse without bound;
2. schema: `caption_schema.json` through `jsonschema`, with its errors translated into `CaptionIssue`s;
3. hand rules: what a JSON Schema cannot state (key order, bbox min <= max, text UTF-8 cannot encode) and the
   advisory warnings.

It never raises: malformed input of any kind is reported as an issue. Root issues use the path `"$"`. The work is
bounded: the size limit keeps what reaches the passes under about 16,000 JSON values, the text-box overlap test is a
sweep (O(n log n)), and at most MAX_ISSUES_PER_PLACE issues are listed per place and severity, with a count of the
rest.
"""

import difflib
import json
import re
import reprlib
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from jsonschema import Draft202012Validator, ValidationError, validators

from ..constants import MAX_TEXT_TOKENS
from .limits import min_caption_tokens
from .schema import (
    ART_STYLE_KEY_ORDER,
    BBOX_FIELDS,
    BBOX_MAX,
    COMPOSITION_KEY_ORDER,
    ELEMENT_KEY_ORDER,
    LOOSE_COLOR_PATTERN,
    MAX_NESTING_DEPTH,
    MAX_RECOMMENDED_ELEMENTS,
    OBJECT_ELEMENT_KEY_ORDER,
    OBJECT_TYPE,
    PHOTO_STYLE_KEY_ORDER,
    STYLE_KEY_ORDER,
    TEXT_ELEMENT_KEY_ORDER,
    TEXT_TYPE,
    TOP_LEVEL_KEY_ORDER,
    _schema,
)


ROOT_PATH = "$"
ERROR = "error"
WARNING = "warning"
CAPTION_CHECK_MODES = ("error", "warn", "off")

# Integers this large cannot even be printed (Python's int/str conversion limit); no caption needs them.
MAX_INT_BITS = 4096
# Longest key or value echoed back in a message or a path.
MAX_SHOWN_CHARS = 60
# Issues listed per place (a JSON path with every index and unknown key as `[*]`) and severity; the rest are counted.
MAX_ISSUES_PER_PLACE = 20
BYTE_ORDER_MARK = "\ufeff"

OPT_OUT_HINT = 'Fix the caption(s), or pass caption_check="warn" to generate anyway or caption_check="off" to skip it.'
CANONICALIZE_HINT = "diffusers_ideogram4.captions.canonicalize(caption)"
FORMAT_HINT = "`ideogram4 caption format FILE`"
EXPAND_HINT = (
    "to expand an idea into a caption with the text encoder, pass prompt_upsampling=True, call "
    'pipe.expand_prompt(idea), or run `ideogram4 caption expand "idea"`'
)
SERIALIZE_HINT = "json.dumps(caption, ensure_ascii=False, separators=(',', ':')) or Caption.to_json()"


@dataclass(frozen=True)
class CaptionIssue:
    """One problem in a caption.

    Args:
        path: where, as a JSON path such as `compositional_deconstruction.elements[2].bbox[1]`; `"$"` for the
            caption as a whole (invalid JSON, wrong top-level type, key order of the top-level object).
        message: what is wrong, naming the offending value.
        hint: how to fix it.
        severity: `"error"` (the caption is invalid) or `"warning"` (valid, but likely to generate worse images).
    """

    path: str
    message: str
    hint: str = ""
    severity: str = ERROR

    @property
    def is_error(self) -> bool:
        return self.severity == ERROR

    def __str__(self) -> str:
        line = f"{self.path}: {self.message}"
        return f"{line} ({self.hint})" if self.hint else line


class CaptionWarning(UserWarning):
    """Emitted by `check_prompts` for warning-severity issues, and for every issue with `caption_check="warn"`."""


class CaptionError(ValueError):
    """Invalid caption(s): `.issues` holds `(prompt_index, CaptionIssue)` pairs, the message lists them all.

    Args:
        issues: the `(prompt_index, issue)` pairs to report.
        num_prompts: how many prompts were checked; lines get a `prompt[i]` prefix when it is more than one
            (default: when any index is not 0).
        footer: a last line, e.g. how to opt out of the check.
    """

    def __init__(self, issues: Iterable[tuple[int, CaptionIssue]], num_prompts: int | None = None, footer: str = ""):
        self.issues = list(issues)
        self.num_prompts = num_prompts
        self.footer = footer
        super().__init__(_report(self.issues, num_prompts, footer))

    def __reduce__(self):  # picklable across processes despite the custom signature
        return type(self), (self.issues, self.num_prompts, self.footer)


# --------------------------------------------------------------------------------------------------------------------
# Paths and values as text
# --------------------------------------------------------------------------------------------------------------------


class _OddKey(str):
    """A path part for a dict key that is not a string (only possible for dict input): printed as `[<repr>]`."""


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

_shower = reprlib.Repr()
_shower.maxstring = MAX_SHOWN_CHARS
_shower.maxother = MAX_SHOWN_CHARS
_shower.maxlist = _shower.maxtuple = _shower.maxdict = _shower.maxset = 4
_shower.maxlevel = 3


def _show(value) -> str:
    """A short repr of any value: strings clipped, containers summarized, never raises."""
    try:
        return _shower.repr(value)
    except Exception:  # a repr that raises, or an int past Python's int/str conversion limit
        return f"<{type(value).__name__}>"


def _clip(text: str, limit: int = MAX_SHOWN_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def format_path(parts: tuple) -> str:
    """`("compositional_deconstruction", "elements", 2, "bbox")` -> `compositional_deconstruction.elements[2].bbox`.

    Keys that are not identifiers are quoted (`["my key"]`, ASCII-escaped); the empty path is `"$"`.
    """
    if not parts:
        return ROOT_PATH
    text = []
    for part in parts:
        if isinstance(part, _OddKey) or isinstance(part, int):
            text.append(f"[{part}]")
        elif len(part) <= MAX_SHOWN_CHARS and _IDENTIFIER.fullmatch(part):
            text.append(f".{part}" if text else part)
        else:
            text.append(f"[{json.dumps(_clip(part))}]")
    return "".join(text)


def _json_type(value) -> str:
    if value is None:
        return "null"
    for python_type, name in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string")):
        if isinstance(value, python_type):
            return name
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return f"Python {type(value).__name__}"


def _value_text(value) -> str:
    """A value as JSON would name it: `null`, `true`, `integer 5`, `string 'abc'`."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    return f"{_json_type(value)} {_show(value)}"


_TYPE_NOUNS = {"string": "a string", "object": "an object", "array": "a list", "integer": "an integer"}


# --------------------------------------------------------------------------------------------------------------------
# Issues carry their path as a tuple until the end, to be sorted in caption order.
# --------------------------------------------------------------------------------------------------------------------


def _issue(path: tuple, message: str, hint: str = "", severity: str = ERROR) -> tuple[tuple, CaptionIssue]:
    return path, CaptionIssue(format_path(path), message, hint, severity)


# Every known key's rank within its object, to list issues in the trained order. color_palette is last everywhere.
_KEY_RANK = {
    key: rank
    for order in (TOP_LEVEL_KEY_ORDER, STYLE_KEY_ORDER, COMPOSITION_KEY_ORDER, ELEMENT_KEY_ORDER)
    for rank, key in enumerate(order)
}


def _sort_key(found: tuple[tuple, CaptionIssue]) -> tuple:
    # Indices by value, known keys by their trained rank; unknown keys after them, in the order they were found.
    path, _ = found
    return tuple(part if isinstance(part, int) else _KEY_RANK.get(part, len(_KEY_RANK)) for part in path)


@dataclass(frozen=True)
class _Unlisted:
    """Issues that a check counted at a place without building them (the text-box overlaps past the first few)."""

    count: int
    severity: str


def _place(path: tuple) -> tuple:
    """The path with every index and every unknown key as `*`: issues at one place are capped together."""
    return tuple(part if isinstance(part, str) and part in _KEY_RANK else _OddKey("*") for part in path)


def _finish(found: list[tuple[tuple, CaptionIssue]]) -> list[CaptionIssue]:
    """Sorted by path in caption order (stable within a path), duplicates dropped, at most MAX_ISSUES_PER_PLACE per
    place and severity: the rest of a place are counted in one last issue of that place."""
    seen = set()
    issues = []
    unlisted = Counter()
    listed = Counter()
    last = {}  # place -> position after its last listed issue
    for path, issue in sorted(found, key=_sort_key):
        if isinstance(issue, _Unlisted):
            unlisted[_place(path), issue.severity] += issue.count
        elif issue not in seen:
            seen.add(issue)
            group = (_place(path), issue.severity)
            if listed[group] == MAX_ISSUES_PER_PLACE:
                unlisted[group] += 1
                continue
            listed[group] += 1
            issues.append(issue)
            last[group] = len(issues)
    end = len(issues)
    for group in sorted(unlisted, key=lambda group: last.get(group, end), reverse=True):
        (place, severity), count = group, unlisted[group]
        noun = severity if count == 1 else f"{severity}s"
        more = CaptionIssue(
            format_path(place),
            f"and {count:,} more {noun} here, not listed (at most {MAX_ISSUES_PER_PLACE} per place are)",
            severity=severity,
        )
        issues.insert(last.get(group, end), more)
    return issues


# --------------------------------------------------------------------------------------------------------------------
# Pass 1: the raw text
# --------------------------------------------------------------------------------------------------------------------

# One JSON escape at a time, so that an escaped backslash (`\\u00e9`, literal text) is not read as `\u00e9`.
_ESCAPE = re.compile(r"\\(?:u([0-9A-Fa-f]{4})|.)", re.DOTALL)


def _non_ascii_escape(text: str) -> str | None:
    """The first `\\uXXXX` escape of a non-ASCII character in an all-ASCII text: the ensure_ascii=True signature."""
    if not text.isascii():
        return None
    for match in _ESCAPE.finditer(text):
        if match.group(1) is not None and int(match.group(1), 16) > 0x7F:
            return match.group(0)
    return None


class _DuplicateKeys:
    """`object_pairs_hook` that builds dicts like `json.loads` (last value wins) and remembers repeated keys."""

    def __init__(self):
        self.repeated = {}  # id(dict) -> (dict, repeated keys); the dict is kept so its id stays unique

    def __call__(self, pairs: list) -> dict:
        result = dict(pairs)
        if len(result) < len(pairs):
            counts = Counter(key for key, _ in pairs)
            self.repeated[id(result)] = (result, [key for key, count in counts.items() if count > 1])
        return result


_UNPARSED = object()


def _parse_text(text: str) -> tuple[object, list]:
    """json.loads with every problem of the raw text reported. Returns (parsed or _UNPARSED, found issues)."""
    found = []
    if text.startswith(BYTE_ORDER_MARK):
        found.append(
            _issue(
                (),
                "caption starts with a byte-order mark (U+FEFF, the bytes EF BB BF in a UTF-8 file)",
                "remove it (save the file as UTF-8 without BOM): the prompt is tokenized verbatim, the mark included",
            )
        )
        text = text[len(BYTE_ORDER_MARK) :]
    escape = _non_ascii_escape(text)
    if escape is not None:
        found.append(
            _issue(
                (),
                f"non-ASCII characters are written as \\uXXXX escapes ({escape}): the caption was saved with "
                "ensure_ascii=True",
                f"the model was trained on literal UTF-8; re-save it with {SERIALIZE_HINT}",
            )
        )
    if not text.strip():
        found.append(_issue((), "caption is empty", "pass a structured JSON caption; build one with Caption"))
        return _UNPARSED, found

    duplicates = _DuplicateKeys()
    try:
        parsed = json.loads(text, object_pairs_hook=duplicates)
    except json.JSONDecodeError as error:
        if text.lstrip()[:1] in ("{", "[", '"'):
            hint = "fix the JSON syntax there"
            if text.lstrip().startswith("{'"):
                hint = f"this looks like a Python dict printed with str(); serialize it with {SERIALIZE_HINT}"
            where = f"line {error.lineno} column {error.colno} (char {error.pos})"
            found.append(_issue((), f"invalid JSON: {error.msg} at {where}", hint))
        else:
            found.append(
                _issue(
                    (),
                    f"plain text, not a structured JSON caption: {_show(text)}",
                    "Ideogram 4 was trained only on JSON captions; pass a structured JSON caption (README, "
                    "'Structured JSON captions'), build one with diffusers_ideogram4.Caption(...).to_json(), or "
                    + EXPAND_HINT,
                )
            )
        return _UNPARSED, found
    except RecursionError:
        found.append(_issue((), "JSON nests too deeply to parse", "a caption nests about 5 levels deep"))
        return _UNPARSED, found
    except ValueError as error:  # e.g. an integer literal past Python's int/str conversion limit
        found.append(_issue((), f"JSON value out of range: {_clip(str(error))}", "check the numbers in the caption"))
        return _UNPARSED, found

    if isinstance(parsed, str) and parsed.lstrip().startswith("{"):
        # Only the root cause: once decoded, the inner text gets checked on its own.
        twice = _issue((), "caption is a JSON string that holds JSON", "it was encoded twice; json.loads it once")
        return _UNPARSED, [twice]
    if not isinstance(parsed, dict):
        return parsed, found  # reported by the shape checks

    for part_path, keys in _duplicate_paths(parsed, duplicates.repeated):
        for key in keys:
            found.append(
                _issue(
                    part_path + (key,),
                    f"key {_show(key)} appears more than once; JSON keeps only the last value",
                    "keep one of them",
                    WARNING,
                )
            )
    if escape is None and not duplicates.repeated:
        try:
            minified = json.dumps(parsed, ensure_ascii=False, separators=(",", ":"))
        except (ValueError, RecursionError):
            minified = text
        if minified != text and minified == text.strip():
            found.append(
                _issue(
                    (),
                    "caption text has whitespace around the JSON (a file's trailing newline?)",
                    "strip it (text.strip()): the prompt is tokenized verbatim and the model saw bare JSON",
                    WARNING,
                )
            )
        elif minified != text:
            found.append(
                _issue(
                    (),
                    "caption text is not minified (extra whitespace or escapes)",
                    f"the prompt is tokenized verbatim and the model saw minified text; use {SERIALIZE_HINT}",
                    WARNING,
                )
            )
    return parsed, found


def _walk(root):
    """Yield (value, path, depth) for every value below `root`, depth first. A container reached twice (shared, or
    containing itself) is walked once; a consumer that stops early stops the walk."""
    stack = [(root, (), 1)]
    seen = set()
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if id(value) in seen:
                continue
            seen.add(id(value))
        yield value, path, depth
        if isinstance(value, dict):
            stack.extend((child, path + (_path_key(key),), depth + 1) for key, child in value.items())
        elif isinstance(value, list):
            stack.extend((child, path + (index,), depth + 1) for index, child in enumerate(value))


def _duplicate_paths(parsed: dict, repeated: dict):
    """Yield (path, repeated keys) for each parsed dict that had repeated keys."""
    if repeated:
        for value, path, _ in _walk(parsed):
            if isinstance(value, dict) and id(value) in repeated:
                yield path, repeated[id(value)][1]


def _guard(caption: dict) -> list:
    """Depth and size guard before any recursive walk: nesting past MAX_NESTING_DEPTH (or a dict that contains
    itself), and integers too large to print, stop the check with one issue."""
    for value, path, depth in _walk(caption):
        if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_INT_BITS:
            return [_issue(path, f"integer with {value.bit_length()} bits is out of range", "use 0..1000")]
        if isinstance(value, (dict, list)) and depth > MAX_NESTING_DEPTH:
            return [
                _issue(
                    path[:MAX_NESTING_DEPTH],
                    f"caption nests deeper than {MAX_NESTING_DEPTH} levels (a valid caption nests 5)",
                    "look for a value that contains itself or a runaway generator",
                )
            ]
    return []


def _path_key(key) -> str:
    return key if isinstance(key, str) else _OddKey(_show(key))


def _unencodable(caption: dict) -> list:
    """Every key and string value that UTF-8 cannot encode: lone surrogates, typed literally or decoded from a
    `\\ud800` escape (valid JSON, but the tokenizer cannot take it). Runs after `_guard`: the depth is bounded."""
    found = []
    for value, path, _ in _walk(caption):
        if isinstance(value, dict):
            for key in value:
                if isinstance(key, str):
                    found += _lone_surrogate(key, path + (key,), "key")
        elif isinstance(value, str):
            found += _lone_surrogate(value, path, "string")
    return found


def _lone_surrogate(text: str, path: tuple, what: str) -> list:
    if text.isascii():
        return []
    try:
        text.encode("utf-8")
        return []
    except UnicodeEncodeError as error:
        code_point = ord(text[error.start])
        return [
            _issue(
                path,
                f"{what} holds a lone surrogate U+{code_point:04X} at character {error.start}, which UTF-8 cannot "
                "encode",
                "a \\ud800-\\udfff escape is only valid as a high + low pair spelling one character; write the "
                "character itself or remove the escape",
            )
        ]


# --------------------------------------------------------------------------------------------------------------------
# Pass 2: the JSON Schema, through jsonschema
# --------------------------------------------------------------------------------------------------------------------


def _is_strict_integer(checker, value) -> bool:
    # JSON Schema counts 10.0 as an integer; the reference (and the tokenizer) do not: the text "10.0" is not "10".
    return isinstance(value, int) and not isinstance(value, bool)


def _ecma_pattern(validator, pattern, instance, schema):
    """JSON Schema patterns are ECMA-262 regexes, where a final `$` ends the string; Python's `$` also matches
    before a trailing newline (jsonschema uses `re.search`), which would let "#FFFFFF\n" through."""
    if not validator.is_type(instance, "string"):
        return
    python = pattern[:-1] + r"\Z" if pattern.endswith("$") and not pattern.endswith("\\$") else pattern
    if not re.search(python, instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


_CaptionValidator = validators.extend(
    Draft202012Validator,
    validators={"pattern": _ecma_pattern},
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_strict_integer),
)
_validator = None


def _schema_validator():
    global _validator
    if _validator is None:
        _validator = _CaptionValidator(_inline_refs(_schema(), _schema()["$defs"]))
    return _validator


def _inline_refs(node, definitions: dict):
    """The schema with every local `$ref` replaced by its definition (the caption schema has no recursive ones):
    jsonschema then validates each element without resolving a reference, a third faster on long lists."""
    if isinstance(node, dict):
        if "$ref" in node:
            return _inline_refs(definitions[node["$ref"].rsplit("/", 1)[-1]], definitions)
        return {key: _inline_refs(value, definitions) for key, value in node.items() if key != "$defs"}
    if isinstance(node, list):
        return [_inline_refs(value, definitions) for value in node]
    return node


def _resolve(subschema) -> dict:
    """Follow a local `#/$defs/name` reference (the only kind the caption schema uses)."""
    if isinstance(subschema, dict) and "$ref" in subschema:
        return _schema()["$defs"][subschema["$ref"].rsplit("/", 1)[-1]]
    return subschema if isinstance(subschema, dict) else {}


def _description(subschema) -> str:
    return _resolve(subschema).get("description", "").rstrip(".")


def _key_description(schema: dict, key: str) -> str:
    """A key's schema description, looked up in `schema`, else anywhere in the caption schema."""
    described = _description(schema.get("properties", {}).get(key))
    if described:
        return described
    for definition in (_schema(), *_schema()["$defs"].values()):
        described = _description(definition.get("properties", {}).get(key))
        if described:
            return described
    return ""


def _unknown_key(path: tuple, key, allowed: list[str]) -> tuple[tuple, CaptionIssue]:
    if isinstance(key, str):
        # Clipped: difflib is quadratic and a close match is short anyway.
        close = difflib.get_close_matches(key[:100], allowed, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}?" if close else f"allowed keys here: {', '.join(allowed)}"
    else:
        hint = f"keys are strings; allowed keys here: {', '.join(allowed)}"
    return _issue(path + (_path_key(key),), f"unknown key {_show(key)}", hint)


def _from_schema_error(error) -> list:
    """Translate one jsonschema error into issues with our paths, messages and hints."""
    path = tuple(error.absolute_path)
    keyword, instance, schema = error.validator, error.instance, error.schema
    description = _description(schema)

    if keyword == "type":
        expected = _TYPE_NOUNS.get(schema["type"], schema["type"])
        hint = description
        if isinstance(instance, float) and instance.is_integer() and schema["type"] == "integer":
            hint = f"write {int(instance)}, not {instance!r}: bbox values are JSON integers"
        return [_issue(path, f"expected {expected}, got {_value_text(instance)}", hint)]
    if keyword == "required":
        return [
            _issue(path + (key,), f"missing required key {key!r}", _key_description(schema, key))
            for key in error.validator_value
            if key not in instance
        ]
    if keyword == "additionalProperties":
        allowed = list(schema.get("properties", {}))
        return [_unknown_key(path, key, allowed) for key in instance if key not in schema.get("properties", {})]
    if keyword == "enum":
        choices = " or ".join(json.dumps(choice) for choice in error.validator_value)
        return [_issue(path, f"expected {choices}, got {_show(instance)}", description)]
    if keyword in ("minItems", "maxItems"):
        noun = "colours" if path and path[-1] == "color_palette" else "values"
        low, high = schema.get("minItems"), schema.get("maxItems")
        if low == high:
            message = f"expected exactly {low} {noun}, got {len(instance)}"
        elif keyword == "maxItems":
            message = f"{len(instance)} {noun}, at most {high} allowed"
        else:
            message = f"{len(instance)} {noun}, at least {low} needed"
        return [_issue(path, message, description)]
    if keyword in ("minimum", "maximum"):
        if not _is_strict_integer(None, instance):  # NaN, inf, 1e9: the type error says it all
            return []
        bounds = f"{schema['minimum']}..{schema['maximum']}"
        return [_issue(path, f"{_show(instance)} is out of range {bounds}", description)]
    if keyword == "pattern":
        if LOOSE_COLOR_PATTERN.fullmatch(instance):
            return [_issue(path, f"colour {instance!r} has lowercase hex digits", f"write {instance.upper()!r}")]
        return [_issue(path, f"{_show(instance)} is not a #RRGGBB colour", description)]
    if keyword == "oneOf":
        # photo XOR art_style. `required` ignores non-objects, so a non-object style also fails here: the type
        # error already covers it.
        if not isinstance(instance, dict):
            return []
        fix = "use 'photo' for a photographic style, or 'art_style' for any other style"
        if "photo" in instance and "art_style" in instance:
            return [_issue(path, "has both 'photo' and 'art_style'; a style is one or the other", fix)]
        return [_issue(path, "needs 'photo' or 'art_style'", fix)]
    if keyword == "not":
        # `text` on an element whose type is "obj".
        return [
            _issue(
                path + ("text",),
                f"'text' is only allowed on text elements, this element's type is {OBJECT_TYPE!r}",
                f"set \"type\": {json.dumps(TEXT_TYPE)} to render this string, or describe it in 'desc'",
            )
        ]
    return [_issue(path, _clip(error.message, 200), description)]  # not reached with the shipped schema


# --------------------------------------------------------------------------------------------------------------------
# Pass 3: rules a JSON Schema cannot state, and warnings
# --------------------------------------------------------------------------------------------------------------------


def _key_order(obj: dict, path: tuple, order: tuple, severity: str = ERROR) -> list:
    # Only known keys are compared: unknown keys are reported on their own.
    present = [key for key in obj if key in order]
    expected = [key for key in order if key in obj]
    if present == expected:
        return []
    return [
        _issue(
            path,
            f"keys out of order: got {', '.join(present)}; expected {', '.join(expected)}",
            f"the model was trained on the order {', '.join(order)}; reorder the keys or use {CANONICALIZE_HINT} "
            f"({FORMAT_HINT} for a file)",
            severity,
        )
    ]


def _style_order(style: dict) -> tuple:
    if "photo" in style and "art_style" not in style:
        return PHOTO_STYLE_KEY_ORDER
    if "art_style" in style and "photo" not in style:
        return ART_STYLE_KEY_ORDER
    return STYLE_KEY_ORDER


def _element_order(element: dict) -> tuple:
    kind = element.get("type")
    if isinstance(kind, str) and kind == TEXT_TYPE:
        return TEXT_ELEMENT_KEY_ORDER
    if isinstance(kind, str) and kind == OBJECT_TYPE:
        return OBJECT_ELEMENT_KEY_ORDER
    return ELEMENT_KEY_ORDER


def _bbox_values(bbox) -> list[int] | None:
    """The four values if `bbox` has the right shape (the schema reports it otherwise), else None."""
    if not isinstance(bbox, list) or len(bbox) != len(BBOX_FIELDS):
        return None
    if not all(isinstance(value, int) and not isinstance(value, bool) for value in bbox):
        return None
    return bbox


def _bbox_order(bbox, path: tuple) -> list:
    """min <= max on each axis whose two values are integers (the others get a type error from the schema)."""
    if not isinstance(bbox, list) or len(bbox) != len(BBOX_FIELDS):
        return []
    found = []
    for low, high in ((0, 2), (1, 3)):
        if _is_strict_integer(None, bbox[low]) and _is_strict_integer(None, bbox[high]) and bbox[low] > bbox[high]:
            found.append(
                _issue(
                    path,
                    f"{BBOX_FIELDS[low]} {bbox[low]} > {BBOX_FIELDS[high]} {bbox[high]} (bbox[{low}] > bbox[{high}])",
                    "bbox is [y_min, x_min, y_max, x_max] with min <= max; [left, top, right, bottom] or "
                    "[x_min, y_min, x_max, y_max] boxes need reordering (BBox.from_pixels does it)",
                )
            )
    return found


def _overlapping_boxes(boxes: list[tuple[int, list[int]]], limit: int) -> tuple[list[tuple[int, int]], int]:
    """Pairs of boxes with a positive intersection area (boxes that only touch do not overlap): the first `limit`
    pairs found from the top down, as (earlier, later) caption indices, and how many pairs there are in all.

    O(n log n) for n boxes: a sweep down the y axis keeps the boxes open at the current y and counts, in two Fenwick
    trees over x, how many of them start left of a new box's right edge and how many end left of its left edge; the
    open boxes are scanned only while pairs are still listed. Boxes outside 0..1000 or of zero area are skipped (the
    first get an error of their own, the second cannot overlap anything).
    """
    size = BBOX_MAX + 1
    starts, ends = [0] * (size + 1), [0] * (size + 1)  # Fenwick trees: x edges of the open boxes

    def add(tree: list[int], x: int, delta: int) -> None:
        x += 1
        while x <= size:
            tree[x] += delta
            x += x & -x

    def at_most(tree: list[int], x: int) -> int:  # how many edges at positions <= x
        x += 1
        total = 0
        while x > 0:
            total += tree[x]
            x -= x & -x
        return total

    kept = {
        index: box for index, box in boxes if 0 <= box[0] < box[2] <= BBOX_MAX and 0 <= box[1] < box[3] <= BBOX_MAX
    }
    # (y, 0 = the box ends / 1 = it starts, index): at the same y, boxes end before others start (touching is fine).
    events = sorted(
        [(box[0], 1, index) for index, box in kept.items()] + [(box[2], 0, index) for index, box in kept.items()]
    )
    open_boxes = {}
    pairs, total = [], 0
    for _, starting, index in events:
        _, x_min, _, x_max = box = kept[index]
        if not starting:
            del open_boxes[index]
            add(starts, x_min, -1)
            add(ends, x_max, -1)
            continue
        # An open box overlaps along x when it starts before x_max and ends after x_min; a box that ends at or
        # before x_min also starts before x_max, so the difference counts exactly the overlapping ones.
        overlapping = at_most(starts, x_max - 1) - at_most(ends, x_min)
        total += overlapping
        if overlapping and len(pairs) < limit:
            found = (
                other for other, (_, ox_min, _, ox_max) in open_boxes.items() if ox_min < x_max and ox_max > x_min
            )
            pairs += [(min(other, index), max(other, index)) for other in found][: limit - len(pairs)]
        open_boxes[index] = box
        add(starts, x_min, 1)
        add(ends, x_max, 1)
    return pairs, total


def _elements(elements: list, path: tuple) -> list:
    found = []
    if len(elements) > MAX_RECOMMENDED_ELEMENTS:
        found.append(
            _issue(
                path,
                f"{len(elements)} elements; layouts past {MAX_RECOMMENDED_ELEMENTS} tend to be followed loosely",
                "merge small related elements, or describe minor ones in the background",
                WARNING,
            )
        )
    text_boxes = []  # (index, bbox) of text elements with a well-formed bbox
    for index, element in enumerate(elements):
        if not isinstance(element, dict):
            continue
        element_path = path + (index,)
        found += _key_order(element, element_path, _element_order(element))
        found += _bbox_order(element.get("bbox"), element_path + ("bbox",))
        bbox = _bbox_values(element.get("bbox"))
        is_text = isinstance(element.get("type"), str) and element["type"] == TEXT_TYPE
        for key in ("text", "desc") if is_text else ("desc",):
            value = element.get(key)
            if isinstance(value, str) and not value.strip():
                found.append(_issue(element_path + (key,), f"{key} is empty", _key_description({}, key), WARNING))
        if is_text and bbox is not None:
            text_boxes.append((index, bbox))
    pairs, total = _overlapping_boxes(text_boxes, MAX_ISSUES_PER_PLACE)
    for earlier, later in pairs:
        found.append(
            _issue(
                path + (later, "bbox"),
                f"text bbox {elements[later]['bbox']} overlaps the bbox {elements[earlier]['bbox']} of text element "
                f"elements[{earlier}]",
                "overlapping text tends to render garbled; separate the boxes or merge the texts",
                WARNING,
            )
        )
    if total > len(pairs):
        found.append((path + (0, "bbox"), _Unlisted(total - len(pairs), WARNING)))
    return found


def _hand_rules(caption: dict) -> list:
    # Top-level order is a warning, as in the reference verifier (which checks the order of the nested objects only).
    found = _key_order(caption, (), TOP_LEVEL_KEY_ORDER, WARNING)
    if "high_level_description" not in caption:
        found.append(
            _issue(
                ("high_level_description",),
                "no high_level_description",
                "optional but recommended: one or two sentences describing the whole image, as the first key",
                WARNING,
            )
        )
    style = caption.get("style_description")
    if isinstance(style, dict):
        found += _key_order(style, ("style_description",), _style_order(style))
    composition = caption.get("compositional_deconstruction")
    if isinstance(composition, dict):
        path = ("compositional_deconstruction",)
        found += _key_order(composition, path, COMPOSITION_KEY_ORDER)
        elements = composition.get("elements")
        if isinstance(elements, list):
            found += _elements(elements, path + ("elements",))
    return found


# --------------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------------


def check_caption(caption) -> list[CaptionIssue]:
    """Every issue of a structured JSON caption at once (SPEC 7); an empty list means a clean caption.

    Never raises: invalid JSON, wrong types anywhere, deep nesting, huge values are all reported as issues.

    Args:
        caption: the caption as JSON text (as passed to the pipeline) or an already-parsed dict. Text gets the
            extra checks that only text can fail (JSON syntax, ensure_ascii escapes, minified form).

    Returns:
        The issues sorted by path in caption order: errors make the caption invalid (see `is_valid`), warnings
        flag captions that are valid but likely to generate worse images.
    """
    try:
        return _finish(_check(caption))
    except RecursionError:  # guarded by _guard; kept so the never-raises promise holds for exotic inputs
        return [CaptionIssue(ROOT_PATH, "caption nests too deeply to check", "a caption nests about 5 levels deep")]
    except Exception as error:  # a non-JSON object whose __eq__, __hash__ or __repr__ raises: still an issue
        return [
            CaptionIssue(
                ROOT_PATH,
                f"caption holds a value that cannot be checked ({type(error).__name__})",
                "a caption holds JSON values only: str, int, list, dict",
            )
        ]


def _too_long(caption) -> list:
    """The cheap limit first: a caption whose size alone proves it over the token limit gets this one issue and is
    not read further. A dict is measured as its minified JSON text."""
    if isinstance(caption, dict):
        try:
            caption = json.dumps(caption, ensure_ascii=False, separators=(",", ":"), default=lambda value: None)
        except (TypeError, ValueError, RecursionError):  # odd keys, cycles, deep nesting: reported by the passes
            return []
    if not isinstance(caption, str):
        return []
    tokens, reason = min_caption_tokens(caption)
    if tokens <= MAX_TEXT_TOKENS:
        return []
    return [
        _issue(
            (),
            f"caption is too long: at least {tokens:,} tokens ({reason}), over the limit of {MAX_TEXT_TOKENS} "
            "(chat template included); nothing else was checked",
            "shorten it: fewer or shorter elements and descriptions; the pipeline never truncates a prompt",
        )
    ]


def _check(caption) -> list:
    too_long = _too_long(caption)
    if too_long:
        return too_long
    if isinstance(caption, str):
        parsed, found = _parse_text(caption)
        if parsed is _UNPARSED:
            return found
    elif isinstance(caption, dict):
        parsed, found = caption, []
    else:
        hint = "pass the caption as JSON text or a dict"
        if isinstance(caption, (bytes, bytearray)):
            hint = "decode it first: caption.decode('utf-8')"
        return [_issue((), f"expected a JSON string or a dict, got {type(caption).__name__} {_show(caption)}", hint)]

    if not isinstance(parsed, dict):
        found.append(
            _issue(
                (),
                f"a caption is a JSON object, got {_value_text(parsed)}",
                '{"high_level_description": ..., "style_description": {...}, "compositional_deconstruction": {...}}',
            )
        )
        return found
    guarded = _guard(parsed)
    if guarded:
        return found + guarded
    for error in _schema_validator().iter_errors(parsed):
        found += _from_schema_error(error)
    return found + _unencodable(parsed) + _hand_rules(parsed)


def is_valid(caption) -> bool:
    """True when `check_caption` finds no error-severity issue (warnings allowed)."""
    return not any(issue.is_error for issue in check_caption(caption))


def _report(issues: list[tuple[int, CaptionIssue]], num_prompts: int | None, footer: str = "") -> str:
    """A header line, then one line per issue (`prompt[i] ` prefixed for batches), then the footer."""
    if num_prompts is None:
        num_prompts = 2 if any(index != 0 for index, _ in issues) else 1
    errors = sum(issue.is_error for _, issue in issues)
    tallies = ((errors, ERROR), (len(issues) - errors, WARNING))
    counts = [f"{count} {name}{'' if count == 1 else 's'}" for count, name in tallies if count]
    lines = [f"caption check found {' and '.join(counts) or 'no issues'}:"]
    lines += [f"prompt[{index}] {issue}" if num_prompts > 1 else str(issue) for index, issue in issues]
    if footer:
        lines.append(footer)
    return "\n".join(lines)


def check_prompts(prompts, mode: str = "error") -> None:
    """The pipeline's caption check: check every prompt before any model work.

    Args:
        prompts: the caption strings (a single string is one prompt).
        mode: `caption_check`: "error" raises `CaptionError` listing every error of every prompt (warnings are
            emitted as `CaptionWarning`), "warn" emits every issue as one `CaptionWarning` and continues, "off" skips
            the check.

    Raises:
        ValueError: `mode` is not one of "error", "warn", "off".
        CaptionError: in "error" mode, when any prompt has an error-severity issue.
    """
    if not (isinstance(mode, str) and mode in CAPTION_CHECK_MODES):
        allowed = ", ".join(f'"{choice}"' for choice in CAPTION_CHECK_MODES)
        raise ValueError(f"`caption_check` must be one of {allowed}, got {_show(mode)}.")
    if mode == "off":
        return
    if isinstance(prompts, str):
        prompts = [prompts]
    found = [(index, issue) for index, prompt in enumerate(prompts) for issue in check_caption(prompt)]
    errors = [(index, issue) for index, issue in found if issue.is_error]
    if mode == "warn" or not errors:
        if found:
            footer = 'generating anyway (caption_check="warn")' if errors else ""
            warnings.warn(CaptionWarning(_report(found, len(prompts), footer)), stacklevel=2)
        return
    notes = [(index, issue) for index, issue in found if not issue.is_error]
    if notes:
        warnings.warn(CaptionWarning(_report(notes, len(prompts))), stacklevel=2)
    raise CaptionError(
        errors,
        len(prompts),
        OPT_OUT_HINT,
    )
