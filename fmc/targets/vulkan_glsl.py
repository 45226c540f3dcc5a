"""Lowered device TIR → GLSL 4.50 compute shaders (fmc's Vulkan route; the pinned TVM wheel
has no SPIR-V codegen). One shader per kernel; glslc turns it into SPIR-V.

The shader follows the ABI of TVM's Vulkan runtime (docs/targets.md, Vulkan): buffer
parameters are storage buffers at set 0, binding i in argument order; scalar parameters
follow in 8-byte push-constant slots; the workgroup size is the kernel's constant threadIdx
extents and the host dispatches the blockIdx extents. A construct the emitter does not know
is an error naming it and the kernel — never a silently wrong shader."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fmc.errors import FmcError

SCALAR_TYPES = {"float16": "float16_t", "float32": "float", "float64": "double",
                "int8": "int8_t", "int16": "int16_t", "int32": "int", "int64": "int64_t",
                "uint8": "uint8_t", "uint16": "uint16_t", "uint32": "uint", "uint64": "uint64_t",
                "bool": "bool"}
VECTOR_PREFIX = {"float16": "f16vec", "float32": "vec", "float64": "dvec", "int32": "ivec",
                 "int64": "i64vec", "uint32": "uvec", "uint64": "u64vec", "bool": "bvec",
                 "int8": "i8vec", "uint8": "u8vec", "int16": "i16vec", "uint16": "u16vec"}
EXTERN_MATH = {"sqrtf": "sqrt", "expf": "exp", "exp2f": "exp2", "logf": "log",
               "log2f": "log2", "powf": "pow", "tanhf": "tanh", "fabsf": "abs", "sinf": "sin",
               "cosf": "cos", "floorf": "floor", "ceilf": "ceil", "fmaxf": "max",
               "fminf": "min", "rsqrtf": "inversesqrt", "sqrt": "sqrt", "exp": "exp",
               "log": "log", "pow": "pow", "tanh": "tanh"}
OP_MATH = {"tirx.exp": "exp", "tirx.exp2": "exp2", "tirx.log": "log", "tirx.log2": "log2",
           "tirx.sqrt": "sqrt", "tirx.rsqrt": "inversesqrt", "tirx.tanh": "tanh",
           "tirx.sin": "sin", "tirx.cos": "cos", "tirx.pow": "pow", "tirx.fabs": "abs",
           "tirx.floor": "floor", "tirx.ceil": "ceil", "tirx.round": "roundEven",
           "tirx.nearbyint": "roundEven", "tirx.trunc": "trunc", "tirx.isnan": "isnan",
           "tirx.isinf": "isinf"}
BINARY = {"Add": "+", "Sub": "-", "Mul": "*", "EQ": "==", "NE": "!=", "LT": "<", "LE": "<=",
          "GT": ">", "GE": ">=", "And": "&&", "Or": "||", "RShift": ">>", "LShift": "<<",
          "BitwiseAnd": "&", "BitwiseOr": "|", "BitwiseXor": "^"}
GLSL_RESERVED = {"input", "output", "sample", "buffer", "shared", "filter", "active", "common",
                 "partition", "texture", "image", "main", "in", "out", "inout", "uniform"}
VECTOR_COMPARE = {"==": "equal", "!=": "notEqual", "<": "lessThan", "<=": "lessThanEqual",
                  ">": "greaterThan", ">=": "greaterThanEqual"}
THREAD_BUILTINS = {"blockIdx": "gl_WorkGroupID", "threadIdx": "gl_LocalInvocationID"}


class UnsupportedTIR(FmcError):
    pass


@dataclass
class ShaderParam:
    name: str
    dtype: str  # element dtype for buffers, value dtype for scalars
    is_buffer: bool


@dataclass
class Shader:
    name: str
    glsl: str
    params: list[ShaderParam]
    launch_params: list[str]  # e.g. ["blockIdx.x", "threadIdx.x"]
    workgroup: tuple[int, int, int]
    # blockIdx extents where constant (None: computed by the host from the shapes)
    grid: tuple[int | None, int | None, int | None] = (1, 1, 1)


def glsl_type(dtype) -> str:
    text = str(dtype)
    base, _, lanes = text.partition("x")
    if lanes:
        if base not in VECTOR_PREFIX or int(lanes) not in (2, 3, 4):
            raise UnsupportedTIR(f"vector type {text} has no GLSL equivalent")
        return f"{VECTOR_PREFIX[base]}{lanes}"
    if text not in SCALAR_TYPES:
        raise UnsupportedTIR(f"type {text} has no GLSL equivalent")
    return SCALAR_TYPES[text]


def var_dtype(expr) -> str:
    """An expression's (or scalar Var's) dtype: 0.27 keeps it in the node's PrimType."""
    return str(expr.ty.dtype)


