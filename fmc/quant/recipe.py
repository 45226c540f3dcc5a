"""Mixture recipes: which scheme each tensor gets, written as data (a TOML file).

    name = "q4k_m"
    default = "q4k"            # every linear layer and the input embedding
    output = "q6k"             # lm_head, or the embedding when the model ties them
    [[rule]]                   # later rules win; --quant-override comes after all of them
    match = "self_attn.v_proj" # a glob over the dotted layer path (or any dotted suffix)
    layers = "i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2"
    scheme = "q6k"

`layers` (optional) is an expression in `i` (the layer's index) and `n` (the number of
layers) using integers, + - * // %, comparisons, and/or/not and parentheses — nothing else is
evaluated. A scheme that does not fit a tensor's shape takes its declared fallback
(fmc.quant.plan). The built-in recipes (q4k_m, q5k_m) are files in fmc/quant/recipes/."""

from __future__ import annotations

import ast
import operator
from dataclasses import dataclass
from pathlib import Path

from fmc.errors import InputError

BUILTIN_DIR = Path(__file__).parent / "recipes"
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}
_COMPARE = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt,
            ast.GtE: operator.ge, ast.Eq: operator.eq, ast.NotEq: operator.ne}


def _c_division(op, a: int, b: int) -> int:
    """// and % as llama.cpp's C computes them (truncating toward zero), so a rule copied
    from its source means the same thing for negative operands."""
    if b == 0:
        raise ZeroDivisionError
    quotient = abs(a) // abs(b) * (1 if (a >= 0) == (b >= 0) else -1)
    return quotient if op is operator.floordiv else a - b * quotient


class LayerSelector:
    """A parsed `layers` expression; `matches(i, n)`."""

    def __init__(self, text: str, origin: str):
        self.text = text
        try:
            self.tree = ast.parse(text, mode="eval").body
            self._check(self.tree)
        except (SyntaxError, ValueError) as exc:
            raise InputError(f"{origin}: layers = {text!r} is not a layer expression "
                             f"({exc.msg if isinstance(exc, SyntaxError) else exc}); use i, "
                             "n, integers, + - * // %, comparisons, and/or/not") from None

    def _check(self, node) -> None:
        allowed = (ast.BoolOp, ast.BinOp, ast.UnaryOp, ast.Compare, ast.Name, ast.Constant,
                   ast.And, ast.Or, ast.Not, ast.USub, *_BINARY, *_COMPARE)
        for child in ast.walk(node):
            if not isinstance(child, allowed) and not isinstance(child, (ast.Load,)):
                raise ValueError(f"{type(child).__name__} is not allowed")
            if isinstance(child, ast.Name) and child.id not in ("i", "n"):
                raise ValueError(f"unknown name {child.id!r}")
            if isinstance(child, ast.Constant) and (not isinstance(child.value, int)
                                                    or isinstance(child.value, bool)):
                raise ValueError(f"constant {child.value!r} is not an integer")

    def matches(self, i: int, n: int) -> bool:
        return bool(self._eval(self.tree, {"i": i, "n": n}))

    def _eval(self, node, names):
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            return names[node.id]
        if isinstance(node, ast.UnaryOp):
            value = self._eval(node.operand, names)
            return -value if isinstance(node.op, ast.USub) else not value
        if isinstance(node, ast.BinOp):
            op = _BINARY[type(node.op)]
            a, b = self._eval(node.left, names), self._eval(node.right, names)
            if op in (operator.floordiv, operator.mod):
                try:
                    return _c_division(op, a, b)
                except ZeroDivisionError:
                    return 0
            return op(a, b)
        if isinstance(node, ast.BoolOp):
            values = (self._eval(v, names) for v in node.values)
            return all(values) if isinstance(node.op, ast.And) else any(values)
        left = self._eval(node.left, names)
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            right = self._eval(right_node, names)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True


@dataclass(frozen=True)
class RecipeRule:
    match: str
    scheme: str
    layers: LayerSelector | None = None


@dataclass(frozen=True)
class Recipe:
    name: str
    default: str
    output: str | None
    rules: tuple[RecipeRule, ...]
    description: str = ""
    file: Path | None = None  # a user's recipe file (part of cache keys and depfiles)


def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.toml"))


def load(path: Path, builtin: bool = False) -> Recipe:
    """Parse a recipe file; every problem is an InputError naming the file and field."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    origin = str(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"{origin}: cannot read the recipe ({exc.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{origin}: not a valid TOML recipe ({exc})") from None

    def text(table: dict, key: str, where: str, required: bool = True) -> str | None:
        value = table.get(key)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value.strip():
            raise InputError(f"{origin}: {where}{key} must be a non-empty string")
        return value.strip()

    unknown = set(data) - {"name", "description", "default", "output", "rule"}
    if unknown:
        raise InputError(f"{origin}: unknown recipe key {sorted(unknown)[0]!r} (expected name, "
                         "description, default, output, [[rule]])")
    rules = data.get("rule", [])
    if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
        raise InputError(f"{origin}: rule must be an array of tables ([[rule]])")
    parsed = []
    for number, rule in enumerate(rules, 1):
        where = f"rule {number}: "
        extra = set(rule) - {"match", "scheme", "layers"}
        if extra:
            raise InputError(f"{origin}: {where}unknown key {sorted(extra)[0]!r} (expected "
                             "match, scheme, layers)")
        layers = text(rule, "layers", where, required=False)
        selector = LayerSelector(layers, f"{origin}: rule {number}") if layers else None
        parsed.append(RecipeRule(text(rule, "match", where), text(rule, "scheme", where),
                                 selector))
    return Recipe(name=text(data, "name", "", required=False) or path.stem,
                  default=text(data, "default", ""),
                  output=text(data, "output", "", required=False), rules=tuple(parsed),
                  description=str(data.get("description", "")),
                  file=None if builtin else path.resolve())


def builtin(name: str) -> Recipe | None:
    path = BUILTIN_DIR / f"{name}.toml"
    return load(path, builtin=True) if path.is_file() else None
