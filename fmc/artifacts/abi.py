"""The library's calling convention: the entry functions every artifact exports, the
function describing the library itself, and the ABI version both are versioned by.

The compiler builds exactly these functions and the runtime calls exactly these; neither
spells an entry name anywhere else."""

from __future__ import annotations

import json
from dataclasses import dataclass

# Bumped when the library's entry functions or calling convention change incompatibly.
ABI_VERSION = 1

# token ids [seq_len] → embeddings
EMBED = "embed"
# embeddings [1, seq_len, hidden] appended to one sequence → logits at its last position
PREFILL = "prefill"
# one token's embedding [1, 1, hidden] → its logits
DECODE = "decode"
# packed prompts of several sequences → logits at the requested positions only
BATCH_PREFILL = "batch_prefill"
# one token per sequence [batch, 1, hidden] → [batch, 1, vocab]
BATCH_DECODE = "batch_decode"
# (max_batch_size, max_total_seq_len, prefill_chunk_size, page_size) → a paged KV cache
CREATE_KV_CACHE = "create_kv_cache"

ENTRY_FUNCTIONS = (EMBED, PREFILL, DECODE, BATCH_PREFILL, BATCH_DECODE, CREATE_KV_CACHE)

# Added by a debug build (--debug-layers): every layer's output, for `fmc compare`.
DEBUG_ENTRY = "layer_outputs"

# The .so keeps no parameter names, so the library carries its own description: this
# function returns the ABI version and the ordered parameter list as JSON.
METADATA_FUNCTION = "_metadata"


@dataclass(frozen=True)
class LibraryMetadata:
    """What `METADATA_FUNCTION` returns: parameters as [name, shape, dtype], in call order."""

    abi_version: int
    params: list[list]

    def to_json(self) -> str:
        return json.dumps({"abi_version": self.abi_version, "params": self.params},
                          sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LibraryMetadata:
        data = json.loads(text)
        return cls(data["abi_version"], data["params"])
