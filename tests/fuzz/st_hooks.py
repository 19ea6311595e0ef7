"""Schemathesis hooks for the fuzz run (loaded by `st run` through SCHEMATHESIS_HOOKS).

Two checks decide pass or fail, in place of schemathesis's own `not_a_server_error` (which
would flag the documented 502/503/504 too):

- `documented_server_errors`: a 5xx is a failure unless it is 502, 503 or 504 and carries an
  error code that the error table (modelmora.errors) maps to that status;
- `one_error_shape`: every 4xx/5xx body is the one JSON shape
  `{"error_code", "message", "details", "trace_id"}` with a known code of that status; on the
  OpenAI-compatible routes (`/v1/...`), the one declared exception, OpenAI's shape
  `{"error": {"message", "type", "param", "code"}}` with a known code (api/openai_errors.py).

Two generation hooks steer part of the cases at the models the test installed (a random model
name would only ever meet 404) and give part of the inference bodies a real text input
(random objects would only ever meet 422), so the workers are reached too.
"""

from __future__ import annotations

import json
import os
from typing import Any

import schemathesis
from hypothesis import strategies as st

from modelmora.api.openai_errors import is_v1, status_of
from modelmora.errors import ErrorCode, ModelMoraError

# Names of the models installed for the run (test_schemathesis.py sets it); never `DELETE`d
# on purpose: the other operations need them.
MODELS: list[str] = [m for m in os.environ.get("MODELMORA_FUZZ_MODELS", "").split(",") if m]
ALLOWED_5XX = {502, 503, 504}
ERROR_KEYS = {"error_code", "message", "details", "trace_id"}
OPENAI_KEYS = {"message", "type", "param", "code"}
# The fake adapter's test switches (tasks/fake.py): a text starting with one of these fails,
# crashes or sleeps on purpose, which says nothing about the server.
FAKE_SWITCHES = ("fail:", "crash:", "exit:", "sleep:")


def _request_line(case: schemathesis.Case) -> str:
    return f"{case.method.upper()} {case.formatted_path}"


@schemathesis.check
def documented_server_errors(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> bool | None:
    """No 5xx but the documented 502/503/504 with a code of that status."""
    status = response.status_code
    if status < 500:
        return None
    code = _error_code(response, case)
    if status in ALLOWED_5XX and code is not None and _status(code, case) == status:
        return True
    raise AssertionError(f"server error {status} ({code or 'no error code'}): {response.text[:500]}")


@schemathesis.check
def one_error_shape(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> bool | None:
    """Every error body: error_code, message, details, trace_id, and nothing else."""
    status = response.status_code
    if status < 400:
        return None
    try:
        body = json.loads(response.content)
    except ValueError:
        raise AssertionError(f"{status} with a body that is no JSON: {response.text[:300]!r}") from None
    if is_v1(case.path):
        error = body.get("error") if isinstance(body, dict) and set(body) == {"error"} else None
        if not isinstance(error, dict) or set(error) != OPENAI_KEYS:
            raise AssertionError(f"{status} error body not in OpenAI's shape: {response.text[:300]}")
        if not (isinstance(error["message"], str) and isinstance(error["type"], str)):
            raise AssertionError(f"{status} error body with fields of the wrong types: {response.text[:300]}")
        code = error["code"]
    else:
        if not isinstance(body, dict) or set(body) != ERROR_KEYS:
            raise AssertionError(f"{status} error body not in the one shape: {response.text[:300]}")
        if not (
            isinstance(body["message"], str)
            and isinstance(body["details"], dict)
            and (body["trace_id"] is None or isinstance(body["trace_id"], str))
        ):
            raise AssertionError(f"{status} error body with fields of the wrong types: {response.text[:300]}")
        code = body["error_code"]
    if code not in ErrorCode.__members__:
        raise AssertionError(f"{status} with an unknown error code {code!r}")
    if _status(code, case) != status:
        raise AssertionError(f"{code} answered with {status}, the table says {_status(code, case)}")
    return True


def _status(code: str, case: schemathesis.Case) -> int:
    """The status a code is answered with: the error table's, or on `/v1` OpenAI's (400 for
    a refused request)."""
    if is_v1(case.path):
        return status_of(ModelMoraError(ErrorCode(code), ""))
    return ErrorCode(code).http_status


def _error_code(response: schemathesis.Response, case: schemathesis.Case) -> str | None:
    try:
        body = json.loads(response.content)
    except ValueError:
        return None
    if is_v1(case.path) and isinstance(body, dict) and isinstance(body.get("error"), dict):
        body = {"error_code": body["error"].get("code")}
    code = body.get("error_code") if isinstance(body, dict) else None
    return code if isinstance(code, str) and code in ErrorCode.__members__ else None


@schemathesis.hook
def flatmap_path_parameters(context: Any, path_parameters: dict[str, Any]) -> Any:
    """Half of the cases that name a model name an installed one (never for DELETE: the run
    would lose its models early, and uninstalling is exercised on what it installs itself)."""
    operation = context.operation
    if (
        not MODELS
        or not isinstance(path_parameters, dict)  # None, or something else in negative cases
        or "name" not in path_parameters
        or operation is None
        or operation.method.lower() == "delete"
    ):
        return st.just(path_parameters)
    return st.one_of(
        st.just(path_parameters),
        st.sampled_from(MODELS).map(lambda name: {**path_parameters, "name": name}),
    )


@schemathesis.hook
def filter_case(context: Any, case: schemathesis.Case) -> bool:
    """Keep the installed models installed: a DELETE of one (a stateful link can name it)
    would leave every later inference case a 404."""
    if case.method.lower() != "delete" or not case.path.startswith("/api/v1/models/"):
        return True
    return not (isinstance(case.path_parameters, dict) and case.path_parameters.get("name") in MODELS)


_TEXT = st.text(max_size=64).filter(lambda t: not t.startswith(FAKE_SWITCHES))


@schemathesis.hook
def flatmap_body(context: Any, body: Any) -> Any:
    """Half of the inference bodies carry a text or a list of texts the models take (and, on
    the OpenAI-compatible routes, an installed model's name)."""
    operation = context.operation
    if operation is None or not isinstance(body, dict):
        return st.just(body)
    path = operation.path
    texts = st.one_of(_TEXT, st.lists(_TEXT, min_size=1, max_size=8))
    if path.startswith("/v1/") and MODELS:
        field = {"/v1/embeddings": "input", "/v1/completions": "prompt", "/v1/images/generations": "prompt"}
        name = st.sampled_from(MODELS)
        if path in field:
            steered = st.tuples(name, texts).map(lambda nt: {**body, "model": nt[0], field[path]: nt[1]})
        else:
            steered = name.map(lambda n: {**body, "model": n})
        return st.one_of(st.just(body), steered)
    if "infer" not in path:
        return st.just(body)
    if path.startswith("/infer/"):  # the short form: the input at the top level
        return st.one_of(st.just(body), texts.map(lambda t: {**body, "text": t}))
    return st.one_of(st.just(body), texts.map(lambda t: {**body, "input_data": {"text": t}}))
