"""The TIR lowering pipeline for the GPU targets: TVM's default one without TIR's common
subexpression elimination.

In TVM 0.27, CommonSubexprElim can place a new variable's definition after one of its uses:
TVM's paged-KV tree-attention kernel (`batch_tree_attn`) with three query heads per KV head
and head_dim 32 — a Llama with 6 heads, 2 KV heads and head_dim 32 under
`--tensor-parallel 2` — then fails the next pass's use-before-definition check
("variable cse_v14 has been used before definition"). The GPU code generators (nvcc,
Metal's compiler, the Vulkan driver's shader compiler) eliminate common subexpressions
themselves, so the GPU targets skip TIR's pass rather than patch it kernel by kernel."""

from __future__ import annotations

NAME = "fmc_gpu"


def gpu_tir_pipeline() -> str:
    """Register (once; idempotent) and return the pipeline's name for `relax.build`."""
    import tvm
    from tvm.tirx import compilation_pipeline

    if NAME not in compilation_pipeline.PIPELINE_MAP:
        def factory():
            default, finalize_host, finalize_device = compilation_pipeline.get_tir_pipeline(
                "default")

            @tvm.transform.module_pass(opt_level=0, name="FmcGPUTIRPipeline")
            def without_cse(mod, ctx):
                config = {**dict(ctx.config), "tirx.disable_cse_tir": True}
                with tvm.transform.PassContext(opt_level=ctx.opt_level, config=config,
                                               required_pass=list(ctx.required_pass),
                                               disabled_pass=list(ctx.disabled_pass)):
                    return default(mod)

            return without_cse, finalize_host, finalize_device

        compilation_pipeline.register_tir_pipeline(NAME, factory)
    return NAME
