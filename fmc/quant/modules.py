"""Graph side of quantization: layers that hold a scheme's storage and dequantize in the graph.

`quantize_layers` swaps a model's nn.Linear / nn.Embedding for these, so model definitions
never know about quantization (the nn.Mutator pattern of TVM's frontend)."""

from __future__ import annotations

from dataclasses import dataclass

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from fmc.nn_moe import ExpertLinear, expert_matmul, grouped_matmul
from fmc.nn_ops import take
from fmc.quant import experts
from fmc.quant.layout import RowInterleaved, interleave
from fmc.quant.plan import QuantPlan
from fmc.quant.scheme import QuantScheme

# Kernel attribute naming the scheme of a dequantize kernel (passes regenerate it for new shapes).
SCHEME_ATTR = "fmc.quant_scheme"


def _dequantize(scheme: QuantScheme, stored: list[nn.Tensor], out_dtype: str) -> nn.Tensor:
    return op.tensor_expr_op(
        lambda *tensors: scheme.dequantize_te(list(tensors), out_dtype),
        name_hint=f"dequantize_{scheme.name}",
        args=stored,
        attrs={SCHEME_ATTR: scheme.name},
    )


class _QuantizedWeight(nn.Module):
    """Registers the scheme's storage arrays as parameters named after the storage tensors."""

    def _init_storage(self, scheme: QuantScheme, shape: tuple[int, int], layer: str, dtype: str):
        self.scheme = scheme
        self.compute_dtype = dtype
        self.storage = scheme.storage(shape, f"{layer}.weight")
        for tensor in self.storage:
            setattr(self, tensor.name, nn.Parameter(tensor.shape, tensor.dtype))

    def stored(self) -> list[nn.Tensor]:
        return [getattr(self, tensor.name) for tensor in self.storage]

    def dequantized_weight(self) -> nn.Tensor:
        return _dequantize(self.scheme, self.stored(), self.compute_dtype)


class QuantizedLinear(_QuantizedWeight):
    def __init__(self, linear: nn.Linear, scheme: QuantScheme, layer: str, dtype: str):
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._init_storage(scheme, (linear.out_features, linear.in_features), layer, dtype)
        self.bias = linear.bias

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        y = op.matmul(x, op.permute_dims(self.dequantized_weight()))
        return y + self.bias if self.bias is not None else y


class QuantizedEmbedding(_QuantizedWeight):
    """Row lookup gathers the stored rows first, then dequantizes only those rows."""

    def __init__(self, embedding: nn.Embedding, scheme: QuantScheme, layer: str, dtype: str):
        self.num, self.dim = embedding.num, embedding.dim
        self._init_storage(scheme, (embedding.num, embedding.dim), layer, dtype)

    def forward(self, ids: nn.Tensor) -> nn.Tensor:
        if isinstance(self.scheme, RowInterleaved):  # rows are not contiguous: gather in TE
            scheme, dtype = self.scheme, self.compute_dtype
            return op.tensor_expr_op(
                lambda ids_te, *tensors: scheme.base.dequantize_te(
                    scheme.views(list(tensors), ids_te), dtype),
                name_hint=f"embed_{scheme.base.name}", args=[ids, *self.stored()])
        rows = [take(tensor, ids) for tensor in self.stored()]
        return _dequantize(self.scheme, rows, self.compute_dtype)

    def lm_head_forward(self, x: nn.Tensor) -> nn.Tensor:
        """Tied output projection: logits = x · Eᵀ over the same stored embedding."""
        return op.matmul(x, op.permute_dims(self.dequantized_weight()))


