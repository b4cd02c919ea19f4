#!/usr/bin/python3
"""Validates proto/examples against proto/usage_event.schema.json with a Python validator.

    /usr/bin/python3 tests/proto/validate_examples.py --validator jsonschema
    /usr/bin/python3 tests/proto/validate_examples.py --validator fastjsonschema
    /usr/bin/python3 tests/proto/validate_examples.py --validator jsonschema EVENT.json...

Without files: checks every example against tests/proto/example_reasons.json (valid ones and
'server' ones pass, 'schema' ones fail, 'unparseable' ones are not JSON), prints one line per
failure and a closing count, and exits 1 on any failure. With files: validates those files and
prints one line per error.

Uses Debian 12's packages (python3-jsonschema, python3-fastjsonschema) through Debian's own
interpreter, /usr/bin/python3; a missing package is a failure, never a skip.
"""

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "proto" / "usage_event.schema.json"
EXAMPLES = ROOT / "proto" / "examples"
EXAMPLES_README = EXAMPLES / "README.md"
REASONS = Path(__file__).resolve().parent / "example_reasons.json"
CLASSES = {"unparseable", "schema", "schema-format", "server"}
DEBIAN_PACKAGE = {"jsonschema": "python3-jsonschema", "fastjsonschema": "python3-fastjsonschema"}

# RFC 3339 date-time, the syntax meterd's parser takes (lib/event/event_parser.cc,
# ParseRfc3339Micros): 'T', 't' or a space between date and time, any number of fraction digits,
# 'Z', 'z' or +hh:mm. Debian 12's jsonschema checks "date-time" only with rfc3339-validator,
# which Debian 12 does not package, and fastjsonschema's built-in check is a regular expression
# that takes 2026-02-30; both get this one, which takes exactly what ParseRfc3339Micros takes.
_DATE_TIME = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})([.][0-9]+)?"
    r"(?:[Zz]|[+-]([0-9]{2}):([0-9]{2}))\Z")


DAYS_IN_MONTH = ((31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31),
                 (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31))


def is_rfc3339_date_time(value):
    if not isinstance(value, str):
        return True  # "format" constrains strings only
    m = _DATE_TIME.match(value)
    if not m:
        return False
    year, month, day, hour, minute, second, _, off_hour, off_minute = m.groups()
    year, month = int(year), int(month)
    leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
    if not 1 <= month <= 12 or not 1 <= int(day) <= DAYS_IN_MONTH[leap][month - 1]:
        return False
    if int(hour) > 23 or int(minute) > 59 or int(second) > 60:
        return False
    return off_hour is None or (int(off_hour) <= 23 and int(off_minute) <= 59)


class Unparseable(Exception):
    pass


def load_json(path):
    try:
        return json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise Unparseable(str(e)) from e


def make_jsonschema(schema, assert_format):
    """Returns (label, validate) where validate(instance) returns a list of error strings."""
    import jsonschema  # python3-jsonschema

    from importlib.metadata import version
    cls = jsonschema.validators.validator_for(schema, default=None)
    if cls is None:
        raise RuntimeError(f"$schema {schema.get('$schema')!r} is no draft jsonschema knows")
    cls.check_schema(schema)
    checker = None
    note = "format not asserted"
    if assert_format:
        checker = jsonschema.FormatChecker()
        if "date-time" not in checker.checkers:
            checker.checks("date-time")(is_rfc3339_date_time)
            note = "format asserted, date-time by tests/proto"
        else:
            note = "format asserted, date-time by jsonschema"
    validator = cls(schema, format_checker=checker)

    def describe(errors):
        out = []
        for e in errors:
            if e.validator == "oneOf" and e.context:
                # The root is a oneOf (event or batch): report what is wrong inside the branch
                # of the instance's kind, not "... is not valid under any of the given schemas"
                # nor the other branch's "is not of type".
                inner = [c for c in e.context if not (c.validator == "type" and not c.relative_path)]
                if inner:
                    out += describe(inner)
                    continue
            out.append(f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}")
        return out

    def validate(instance):
        return describe(validator.iter_errors(instance))

    return f"jsonschema {version('jsonschema')} {cls.__name__}, {note}", validate


def make_fastjsonschema(schema, assert_format):
    import fastjsonschema  # python3-fastjsonschema

    if not assert_format:
        raise RuntimeError("fastjsonschema always asserts format")
    fn = fastjsonschema.compile(schema, formats={"date-time": is_rfc3339_date_time},
                                use_default=False)

    def validate(instance):
        try:
            fn(instance)
            return []
        except fastjsonschema.JsonSchemaValueException as e:
            return [e.message]

    return (f"fastjsonschema {fastjsonschema.VERSION} (draft-07), format asserted, "
            "date-time by tests/proto"), validate


MAKERS = {"jsonschema": make_jsonschema, "fastjsonschema": make_fastjsonschema}
# jsonschema runs twice: a validator that does not assert "format" must still reject every
# 'schema' example (only 'schema-format' ones pass it).
PASSES = {"jsonschema": (True, False), "fastjsonschema": (True,)}


