"""Validate AC requests and answers against the OpenAPI files AC's reference was turned into.

``ValidatingTransport`` wraps a real transport: every request the service sends and every answer
the emulator gives is checked against ``tests/support/openapi/*.yml`` (copied from
``shared/activecampaign/openapi``); violations are collected for the test to assert on.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import yaml
from openapi_schema_validator import OAS30Validator

SPEC_DIR = Path(__file__).parent / "openapi"


def _any_of(node: Any) -> Any:
    """The generated description uses ``oneOf`` over permissive object variants that any answer
    matches twice; what it means is ``anyOf``."""
    if isinstance(node, dict):
        return {("anyOf" if k == "oneOf" else k): _any_of(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_any_of(v) for v in node]
    return node


@cache
def operations() -> list[tuple[str, re.Pattern[str], dict[str, Any]]]:
    ops = []
    for path in sorted(SPEC_DIR.glob("*.yml")):
        spec = _any_of(yaml.safe_load(path.read_text()))
        for template, item in spec["paths"].items():
            pattern = re.compile("/api/3" + re.sub(r"\{[^}]+\}", r"[^/]+", template))
            for method, op in item.items():
                if method in ("get", "post", "put", "delete"):
                    ops.append((method.upper(), pattern, op))
    return ops


def find_operation(method: str, path: str) -> dict[str, Any] | None:
    for op_method, pattern, op in operations():
        if op_method == method and pattern.fullmatch(path):
            return op
    return None


def _schema_errors(instance: Any, schema: dict[str, Any]) -> list[str]:
    return [e.message for e in OAS30Validator(schema).iter_errors(instance)]


def request_errors(method: str, path: str, body: bytes) -> list[str]:
    op = find_operation(method, path)
    if op is None:
        return [f"{method} {path} is not in AC's OpenAPI description"]
    schema = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
    if schema is None or not body:
        return []
    return [f"request {method} {path}: {m}" for m in _schema_errors(json.loads(body), schema)]


def _documented_deviation(path: str, instance: object) -> bool:
    """AC's own notes (shared/activecampaign/api-notes.md) document answers the generated
    description does not model. Only these exact shapes are exempt:
    ``import/info`` asked within about a second of queuing answers ``{"status": false}``."""
    return path.endswith("/import/info") and instance == {"status": False}


def response_errors(method: str, path: str, status: int, body: bytes) -> list[str]:
    op = find_operation(method, path)
    if op is None:
        return []
    response = op.get("responses", {}).get(str(status))
    if response is None:
        return []  # the description is silent on this status (429, 403...)
    schema = response.get("content", {}).get("application/json", {}).get("schema")
    if schema is None:
        return []
    try:
        instance = json.loads(body)
    except ValueError:
        return [f"response {status} to {method} {path} is not JSON"]
    if _documented_deviation(path, instance):
        return []
    return [f"response {status} to {method} {path}: {m}" for m in _schema_errors(instance, schema)]


class ValidatingTransport(httpx.BaseTransport):
    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner = inner
        self.errors: list[str] = []
        self.checked = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        self.errors += request_errors(request.method, request.url.path, body)
        response = self.inner.handle_request(request)
        content = response.read()
        self.errors += response_errors(
            request.method, request.url.path, response.status_code, content
        )
        self.checked += 1
        return httpx.Response(
            response.status_code, headers=response.headers, content=content, request=request
        )

    def close(self) -> None:
        self.inner.close()
