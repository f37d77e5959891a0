"""A tiny, safe evaluator for the shape and condition expressions in family specs.

Family specs are data (JSON); their shapes are written as Python-like expressions over
config fields, e.g. ``"num_attention_heads * head_dim"``. ``eval`` would run arbitrary
code from a data file, so this walks the AST and allows arithmetic, comparisons,
boolean logic, conditionals, indexing and a few pure functions only.
"""

from __future__ import annotations

import ast
import operator
from functools import lru_cache
from typing import Any, Mapping

from moetool.errors import MoetoolError

_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_CMPOPS = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
    ast.Is: operator.is_,
    ast.IsNot: operator.is_not,
}
def _per_layer(overrides: Any, layer: int, key: str, default: Any) -> Any:
    """A layer's value of KEY in transformers' ``per_layer_config`` (heterogeneous configs: layer index ->
    {attribute: value}; config.json writes the indices as zero-padded strings), else DEFAULT."""
    if isinstance(overrides, dict):
        for index, values in overrides.items():
            try:
                same = int(index) == layer
            except (TypeError, ValueError):
                continue
            if same and isinstance(values, dict) and key in values:
                return values[key]
    return default


_FUNCS = {"len": len, "max": max, "min": min, "int": int, "bool": bool, "sum": sum, "per_layer": _per_layer}


class MissingField(MoetoolError):
    def __init__(self, name: str):
        super().__init__(f"config has no field '{name}'")
        self.name = name


@lru_cache(maxsize=4096)
def _parse(source: str) -> ast.expr:
    return ast.parse(source, mode="eval").body


def evaluate(source: str | int | float | bool | None, names: Mapping[str, Any]) -> Any:
    """Evaluate ``source`` with ``names`` as the only variables."""
    if not isinstance(source, str):
        return source
    return _eval(_parse(source), names)


def _eval(node: ast.expr, names: Mapping[str, Any]) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id in ("True", "False", "None"):
            return {"True": True, "False": False, "None": None}[node.id]
        if node.id not in names:
            raise MissingField(node.id)
        return names[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _BINOPS[type(node.op)](_eval(node.left, names), _eval(node.right, names))
    if isinstance(node, ast.UnaryOp):
        value = _eval(node.operand, names)
        if isinstance(node.op, ast.Not):
            return not value
        if isinstance(node.op, ast.USub):
            return -value
    if isinstance(node, ast.BoolOp):
        is_and = isinstance(node.op, ast.And)
        value: Any = None
        for operand in node.values:
            value = _eval(operand, names)
            if bool(value) != is_and:
                return value
        return value
    if isinstance(node, ast.Compare):
        left = _eval(node.left, names)
        for op, comparator in zip(node.ops, node.comparators):
            right = _eval(comparator, names)
            if not _CMPOPS[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.IfExp):
        return _eval(node.body if _eval(node.test, names) else node.orelse, names)
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_eval(element, names) for element in node.elts]
    if isinstance(node, ast.Subscript):
        return _eval(node.value, names)[_eval(node.slice, names)]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS:
        return _FUNCS[node.func.id](*[_eval(arg, names) for arg in node.args])
    raise ValueError(f"unsupported expression element: {ast.dump(node)[:80]}")