def key(node) -> int:
    """Identity of an IR node (TVM nodes compare structurally, so dicts key by handle)."""
    return node.__chandle__()


def _lanes(dtype) -> int:
    text = str(dtype)
    return int(text.partition("x")[2] or 1)


def _float_literal(value: float, dtype: str) -> str:
    if math.isnan(value):
        text = "uintBitsToFloat(0x7fc00000u)"
    elif math.isinf(value):
        text = f"uintBitsToFloat({'0x7f800000u' if value > 0 else '0xff800000u'})"
    else:
        text = repr(float(value))
        if "e" not in text and "." not in text:
            text += ".0"
    if dtype == "float32":
        return text if text.startswith("uint") else f"{text}"
    return f"{glsl_type(dtype)}({text})"


@dataclass
class _Storage:
    """Where a buffer's elements live: a storage-buffer member, a shared or local array."""
    expr: str
    offset: str | None = None


@dataclass
class GLSLEmitter:
    kernel: str
    names: dict = field(default_factory=dict)  # Var → GLSL name
    storage: dict = field(default_factory=dict)  # Buffer or data Var → _Storage
    buffer_names: dict = field(default_factory=dict)  # buffer name → _Storage (fallback)
    used_names: set = field(default_factory=set)
    shared: list = field(default_factory=list)  # module-scope declarations
    extensions: set = field(default_factory=set)
    thread_extents: dict = field(default_factory=dict)
    block_extents: dict = field(default_factory=dict)
    helpers: dict = field(default_factory=dict)
    lets: dict = field(default_factory=dict)  # Let-expression Var → emitted value

    def fail(self, what: str):
        raise UnsupportedTIR(f"kernel {self.kernel}: {what} is not supported by fmc's Vulkan "
                             "route")

    # -- names ---------------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        base = "".join(c if c.isalnum() or c == "_" else "_" for c in hint) or "v"
        while "__" in base:
            base = base.replace("__", "_")
        base = base.strip("_") or "v"
        if base[0].isdigit() or base in GLSL_RESERVED or base.startswith("gl_"):
            base = "v_" + base
        name, n = base, 1
        while name in self.used_names:
            name, n = f"{base}_{n}", n + 1
        self.used_names.add(name)
        return name

    def var(self, var) -> str:
        if key(var) in self.lets:
            return self.lets[key(var)]
        if key(var) not in self.names:
            self.fail(f"free variable {var.name}")
        return self.names[key(var)]

    def declare(self, var) -> str:
        name = self.fresh(var.name)
        self.names[key(var)] = name
        return name

    # -- types ---------------------------------------------------------------------------
    def use_type(self, dtype) -> str:
        text = str(dtype).partition("x")[0]
        if text in ("float16", "int8", "uint8", "int16", "uint16", "int64", "uint64",
                    "float64"):
            self.extensions.add("GL_EXT_shader_explicit_arithmetic_types")
        return glsl_type(dtype)

    # -- expressions ---------------------------------------------------------------------
    def expr(self, node) -> str:
        kind = type(node).__name__
        method = getattr(self, f"_e_{kind}", None)
        if method is None:
            self.fail(f"expression {kind}")
        return method(node)

    def _e_IntImm(self, node) -> str:
        dtype = var_dtype(node)
        if dtype == "bool":
            return "true" if node.value else "false"
        if dtype == "int32":
            return str(node.value)
        if dtype == "uint32":
            return f"{node.value}u"
        return f"{self.use_type(dtype)}({node.value})"

    def _e_FloatImm(self, node) -> str:
        self.use_type(var_dtype(node))
        return _float_literal(node.value, var_dtype(node))

    def _e_Var(self, node) -> str:
        return self.var(node)

    def _e_SizeVar(self, node) -> str:
        return self.var(node)

    def _binary(self, node, op: str) -> str:
        if _lanes(var_dtype(node.a)) > 1 and op in VECTOR_COMPARE:
            # GLSL compares vectors with functions that return a bvec
            return f"{VECTOR_COMPARE[op]}({self.expr(node.a)}, {self.expr(node.b)})"
        return f"({self.expr(node.a)} {op} {self.expr(node.b)})"

    def _e_Div(self, node) -> str:
        return f"({self.expr(node.a)} / {self.expr(node.b)})"

    def _e_Mod(self, node) -> str:
        if var_dtype(node).startswith("float"):
            return f"mod({self.expr(node.a)}, {self.expr(node.b)})"
        return f"({self.expr(node.a)} % {self.expr(node.b)})"

    def _floor_helper(self, dtype, kind: str) -> str:
        t = self.use_type(dtype)
        name = f"fmc_floor{kind}_{t}"
        if name not in self.helpers:
            if kind == "div":
                body = (f"{t} fmc_q = a / b; return (fmc_q * b != a && ((a < {t}(0)) != "
                        f"(b < {t}(0)))) ? fmc_q - {t}(1) : fmc_q;")
            else:
                body = (f"{t} fmc_r = a % b; return (fmc_r != {t}(0) && ((fmc_r < {t}(0)) != "
                        f"(b < {t}(0)))) ? fmc_r + b : fmc_r;")
            self.helpers[name] = f"{t} {name}({t} a, {t} b) {{ {body} }}"
        return name

    def _e_FloorDiv(self, node) -> str:
        if var_dtype(node).startswith("float"):
            return f"floor({self.expr(node.a)} / {self.expr(node.b)})"
        return f"{self._floor_helper(var_dtype(node), 'div')}({self.expr(node.a)}, " \
               f"{self.expr(node.b)})"

    def _e_FloorMod(self, node) -> str:
        if var_dtype(node).startswith("float"):
            a, b = self.expr(node.a), self.expr(node.b)
            return f"({a} - floor({a} / {b}) * {b})"
        return f"{self._floor_helper(var_dtype(node), 'mod')}({self.expr(node.a)}, " \
               f"{self.expr(node.b)})"

    def _e_Min(self, node) -> str:
        return f"min({self.expr(node.a)}, {self.expr(node.b)})"

    def _e_Max(self, node) -> str:
        return f"max({self.expr(node.a)}, {self.expr(node.b)})"

    def _e_Not(self, node) -> str:
        return f"(!{self.expr(node.a)})"

    def _e_BitwiseNot(self, node) -> str:
        return f"(~{self.expr(node.a)})"

    def _e_Select(self, node) -> str:
        if _lanes(var_dtype(node)) > 1:  # lane-wise: mix(false value, true value, bvec)
            condition = self.expr(node.condition)
            if _lanes(var_dtype(node.condition)) == 1:
                condition = f"{self.use_type(f'boolx{_lanes(var_dtype(node))}')}({condition})"
            return f"mix({self.expr(node.false_value)}, {self.expr(node.true_value)}, " \
                   f"{condition})"
        return f"({self.expr(node.condition)} ? {self.expr(node.true_value)} : " \
               f"{self.expr(node.false_value)})"

    def _e_Cast(self, node) -> str:
        return f"{self.use_type(var_dtype(node))}({self.expr(node.value)})"

    def _e_Broadcast(self, node) -> str:
        return f"{self.use_type(var_dtype(node))}({self.expr(node.value)})"

    def _e_Ramp(self, node) -> str:
        base, stride = self.expr(node.base), self.expr(node.stride)
        lanes = ", ".join(f"{base} + {stride} * {k}" for k in range(int(node.lanes)))
        return f"{self.use_type(var_dtype(node))}({lanes})"

    def _e_Let(self, node) -> str:
        self.lets[key(node.var)] = f"({self.expr(node.value)})"
        try:
            return self.expr(node.body)
        finally:
            del self.lets[key(node.var)]

    def _index(self, buffer, indices) -> tuple[str, list[str]]:
        """(storage expression, per-lane flat index expressions)."""
        if len(indices) != 1:
            self.fail(f"a {len(indices)}-D access to {buffer.name}")
        store = self.storage.get(key(buffer)) or self.buffer_names.get(buffer.name)
        if store is None:
            self.fail(f"buffer {buffer.name} without storage")
        index = indices[0]
        if type(index).__name__ == "Ramp":
            base, stride = self.expr(index.base), self.expr(index.stride)
            lanes = [f"{base} + {stride} * {k}" for k in range(int(index.lanes))]
        elif _lanes(var_dtype(index)) > 1:  # a computed vector of indices
            vector = self.expr(index)
            lanes = [f"{vector}[{k}]" for k in range(_lanes(var_dtype(index)))]
        else:
            lanes = [self.expr(index)]
        if store.offset:
            lanes = [f"{lane} + {store.offset}" for lane in lanes]
        return store.expr, [f"int({lane})" for lane in lanes]

    def _e_BufferLoad(self, node) -> str:
        buffer = node.source if hasattr(node, "source") else node.buffer  # 0.27: TensorLoad
        storage, lanes = self._index(buffer, node.indices)
        loads = [f"{storage}[{lane}]" for lane in lanes]
        if len(loads) == 1:
            return loads[0]
        return f"{self.use_type(var_dtype(node))}({', '.join(loads)})"

    def _e_TensorLoad(self, node) -> str:
        return self._e_BufferLoad(node)

    def _e_Call(self, node) -> str:
        op = "tirx." + node.op.name.split(".", 1)[1]  # "prim.x" / "tirx.x" → "tirx.x"
        args = list(node.args)
        if op == "tirx.if_then_else":  # GLSL evaluates only the chosen operand
            return f"({self.expr(args[0])} ? {self.expr(args[1])} : {self.expr(args[2])})"
        if op in ("tirx.call_pure_extern", "tirx.call_extern"):
            name = str(args[0].value)
            if name not in EXTERN_MATH:
                self.fail(f"external function {name}")
            return f"{EXTERN_MATH[name]}({', '.join(self.expr(a) for a in args[1:])})"
        if op in OP_MATH:
            return f"{OP_MATH[op]}({', '.join(self.expr(a) for a in args)})"
        if op in ("tirx.likely", "tirx.tvm_thread_invariant"):
            return self.expr(args[0])
        if op in ("tirx.shift_right", "tirx.shift_left", "tirx.bitwise_and",
                  "tirx.bitwise_or", "tirx.bitwise_xor"):
            symbol = {"tirx.shift_right": ">>", "tirx.shift_left": "<<",
                      "tirx.bitwise_and": "&", "tirx.bitwise_or": "|",
                      "tirx.bitwise_xor": "^"}[op]
            return f"({self.expr(args[0])} {symbol} {self.expr(args[1])})"
        if op == "tirx.bitwise_not":
            return f"(~{self.expr(args[0])})"
        if op == "tirx.reinterpret":  # (vectors too: the functions work lane-wise)
            source = str(var_dtype(args[0])).partition("x")[0]
            target = str(var_dtype(node)).partition("x")[0]
            functions = {("float32", "uint32"): "floatBitsToUint",
                         ("float32", "int32"): "floatBitsToInt",
                         ("uint32", "float32"): "uintBitsToFloat",
                         ("int32", "float32"): "intBitsToFloat"}
            if (source, target) not in functions:
                self.fail(f"reinterpret {source} → {target}")
            return f"{functions[(source, target)]}({self.expr(args[0])})"
        self.fail(f"intrinsic {op}")

    def __getattr__(self, name):
        if name.startswith("_e_") and name[3:] in BINARY:
            op = BINARY[name[3:]]
            return lambda node: self._binary(node, op)
        raise AttributeError(name)

    # -- statements ----------------------------------------------------------------------
    def stmt(self, node, indent: int) -> list[str]:
        kind = type(node).__name__
        method = getattr(self, f"_s_{kind}", None)
        if method is None:
            self.fail(f"statement {kind}")
        return method(node, indent)

    def _s_SeqStmt(self, node, indent):
        return [line for s in node.seq for line in self.stmt(s, indent)]

    def _s_Bind(self, node, indent):
        value = self.expr(node.value)
        name = self.declare(node.var)
        return [" " * indent + f"{self.use_type(var_dtype(node.var))} {name} = {value};"]

    def _s_DeclBuffer(self, node, indent):
        buffer = node.buffer
        data = node.data
        source = self.storage.get(key(data))
        if source is None and type(data).__name__ == "Call":  # `other.data`: alias a buffer
            for arg in data.args:
                source = self.storage.get(key(arg)) or self.buffer_names.get(
                    getattr(arg, "name", None))
                if source is not None:
                    break
        if source is None:
            self.fail(f"declared buffer {buffer.name} over unknown data")
        offset = buffer.elem_offset
        extra = None if type(offset).__name__ == "IntImm" and int(offset) == 0 \
            else self.expr(offset)
        merged = source.offset if extra is None else \
            (extra if source.offset is None else f"({source.offset} + {extra})")
        self.storage[key(buffer)] = self.buffer_names[buffer.name] = _Storage(source.expr, merged)
        return []

    def _s_AllocBuffer(self, node, indent):
        buffer = node.buffer
        scope = buffer.scope()
        extent = 1
        for dim in buffer.shape:
            if type(dim).__name__ != "IntImm":
                self.fail(f"dynamically sized {scope} buffer {buffer.name}")
            extent *= int(dim)
        name = self.fresh(buffer.name)
        self.storage[key(buffer)] = self.buffer_names[buffer.name] = _Storage(name)
        declaration = f"{self.use_type(buffer.dtype)} {name}[{extent}];"
        if scope == "shared":
            self.shared.append("shared " + declaration)
            return []
        if scope not in ("local", "local.var", "global"):
            self.fail(f"{scope} memory ({buffer.name})")
        return [" " * indent + declaration]

    def _s_AttrStmt(self, node, indent):
        if node.attr_key == "thread_extent":
            iter_var = node.node
            tag = iter_var.thread_tag
            family, _, axis = tag.partition(".")
            if family not in THREAD_BUILTINS or axis not in "xyz":
                self.fail(f"thread binding {tag}")
            constant = int(node.value) if type(node.value).__name__ == "IntImm" else None
            if family == "threadIdx":
                if constant is None:
                    self.fail(f"a dynamic {tag} extent")
                self.thread_extents[axis] = constant
            else:
                self.block_extents[axis] = constant
            name = self.declare(iter_var.var)
            line = f"{self.use_type(var_dtype(iter_var.var))} {name} = " \
                   f"{self.use_type(var_dtype(iter_var.var))}({THREAD_BUILTINS[family]}.{axis});"
            return [" " * indent + line, *self.stmt(node.body, indent)]
        if node.attr_key == "virtual_thread":
            self.fail("virtual threads")
        return self.stmt(node.body, indent)  # scheduling hints (reduce_scope, pragmas)

    def _s_For(self, node, indent):
        if int(node.kind) not in (0, 3):  # serial, unrolled
            self.fail(f"a {node.kind} loop")
        start = self.expr(node.min)
        end = self.expr(node.min + node.extent) if start != "0" else self.expr(node.extent)
        name = self.declare(node.loop_var)
        t = self.use_type(var_dtype(node.loop_var))
        head = f"for ({t} {name} = {t}({start}); {name} < {t}({end}); ++{name}) {{"
        return [" " * indent + head, *self.stmt(node.body, indent + 2), " " * indent + "}"]

    def _s_While(self, node, indent):
        return [" " * indent + f"while ({self.expr(node.condition)}) {{",
                *self.stmt(node.body, indent + 2), " " * indent + "}"]

    def _s_IfThenElse(self, node, indent):
        lines = [" " * indent + f"if ({self.expr(node.condition)}) {{",
                 *self.stmt(node.then_case, indent + 2)]
        if node.else_case is not None:
            lines += [" " * indent + "} else {", *self.stmt(node.else_case, indent + 2)]
        return lines + [" " * indent + "}"]

    def _s_BufferStore(self, node, indent):
        storage, lanes = self._index(node.buffer, node.indices)
        value = self.expr(node.value)
        pad = " " * indent
        if len(lanes) == 1:
            return [pad + f"{storage}[{lanes[0]}] = {value};"]
        temp = self.fresh("fmc_vec")
        lines = [pad + f"{self.use_type(var_dtype(node.value))} {temp} = {value};"]
        return lines + [pad + f"{storage}[{lane}] = {temp}[{k}];" for k, lane in enumerate(lanes)]

    def _s_TensorStore(self, node, indent):
        return self._s_BufferStore(node, indent)

    def _s_Evaluate(self, node, indent):
        value = node.value
        if type(value).__name__ == "IntImm":
            return []
        if type(value).__name__ == "Call" and value.op.name.endswith(".tvm_storage_sync"):
            scope = str(value.args[0].value)
            if scope != "shared":
                self.fail(f"a {scope} memory barrier")
            return [" " * indent + "memoryBarrierShared();", " " * indent + "barrier();"]
        return [" " * indent + self.expr(value) + ";"]

    def _s_Break(self, node, indent):
        return [" " * indent + "break;"]

    def _s_Continue(self, node, indent):
        return [" " * indent + "continue;"]


