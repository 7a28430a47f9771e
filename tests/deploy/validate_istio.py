"""Validates Istio resources against their CRD schemas, strictly, for tests/deploy_manifests.rs.

Reads a JSON list on stdin: [{"name": ..., "key": "group/version/Kind", "spec": {...}}].
The schemas come from istio-crd-schemas.json beside this file (see its _source). As
kubernetes-validate --strict does for core kinds, an object schema that lists its
properties rejects any other property, so a misspelt field is an error, not a no-op.
CEL rules (x-kubernetes-validations) are not evaluated.

Prints "ok NAME" or "invalid NAME: PATH: MESSAGE" per resource. Exit status: 0 all
valid, 1 something invalid or without a schema, 3 the jsonschema module is missing.
"""

import json
import os
import sys

try:
    import jsonschema
except ImportError:
    print("python module jsonschema is missing (pip install kubernetes-validate brings it)")
    sys.exit(3)


def strict(schema):
    if isinstance(schema, dict):
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        for value in schema.values():
            strict(value)
    elif isinstance(schema, list):
        for value in schema:
            strict(value)
    return schema


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "istio-crd-schemas.json")) as f:
        schemas = json.load(f)["schemas"]
    failed = False
    for resource in json.load(sys.stdin):
        name = resource["name"]
        schema = schemas.get(resource["key"])
        if schema is None:
            print("invalid %s: no schema for %s" % (name, resource["key"]))
            failed = True
            continue
        validator = jsonschema.Draft7Validator(strict(schema["properties"]["spec"]))
        errors = sorted(validator.iter_errors(resource["spec"]), key=lambda e: list(e.path))
        for error in errors:
            path = ".".join(str(p) for p in error.path) or "spec"
            print("invalid %s: spec.%s: %s" % (name, path, error.message))
            failed = True
        if not errors:
            print("ok %s" % name)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
