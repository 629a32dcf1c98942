"""Daemon logs: JSON lines off a terminal, with the request's id, never a token."""

from __future__ import annotations

import json
import logging

import pytest

from idmesh.logs import request_id, setup_logging


def test_records_are_json_with_the_request_id_and_tokens_are_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(json_lines=True)
    token = request_id.set("abc123")
    try:
        logging.getLogger("idmesh.test").warning("refused idm1.eyJ1IjoiaHR0cHM6Ly9 from %s", "198.51.100.7")
    finally:
        request_id.reset(token)
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["level"] == "warning" and line["logger"] == "idmesh.test" and line["request_id"] == "abc123"
    assert line["msg"] == "refused idm1.<redacted> from 198.51.100.7"
    logging.getLogger().handlers.clear()


def test_a_token_passed_as_an_argument_is_redacted_too(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(json_lines=True)
    try:
        logging.getLogger("idmesh.test").warning("enrolling with %s on %s", "idm1.eyJ1IjoiaHR0cHM6Ly9zZWNyZXQ", "h1")
        logging.getLogger("idmesh.test").warning("%d items", "not a number")  # a bad call stays logging's problem
    finally:
        logging.getLogger().handlers.clear()
    err = capsys.readouterr().err
    first = json.loads(err.strip().splitlines()[0])
    assert first["msg"] == "enrolling with idm1.<redacted> on h1" and "zZWNyZXQ" not in err


def test_uvicorn_speaks_json_through_our_handler_and_an_unhandled_error_once(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(json_lines=True)
    try:
        uvicorn_errors = logging.getLogger("uvicorn.error")
        try:
            raise RuntimeError("bug")
        except RuntimeError:
            uvicorn_errors.error("Exception in ASGI application", exc_info=True)  # the API logged it already
        uvicorn_errors.warning("Invalid HTTP request received.")
    finally:
        logging.getLogger().handlers.clear()
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert json.loads(line) == {**json.loads(line), "logger": "uvicorn.error", "msg": "Invalid HTTP request received."}
