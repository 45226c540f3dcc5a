"""Which scheme each layer uses: a default plus `PATTERN=SCHEME` overrides, last match wins."""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from fmc.errors import UsageError
from fmc.quant import registry
from fmc.quant.scheme import QuantScheme


@dataclass
class QuantPlan:
    default: QuantScheme
    overrides: list[tuple[str, QuantScheme]] = field(default_factory=list)

    @classmethod
    def parse(cls, default: str, overrides: list[str] | None = None) -> QuantPlan:
        pairs = []
        for text in overrides or []:
            pattern, sep, name = text.partition("=")
            if not sep or not pattern.strip() or not name.strip():
                raise UsageError(f"--quant-override {text!r}: expected PATTERN=SCHEME")
            pairs.append((pattern.strip(), registry.get(name.strip())))
        return cls(registry.get(default), pairs)

    def scheme_for(self, layer: str, is_output: bool = False) -> QuantScheme:
        """The scheme for a layer path such as `model.layers.3.mlp.down_proj`.

        The output projection (`is_output`: lm_head or a tied embedding) starts from the
        default scheme's `output_scheme`. A pattern is a glob over the dotted path; it also
        matches any dotted suffix, so `lm_head`, `embed_tokens` and `mlp.*_proj` work without
        a leading `*.`."""
        chosen = self.default
        if is_output and self.default.output_scheme:
            chosen = registry.get(self.default.output_scheme)
        for pattern, scheme in self.overrides:
            if fnmatchcase(layer, pattern) or fnmatchcase(layer, f"*.{pattern}"):
                chosen = scheme
        return chosen

    def describe(self) -> dict:
        return {"default": self.default.name,
                "overrides": [f"{p}={s.name}" for p, s in self.overrides]}
