"""YAML text to plain data, remembering where every key and value starts.

PyYAML's composer keeps a start mark on every node; we walk the node tree
ourselves (instead of ``yaml.safe_load``) so that a problem found later at a
path like ``("acls", 1, "to", 0)`` can be reported at ``policy.yaml:12:5``.
While walking we also refuse what ``safe_load`` would silently accept:
duplicate keys (the last would win), non-string keys (``on:`` is a boolean in
YAML 1.1), merge keys, and documents that expand to absurd sizes through
aliases.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from .errors import PolicyError
from .problems import Path, Problem, render_path

__all__ = ["MAX_DEPTH", "MAX_NODES", "MAX_PROBLEMS", "SourceMap", "parse_yaml", "validation_problems"]

MAX_NODES = 200_000
"""More YAML nodes than any real policy has; aliases cannot expand past it."""

MAX_PROBLEMS = 50
"""Problems reported at most; past that the file needs a fresh look, not a longer list."""

MAX_DEPTH = 64
"""Nesting no policy needs (the deepest real path is four or five levels): deeper is refused, located."""

# libyaml's parser when present (about 10x faster); both keep node marks.
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"


@dataclass(frozen=True)
class SourceMap:
    """Where each path's key and value start, 1-based ``(line, column)``."""

    filename: str
    values: Mapping[Path, tuple[int, int]] = field(default_factory=dict)
    keys: Mapping[Path, tuple[int, int]] = field(default_factory=dict)

    def locate(self, path: Path, at_key: bool = False) -> tuple[int, int]:
        """The closest known location: the path itself, else its nearest parent."""
        if at_key and path in self.keys:
            return self.keys[path]
        while path:
            if path in self.values:
                return self.values[path]
            path = path[:-1]
        return self.values.get((), (1, 1))

    def lines(self, problems: Iterable[Problem]) -> list[str]:
        """``file:line:col: path: message``, sorted by position, each once."""
        located = sorted(
            {(*(p.where or self.locate(p.path, p.at_key)), render_path(p.path), p.message) for p in problems}
        )
        if not self.values:  # data that did not come from text: paths only
            out = [f"{self.filename}: {path}: {message}" for _, _, path, message in located]
        else:
            out = [f"{self.filename}:{line}:{col}: {path}: {message}" for line, col, path, message in located]
        if len(out) > MAX_PROBLEMS:
            out = out[:MAX_PROBLEMS] + [f"{self.filename}: ... and {len(out) - MAX_PROBLEMS} more problems"]
        return out


def _mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


class _Walker:
    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.values: dict[Path, tuple[int, int]] = {}
        self.keys: dict[Path, tuple[int, int]] = {}
        self.problems: list[Problem] = []
        self.count = 0

    def walk(self, node: yaml.Node, path: Path) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise _TooLarge(node)
        if len(path) > MAX_DEPTH:
            raise _TooDeep(node)
        self.values.setdefault(path, _mark(node))
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            return tuple(self.walk(item, path + (i,)) for i, item in enumerate(node.value))
        return self.loader.construct_object(node, deep=True)

    def _mapping(self, node: yaml.MappingNode, path: Path) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                self.problems.append(
                    Problem(path, "merge keys (<<) are not supported: write the entries out", where=_mark(key_node))
                )
                continue
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != _STR_TAG:
                shown = key_node.value if isinstance(key_node, yaml.ScalarNode) else "(a collection)"
                self.problems.append(Problem(path, f"key {shown!r} is not a string: quote it", where=_mark(key_node)))
                continue
            key = str(key_node.value)
            if key in out:
                self.problems.append(Problem(path, f"duplicate key {key!r}", where=_mark(key_node)))
                continue
            self.keys[path + (key,)] = _mark(key_node)
            self.values[path + (key,)] = _mark(value_node)
            out[key] = self.walk(value_node, path + (key,))
        return out


class _TooLarge(Exception):
    def __init__(self, node: yaml.Node) -> None:
        self.node = node


class _TooDeep(_TooLarge):
    pass


