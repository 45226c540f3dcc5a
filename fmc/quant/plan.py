"""Which scheme each layer uses: a default scheme (or a recipe, or the GGUF input's own stored
types), the recipe's rules, then `PATTERN=SCHEME` overrides — last match wins — and finally
the fallback of a scheme that does not fit the tensor's shape."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

from fmc.errors import InputError, UsageError, unknown_choice
from fmc.quant import recipe as recipes
from fmc.quant import registry
from fmc.quant.scheme import QuantScheme

# `--quant gguf`: keep every tensor of a GGUF input in the type it is stored in.
FROM_GGUF = "gguf"
# What a weight whose shape no scheme of a fallback chain fits is stored as (llama.cpp: F16).
LAST_RESORT = "q0f16"
LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class Rule:
    pattern: str
    scheme: QuantScheme
    layers: recipes.LayerSelector | None = None

    def matches(self, layer: str, num_layers: int) -> bool:
        if not (fnmatchcase(layer, self.pattern) or fnmatchcase(layer, f"*.{self.pattern}")):
            return False
        if self.layers is None:
            return True
        index = LAYER_INDEX.search(layer)
        return index is not None and self.layers.matches(int(index.group(1)), num_layers)

    def describe(self) -> str:
        where = f" if {self.layers.text}" if self.layers else ""
        return f"{self.pattern}={self.scheme.name}{where}"


@dataclass
class QuantPlan:
    default: QuantScheme | None  # None: each tensor's GGUF storage type (--quant gguf)
    overrides: list[Rule] = field(default_factory=list)  # --quant-override, after the recipe
    recipe: recipes.Recipe | None = None
    recipe_rules: list[Rule] = field(default_factory=list)
    output: QuantScheme | None = None  # the recipe's output scheme
    num_layers: int = 0
    # --quant gguf: checkpoint tensor name → GGML type name, bound at import.
    source_types: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, default: str, overrides: list[str] | None = None,
              recipe_file: str | Path | None = None) -> QuantPlan:
        """`default` is a scheme, a built-in recipe name or `gguf`; `recipe_file` (a user's
        recipe) replaces it."""
        pairs = []
        for text in overrides or []:
            pattern, sep, name = text.partition("=")
            if not sep or not pattern.strip() or not name.strip():
                raise UsageError(f"--quant-override {text!r}: expected PATTERN=SCHEME")
            pairs.append(Rule(pattern.strip(), registry.get(name.strip())))
        recipe = recipes.load(Path(recipe_file)) if recipe_file else None
        if recipe is None and default == FROM_GGUF:
            return cls(None, pairs)
        schemes = registry.all_schemes()
        if recipe is None and default not in schemes and registry.split_name(default)[1] is None:
            recipe = recipes.builtin(default)
            if recipe is None:
                raise unknown_choice("quantization scheme", default,
                                     [*schemes, *recipes.builtin_names(), FROM_GGUF])
        if recipe is None:
            return cls(registry.get(default), pairs)
        origin = str(recipe.file) if recipe.file else f"recipe {recipe.name}"
        try:
            rules = [Rule(r.match, registry.get(r.scheme), r.layers) for r in recipe.rules]
            return cls(registry.get(recipe.default), pairs, recipe, rules,
                       registry.get(recipe.output) if recipe.output else None)
        except UsageError as exc:  # an unknown scheme named inside the file
            raise InputError(f"{origin}: {exc}") from None

    @property
    def name(self) -> str:
        """What the user asked for: a scheme, a recipe or `gguf`."""
        if self.recipe is not None:
            return self.recipe.name
        return self.default.name if self.default is not None else FROM_GGUF

    @property
    def compute_dtype(self) -> str:
        """The activation dtype the plan prefers (GGUF's quantized types: float16)."""
        return self.default.compute_dtype if self.default is not None else "float16"

    def bind(self, num_layers: int, source_types: dict[str, str] | None = None,
             origin: str = "") -> None:
        """What the plan needs from the model: its depth (recipe layer rules) and, for
        `gguf`, each tensor's stored type."""
        self.num_layers = num_layers
        if self.default is None:
            if not source_types:
                raise UsageError(f"--quant {FROM_GGUF} keeps a GGUF input's own types; "
                                 f"{origin or 'this model'} is not a GGUF file")
            self.source_types = dict(source_types)

    def _stored_type_scheme(self, layer: str) -> QuantScheme:
        tensor = f"{layer}.weight"
        type_name = self.source_types.get(tensor)
        by_type = registry.by_gguf_type()
        if type_name is None:
            raise InputError(f"tensor {tensor!r}: not in the GGUF file (--quant {FROM_GGUF})")
        if type_name not in by_type:
            raise InputError(f"tensor {tensor!r}: GGUF type {type_name} has no fmc scheme to "
                             f"keep it in (--quant {FROM_GGUF}); choose one with "
                             f"--quant-override '{layer}=SCHEME'")
        return by_type[type_name]

    def scheme_for(self, layer: str, is_output: bool = False,
                   shape: tuple[int, ...] | None = None) -> QuantScheme:
        """The scheme for a layer path such as `model.layers.3.mlp.down_proj`.

        The output projection (`is_output`: lm_head or a tied embedding) starts from the
        recipe's output scheme, else the default scheme's `output_scheme`. A pattern is a
        glob over the dotted path; it also matches any dotted suffix, so `lm_head`,
        `embed_tokens` and `mlp.*_proj` work without a leading `*.`. Given the weight's
        `shape`, a scheme whose block does not divide its reduction axis is replaced by its
        declared fallback (Q4_K → Q5_0, as llama.cpp does); with no fallback the scheme is
        kept and its storage names the tensor in the error."""
        matching = [rule for rule in (*self.recipe_rules, *self.overrides)
                    if rule.matches(layer, self.num_layers)]
        if matching:
            chosen = matching[-1].scheme
        elif self.default is None:
            chosen = self._stored_type_scheme(layer)
        else:
            chosen = self.default
            if is_output:
                name = self.output.name if self.output else self.default.output_scheme
                chosen = registry.get(name) if name else chosen
        return chosen if shape is None else fitted(chosen, shape)

    def describe(self) -> dict:
        described = {"default": self.name,
                     "overrides": [rule.describe() for rule in self.overrides]}
        if self.recipe is not None:
            described["recipe"] = {"name": self.recipe.name, "default": self.default.name,
                                   "output": self.output.name if self.output else None,
                                   "rules": [rule.describe() for rule in self.recipe_rules]}
        return described


def fitted(scheme: QuantScheme, shape: tuple[int, ...]) -> QuantScheme:
    """`scheme`, or the first of its fallbacks whose block divides the reduction axis."""
    chosen, fell_back = scheme, False
    while not chosen.fits(shape) and chosen.fallback:
        chosen, fell_back = registry.get(chosen.fallback), True
    if fell_back and not chosen.fits(shape):
        return registry.get(LAST_RESORT)
    return chosen