class QuantizedExpertLinear(nn.Module):
    """Stacked expert weights [E, out, in] stored per expert in the scheme's layout
    (fmc.quant.experts); the gathered matmul dequantizes only the experts it reads once
    `inline-dequantize` has put the decode into its loop."""

    def __init__(self, linear: ExpertLinear, scheme: QuantScheme, layer: str, dtype: str):
        self.num_experts = linear.num_experts
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.scheme = scheme
        self.compute_dtype = dtype
        self.storage = experts.storage(
            scheme, (linear.num_experts, linear.out_features, linear.in_features),
            f"{layer}.weight")
        for tensor in self.storage:
            setattr(self, tensor.name, nn.Parameter(tensor.shape, tensor.dtype))

    def weight_tensors(self) -> list[nn.Tensor]:
        return [getattr(self, tensor.name) for tensor in self.storage]

    def weight_reader(self, tensors):
        return experts.dequantized_reader(self.scheme, tensors, self.out_features,
                                          self.compute_dtype)

    def forward(self, x: nn.Tensor, chosen: nn.Tensor) -> nn.Tensor:
        return expert_matmul(x, chosen, self.weight_tensors(), self.weight_reader,
                             self.out_features, f"moe_experts_{self.scheme.name}")

    def grouped(self, x: nn.Tensor, block_expert: nn.Tensor) -> nn.Tensor:
        return grouped_matmul(x, block_expert, self.weight_tensors(), self.weight_reader,
                              self.out_features, f"moe_grouped_{self.scheme.name}")


class _Quantizer(nn.Mutator):
    def __init__(self, plan: QuantPlan, dtype: str, output_layers: set[str],
                 row_block: int | None):
        self.plan = plan
        self.row_block = row_block
        self.dtype = dtype
        self.output_layers = output_layers
        self.layers: dict[str, str] = {}
        self.stored: dict[str, QuantizedParam] = {}

    def visit_module(self, name: str, node: nn.Module):
        if isinstance(node, ExpertLinear):
            # Each expert is quantized as its own [out, in] weight, row-interleaved as a
            # dense weight is when the target asks (the grouped GEMM and the gathered GEMVs
            # then take the row-lane schedules).
            scheme = self.plan.scheme_for(name, False, (node.out_features, node.in_features))
            self.layers[name] = scheme.name
            if scheme.is_identity(node.weight.dtype):
                return node
            if self.row_block and node.out_features % self.row_block == 0:
                scheme = interleave(scheme, self.row_block)
            layer = QuantizedExpertLinear(node, scheme, name, self.dtype)
            for part, tensor in enumerate(layer.storage):
                self.stored[f"{name}.{tensor.name}"] = QuantizedParam(
                    f"{name}.weight", scheme.name, part)
            return layer
        if isinstance(node, (nn.Linear, nn.Embedding)):
            shape = (node.out_features, node.in_features) if isinstance(node, nn.Linear) \
                else (node.num, node.dim)
            scheme = self.plan.scheme_for(name, name in self.output_layers, shape)
            self.layers[name] = scheme.name
            if scheme.is_identity(node.weight.dtype):
                return node
            cls = QuantizedLinear if isinstance(node, nn.Linear) else QuantizedEmbedding
            if self.row_block and node.weight.shape[0] % self.row_block == 0:
                scheme = interleave(scheme, self.row_block)
            layer = cls(node, scheme, name, self.dtype)
            for part, tensor in enumerate(layer.storage):
                self.stored[f"{name}.{tensor.name}"] = QuantizedParam(
                    f"{name}.weight", scheme.name, part)
            return layer
        return self.visit(name, node)


@dataclass(frozen=True)
class QuantizedParam:
    """A parameter holding part `part` of scheme `scheme`'s storage of tensor `source`."""

    source: str
    scheme: str
    part: int


def quantize_layers(model: nn.Module, plan: QuantPlan, dtype: str, output_layers: set[str],
                    row_block: int | None = None
                    ) -> tuple[dict[str, str], dict[str, QuantizedParam]]:
    """Swap every Linear/Embedding of `model` per `plan`, in place; `output_layers` are the
    layers that produce logits; `row_block` (the target's choice) stores weights whose rows
    it divides row-interleaved. Returns the scheme of every layer and, for each new storage
    parameter, what it is made from (the layout-qualified scheme name)."""
    quantizer = _Quantizer(plan, dtype, output_layers, row_block)
    quantizer.visit("", model)
    return quantizer.layers, quantizer.stored