def parse_yaml(text: str, filename: str) -> tuple[Any, SourceMap]:
    """Parse one YAML document; raise :class:`PolicyError` with locations if it is not sound YAML."""
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        walker = _Walker(loader)
        data = None if root is None else walker.walk(root, ())
    except _TooDeep as exc:
        line, col = _mark(exc.node)
        raise PolicyError([f"{filename}:{line}:{col}: nested more than {MAX_DEPTH} levels deep"]) from None
    except _TooLarge as exc:
        line, col = _mark(exc.node)
        message = f"{filename}:{line}:{col}: the document expands to more than {MAX_NODES} nodes (through aliases?)"
        raise PolicyError([message]) from None
    except RecursionError:  # PyYAML composes nodes recursively: hundreds of levels exhaust the stack first
        raise PolicyError([f"{filename}: nested more than {MAX_DEPTH} levels deep"]) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{filename}:{mark.line + 1}:{mark.column + 1}" if mark else filename
        raise PolicyError([f"{where}: {_yaml_message(exc)}"]) from exc
    except yaml.YAMLError as exc:
        raise PolicyError([f"{filename}: invalid YAML: {exc}"]) from exc
    finally:
        loader.dispose()
    source = SourceMap(filename, walker.values, walker.keys)
    if walker.problems:
        raise PolicyError(source.lines(walker.problems))
    return data, source


def _yaml_message(exc: yaml.MarkedYAMLError) -> str:
    """PyYAML splits its message in a context ("while parsing a flow mapping") and a problem."""
    if exc.context and exc.problem:
        joiner = ", " if exc.problem.startswith("but ") else ": "
        return f"{exc.context}{joiner}{exc.problem}"
    return exc.problem or exc.context or "invalid YAML"


def validation_problems(exc: ValidationError, root: type[BaseModel]) -> list[Problem]:
    """pydantic's errors as :class:`Problem` lines a person can act on."""
    out = []
    errors = exc.errors(include_url=False)
    for err in errors:
        loc: Path = tuple(err["loc"])
        kind = err["type"]
        if kind == "too_short" and any(tuple(e["loc"][: len(loc)]) == loc and len(e["loc"]) > len(loc)
                                       for e in errors):
            continue  # pydantic counts only the valid items; the invalid one is the real problem
        if "[key]" in loc:
            out.append(Problem(loc[: loc.index("[key]")], _message(err), at_key=True))
        elif kind == "extra_forbidden":
            expected = _keys_at(root, loc[:-1])
            hint = f" (expected {', '.join(expected)})" if expected else ""
            out.append(Problem(loc, f"unknown key {loc[-1]!r}{hint}", at_key=True))
        elif kind == "missing":
            out.append(Problem(loc[:-1], f"missing required key {loc[-1]!r}"))
        elif not loc and kind in ("model_type", "model_attributes_type"):
            sections = ", ".join(_keys_at(root, ()))
            out.append(Problem(loc, f"a policy is a mapping of sections ({sections})"))
        else:
            out.append(Problem(loc, _message(err)))
    return out


_MESSAGES = {
    "tuple_type": "expected a list",
    "list_type": "expected a list",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
    "string_type": "expected a string",
    "too_short": "must not be empty",
}


def _message(err: Any) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "value_error" and "error" in ctx:
        return str(ctx["error"])
    if kind == "literal_error":
        return f"expected {ctx.get('expected')}, got {err['input']!r}"
    if kind in _MESSAGES:
        return f"{_MESSAGES[kind]}, got {err['input']!r}" if kind.endswith("_type") else _MESSAGES[kind]
    return str(err["msg"])


def _keys_at(root: type[BaseModel], path: Path) -> list[str]:
    """The keys the model at ``path`` accepts, for "unknown key" hints."""
    tp: Any = root
    for part in path:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel) and isinstance(part, str):
            tp = next((f.annotation for n, f in tp.model_fields.items() if (f.alias or n) == part), None)
        elif get_origin(tp) in (tuple, list) and isinstance(part, int):
            tp = get_args(tp)[0]
        elif get_origin(tp) is dict:
            tp = get_args(tp)[1]
        else:
            return []
    tp = _unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [f.alias or n for n, f in tp.model_fields.items()]
    return []


def _unwrap(tp: Any) -> Any:
    """Strip ``Annotated`` and ``| None`` to reach the model or container type."""
    while True:
        if hasattr(tp, "__metadata__"):
            tp = tp.__origin__
            continue
        args = [a for a in get_args(tp) if a is not type(None)]
        if get_origin(tp) not in (tuple, list, dict) and len(args) == 1 and type(None) in get_args(tp):
            tp = args[0]
            continue
        return tp
