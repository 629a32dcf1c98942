"""Loading a policy: text in, a whole valid :class:`Policy` or a :class:`PolicyError` out."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from ..errors import PolicyError
from ..problems import ProblemsFound
from ..yamlsource import SourceMap, parse_yaml, validation_problems
from .model import Policy

__all__ = ["load_policy", "validate_policy"]


def load_policy(text: str, filename: str = "policy.yaml") -> Policy:
    """Parse and validate a policy file; every problem is one line ``file:line:col: path: message``.

    The whole file is checked before anything is returned, so a bad file
    never yields a partial policy: callers keep the policy they had.
    """
    data, source = parse_yaml(text, filename)
    policy = _validate({} if data is None else data, source)
    policy._source = source
    return policy


def validate_policy(data: Mapping[str, Any], filename: str = "<policy>") -> Policy:
    """The same checks for data that did not come from YAML text (an API body):
    problems name paths but no lines."""
    return _validate(data, SourceMap(filename))


def _validate(data: Any, source: SourceMap) -> Policy:
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(source.lines(validation_problems(exc, Policy))) from exc
    except ProblemsFound as exc:
        raise PolicyError(source.lines(exc.found)) from exc
