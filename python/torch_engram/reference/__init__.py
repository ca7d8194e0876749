"""Pure-PyTorch oracle of every engram op and of the whole layer: float64-capable, written from
docs/SPEC.md and readable as its executable spec. Tests compare the native kernels against it."""

from .conv import DemoShortConv, short_conv
from .gate import DemoGate, engram_gate, engram_gate_separate, signed_sqrt
from .gather import multihead_gather, multihead_gather_backward, multihead_gather_backward_sparse, multihead_gather_fp8
from .hashing import ngram_hash
from .layer import OfficialEngram, engram_layer, engram_module_reference
from .table_optim import multihead_gather_fused_update, table_update

__all__ = [
    "DemoGate",
    "DemoShortConv",
    "OfficialEngram",
    "engram_gate",
    "engram_gate_separate",
    "engram_layer",
    "engram_module_reference",
    "multihead_gather",
    "multihead_gather_backward",
    "multihead_gather_backward_sparse",
    "multihead_gather_fp8",
    "multihead_gather_fused_update",
    "ngram_hash",
    "short_conv",
    "signed_sqrt",
    "table_update",
]
