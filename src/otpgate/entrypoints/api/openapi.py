"""The OpenAPI document at ``/openapi.json``, as FastAPI generates it from the routes, made
truthful where generation cannot know better:

* the ``Problem`` schema that every declared error answer refers to (``problem_responses``);
* no ``422 HTTPValidationError``: otpgate answers a validation failure with
  ``400 invalid_request``, declared on each route instead;
* the authentication every ``/v1`` route takes but reads by hand on the hot path (Bearer or
  Basic), so generation cannot infer it.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from otpgate.entrypoints.api.problems import Problem

_FASTAPI_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")
_SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "an API key"},
    "basic": {
        "type": "http",
        "scheme": "basic",
        "description": "the account's username and an API key",
    },
}


def _is_fastapi_validation_answer(response: dict[str, Any]) -> bool:
    schema = response.get("content", {}).get("application/json", {}).get("schema", {})
    return str(schema.get("$ref", "")).endswith("/HTTPValidationError")


def _authenticated(path: str) -> bool:
    return path.startswith("/v1/") and not path.startswith("/v1/receipts/")


def build_document(app: FastAPI) -> dict[str, Any]:
    """The document of ``app``'s routes; built once and kept on the app."""
    if app.openapi_schema:
        return app.openapi_schema
    document = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas["Problem"] = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    for name in _FASTAPI_VALIDATION_SCHEMAS:
        schemas.pop(name, None)
    components["securitySchemes"] = _SECURITY_SCHEMES
    for path, operations in document["paths"].items():
        for operation in operations.values():
            responses = operation["responses"]
            if "422" in responses and _is_fastapi_validation_answer(responses["422"]):
                del responses["422"]
            if _authenticated(path):
                operation["security"] = [{"bearer": []}, {"basic": []}]
    app.openapi_schema = document
    return document