def emit_shader(name: str, func) -> Shader:
    """GLSL for one lowered device kernel (a PrimFunc given to `target.build.vulkan`)."""
    emitter = GLSLEmitter(name)
    params: list[ShaderParam] = []
    declarations: list[str] = []
    scalars: list[str] = []
    for param in func.params:
        ty = param.ty
        if type(ty).__name__ == "PointerType":
            dtype = str(ty.element_type.dtype)
            binding = len(params)
            block = emitter.fresh(f"{param.name}_buf")
            storage_type = emitter.use_type(dtype)
            if dtype in ("float16", "int16", "uint16"):
                emitter.extensions.add("GL_EXT_shader_16bit_storage")
            if dtype in ("int8", "uint8"):
                emitter.extensions.add("GL_EXT_shader_8bit_storage")
            if dtype == "bool":
                emitter.fail(f"a bool buffer ({param.name})")
            declarations.append(f"layout(std430, set = 0, binding = {binding}) restrict buffer "
                                f"B{binding} {{ {storage_type} v[]; }} {block};")
            emitter.storage[key(param)] = _Storage(f"{block}.v")
            params.append(ShaderParam(param.name, dtype, True))
        else:
            dtype = str(ty.dtype)
            slot = len(scalars)
            member = emitter.declare(param)
            t = emitter.use_type(dtype)
            if dtype not in ("int64", "uint64", "float64", "int32", "uint32", "float32"):
                emitter.fail(f"a {dtype} scalar parameter ({param.name})")
            scalars.append(f"layout(offset = {8 * slot}) {t} {member};")
            emitter.names[key(param)] = f"pc.{member}"
            params.append(ShaderParam(param.name, dtype, False))
    if any(not a.is_buffer and b.is_buffer for a, b in zip(params, params[1:], strict=False)):
        emitter.fail("a scalar parameter before a buffer")
    if len(scalars) > 16:
        emitter.fail("more than 16 scalar parameters (128 bytes of push constants)")
    body = emitter.stmt(func.body, 2)
    attrs = func.attrs or {}
    launch = [str(tag) for tag in attrs.get("tirx.kernel_launch_params", [])]
    workgroup = tuple(emitter.thread_extents.get(axis, 1) for axis in "xyz")
    lines = ["#version 450"]
    lines += [f"#extension {ext} : require" for ext in sorted(emitter.extensions)]
    lines.append(f"layout(local_size_x = {workgroup[0]}, local_size_y = {workgroup[1]}, "
                 f"local_size_z = {workgroup[2]}) in;")
    lines += declarations
    if scalars:
        lines.append("layout(push_constant) uniform Push { " + " ".join(scalars) + " } pc;")
    lines += emitter.shared
    lines += list(emitter.helpers.values())
    lines += ["void main() {", *body, "}"]
    grid = tuple(emitter.block_extents.get(axis, 1) for axis in "xyz")
    return Shader(name, "\n".join(lines) + "\n", params, launch, workgroup, grid)
