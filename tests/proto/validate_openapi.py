#!/usr/bin/env python3
"""Validates proto/openapi.yaml, then real responses against it.

    python3 tests/proto/validate_openapi.py proto/openapi.yaml [SAMPLES.jsonl]

1. The document: with openapi-spec-validator (the standard OpenAPI 3.1 validator) when the
   interpreter has it; otherwise with Debian's python3-jsonschema: every schema must be a
   valid JSON Schema 2020-12 schema and every $ref must resolve (the script says which).
2. Each sample (one JSON object per line: method, path as requested, status, content_type,
   body) must match a documented path and method, a documented status and content type, and,
   for JSON, the response schema. Every operation of the document must be sampled at least
   once. Prints one line per failure and a closing count; exits 1 on any failure.
"""

import json
import re
import sys

import jsonschema
import yaml


def fail(failures, message):
    failures.append(message)
    print("FAIL:", message)


def resolve(doc, ref):
    node = doc
    for part in ref.lstrip("#/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def escape(token):
    return token.replace("~", "~0").replace("/", "~1")


def check_document(doc, failures):
    try:
        from openapi_spec_validator import validate
    except ImportError:
        validate = None
    if validate is not None:
        try:
            validate(doc)
            print("document: valid (openapi-spec-validator)")
        except Exception as e:  # The validator's own error types vary by version.
            fail(failures, f"document: {str(e).splitlines()[0]}")
        return
    if not str(doc.get("openapi", "")).startswith("3.1."):
        fail(failures, "document: openapi must be 3.1.x")
    for name, schema in doc.get("components", {}).get("schemas", {}).items():
        try:
            jsonschema.Draft202012Validator.check_schema(schema)
        except jsonschema.SchemaError as e:
            fail(failures, f"document: schema {name}: {e.message}")

    def walk(node, where):
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str):
                try:
                    resolve(doc, ref)
                except (KeyError, TypeError):
                    fail(failures, f"document: {where}: $ref {ref} does not resolve")
            for key, value in node.items():
                walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}/{i}")

    walk(doc, "#")
    print("document: schemas and references checked (python3-jsonschema; "
          "openapi-spec-validator not installed)")


def templates(doc):
    out = []
    for template in doc["paths"]:
        pattern = "^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$"
        out.append((template, re.compile(pattern)))
    # Exact paths before templated ones.
    out.sort(key=lambda t: t[0].count("{"))
    return out


def check_samples(doc, samples, failures):
    seen = set()
    paths = templates(doc)
    for n, sample in enumerate(samples, 1):
        where = f"sample {n} {sample['method']} {sample['path']} {sample['status']}"
        path = sample["path"].split("?")[0]
        template = next((t for t, rx in paths if rx.match(path)), None)
        if template is None:
            fail(failures, f"{where}: no documented path")
            continue
        operation = doc["paths"][template].get(sample["method"].lower())
        if operation is None:
            # A 405 answer to an undocumented method is documented on the path's operations.
            if sample["status"] == 405:
                seen.add((template, "405"))
                continue
            fail(failures, f"{where}: method not documented for {template}")
            continue
        seen.add((template, sample["method"].lower()))
        status = str(sample["status"])
        response = operation.get("responses", {}).get(status)
        base = f"#/paths/{escape(template)}/{sample['method'].lower()}/responses/{status}"
        if response is None:
            fail(failures, f"{where}: status {status} not documented")
            continue
        if "$ref" in response:
            base = response["$ref"]
            response = resolve(doc, base)
        content_type = sample["content_type"].split(";")[0].strip()
        media = response.get("content", {})
        if content_type not in media:
            fail(failures, f"{where}: content type {content_type} not documented "
                           f"(documented: {sorted(media)})")
            continue
        if not content_type.endswith("json"):
            continue
        try:
            body = json.loads(sample["body"])
        except json.JSONDecodeError as e:
            fail(failures, f"{where}: body is not JSON: {e}")
            continue
        schema = dict(doc)
        schema["$ref"] = f"{base}/content/{escape(content_type)}/schema"
        validator = jsonschema.Draft202012Validator(schema)
        errors = sorted(validator.iter_errors(body), key=lambda e: list(e.path))
        for e in errors[:3]:
            fail(failures, f"{where}: {'/'.join(map(str, e.path))}: {e.message[:300]}")
    for template, item in doc["paths"].items():
        for method in item:
            if method in ("get", "post", "put", "patch", "delete") and \
                    (template, method) not in seen:
                fail(failures, f"{method.upper()} {template}: no sampled response")
    print(f"samples: {len(samples)} responses checked")


def main():
    if len(sys.argv) not in (2, 3):
        print(__doc__)
        return 2
    with open(sys.argv[1], encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    failures = []
    check_document(doc, failures)
    if len(sys.argv) == 3:
        with open(sys.argv[2], encoding="utf-8") as f:
            samples = [json.loads(line) for line in f if line.strip()]
        check_samples(doc, samples, failures)
    print(f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
