"""Load a tensor-parallel fmc artifact on TVM's Disco runtime by hand and decode greedily:
the loading code of docs/targets.md, without fmc's Engine.

    python examples/disco_generate.py build/l3-tp4 --tokens 1 2 3 --new 16         # N GPUs
    python examples/disco_generate.py build/tiny-tp2 --tokens 1 2 3 --device cpu   # CPU

On GPUs the workers sum through NCCL (a TVM build with USE_NCCL=ON); on the CPU through
fmc's collectives, because the PyPI wheel has none. Prints the generated token ids (JSON).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import tvm
from tvm.runtime import ShapeTuple

# Registers `fmc.runtime.load_rank_params` (each worker loads params/rank-R/ itself).
from fmc.runtime import tensor_parallel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--tokens", type=int, nargs="+", required=True, help="prompt ids")
    parser.add_argument("--new", type=int, default=8, help="tokens to generate")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = parser.parse_args()

    manifest = json.loads((args.artifact / "manifest.json").read_text())
    ranks = manifest["tensor_parallel"]["ranks"]
    hidden = manifest["model"]["hidden_size"]
    runtime = manifest["runtime"]

    # The wheel binds Disco's FFI functions late: this returns tvm.runtime.disco.session
    # ready to use (with a source build, `from tvm.runtime import disco` is the same).
    disco = tensor_parallel.disco_session_module()
    session = disco.ThreadedSession(num_workers=ranks)  # one worker per rank
    if args.device == "cuda":
        session.init_ccl("nccl", *range(ranks))  # worker r → cuda:r, NCCL between them
        device = None  # each worker's own GPU
    else:
        tensor_parallel.attach_cpu_collectives(session, ranks)
        device = tvm.cpu()
    module = session.load_vm_module(str(args.artifact / manifest["library"]["file"]), device)
    params = session.call_packed(session.get_global_func(tensor_parallel.LOAD_RANK_PARAMS),
                                 str(args.artifact), json.dumps(manifest))

    def builtin(name):
        function = session.get_global_func(name)
        return lambda *a: session.call_packed(function, *a)

    kv_cache = module["create_kv_cache"](ShapeTuple([1]), ShapeTuple([runtime["context_window"]]),
                                         ShapeTuple([runtime["prefill_chunk_size"]]),
                                         ShapeTuple([runtime["page_size"]]))
    builtin("vm.builtin.kv_state_add_sequence")(kv_cache, 1)

    def step(entry: str, ids: list[int]) -> int:
        tokens = session.broadcast(np.array(ids, dtype="int32"))  # same input on every rank
        embedded = builtin("vm.builtin.reshape")(module["embed"](tokens, params),
                                                 ShapeTuple([1, len(ids), hidden]))
        builtin("vm.builtin.kv_state_begin_forward")(kv_cache, ShapeTuple([1]),
                                                     ShapeTuple([len(ids)]))
        outputs = module[entry](embedded, kv_cache, params)
        builtin("vm.builtin.kv_state_end_forward")(kv_cache)
        logits = builtin("vm.builtin.tuple_getitem")(outputs, 0)  # every rank holds them
        return int(np.argmax(logits.debug_get_from_remote(0).numpy().reshape(-1)))

    generated = [step("prefill", args.tokens)]
    while len(generated) < args.new:
        generated.append(step("decode", [generated[-1]]))
    print(json.dumps(generated))
    tensor_parallel.close_session(session)  # waits for every worker, then stops them


if __name__ == "__main__":
    main()