def expected_examples(failures):
    """Yields (relative path, class) for every example; 'valid' for proto/examples/valid."""
    mapping = json.loads(REASONS.read_text())
    reasons, files = mapping["reasons"], mapping["files"]
    for name, cls in list(reasons.items()) + list(files.items()):
        if cls not in CLASSES:
            failures.append(f"example_reasons.json: {name}: unknown class {cls!r}")
    for rel in files:
        if not (EXAMPLES / "invalid" / rel).is_file():
            failures.append(f"example_reasons.json: files: no example invalid/{rel}")
    valid = sorted((EXAMPLES / "valid").glob("*.json"))
    if not valid:
        failures.append("no valid examples found")
    for path in valid:
        yield path, "valid"
    seen = set()
    for reason_dir in sorted(p for p in (EXAMPLES / "invalid").iterdir() if p.is_dir()):
        reason = reason_dir.name
        seen.add(reason)
        if reason not in reasons:
            failures.append(f"invalid/{reason}/: reason missing from tests/proto/"
                            "example_reasons.json (decide whether the schema rejects it)")
            continue
        for path in sorted(reason_dir.glob("*.json")):
            yield path, files.get(f"{reason}/{path.name}", reasons[reason])
    for reason in sorted(set(reasons) - seen):
        failures.append(f"example_reasons.json: no directory invalid/{reason}/")


def check_readme(failures):
    """proto/examples/README.md must state the same class for every reason and override."""
    mapping = json.loads(REASONS.read_text())
    text = EXAMPLES_README.read_text()
    rows = dict(re.findall(r"^\|\s*`([a-z_]+)`\s*\|\s*([a-z-]+)\s*\|", text, re.M))
    for reason, cls in mapping["reasons"].items():
        if rows.get(reason) != cls:
            failures.append(f"proto/examples/README.md: row for `{reason}` should say {cls}, "
                            f"says {rows.get(reason)}")
    for rel, cls in mapping["files"].items():
        if not re.search(rf"`{re.escape(rel)}`[^\n]*\b{re.escape(cls)}\b", text):
            failures.append(f"proto/examples/README.md: should name `{rel}` as {cls}")


def run_examples(name, schema_path):
    failures = []
    checks = failed_checks = 0
    schema = json.loads(schema_path.read_text())
    examples = list(expected_examples(failures))
    check_readme(failures)
    for assert_format in PASSES[name]:
        try:
            label, validate = MAKERS[name](schema, assert_format)
        except ImportError as e:
            failures.append(f"{name}: cannot import ({e}); install Debian's {DEBIAN_PACKAGE[name]} "
                            "(deploy/install-deps.sh)")
            break
        except Exception as e:  # the schema itself refused
            failures.append(f"{name}: refuses the schema: {type(e).__name__}: {e}")
            continue
        print(f"# {label}")
        for path, cls in examples:
            checks += 1
            rel = path.relative_to(EXAMPLES)
            expect = ("unparseable" if cls == "unparseable" else
                      "reject" if cls == "schema" or (cls == "schema-format" and assert_format)
                      else "accept")
            try:
                errors = validate(load_json(path))
                got = "reject" if errors else "accept"
            except Unparseable as e:
                errors, got = [str(e)], "unparseable"
            except Exception as e:  # e.g. an unresolvable $ref
                errors, got = [f"{type(e).__name__}: {e}"], "error"
            if got != expect:
                failed_checks += 1
                detail = f": {errors[0]}" if errors else ""
                failures.append(f"{name}: {rel} ({cls}): expected {expect}, got {got}{detail}")
    for line in failures:
        print(f"FAIL {line}")
    # Every failure counts, also those that are not one example (a refused schema, a reason
    # directory missing from the mapping).
    print(f"{name}: {checks - failed_checks} passed, {len(failures)} failed")
    return 1 if failures else 0


def run_files(name, schema_path, paths):
    schema = json.loads(schema_path.read_text())
    try:
        _, validate = MAKERS[name](schema, True)
    except ImportError as e:
        print(f"{name}: cannot import ({e}); install Debian's {DEBIAN_PACKAGE[name]}")
        return 1
    status = 0
    for p in paths:
        try:
            errors = validate(load_json(Path(p)))
        except Unparseable as e:
            errors = [f"not JSON: {e}"]
        for err in errors:
            print(f"{p}: {err}")
        if errors:
            status = 1
        else:
            print(f"{p}: valid")
    return status


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--validator", choices=sorted(MAKERS), required=True)
    ap.add_argument("--schema", type=Path, default=SCHEMA, help="default: %(default)s")
    ap.add_argument("files", nargs="*", help="events to validate instead of the examples")
    args = ap.parse_args()
    if args.files:
        return run_files(args.validator, args.schema, args.files)
    return run_examples(args.validator, args.schema)


if __name__ == "__main__":
    sys.exit(main())
