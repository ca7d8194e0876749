"""Test-only stand-in: the Engram module's parameters with the pure-PyTorch oracle as forward, for
as long as the native gather/gate/conv kernels are not built on every machine."""

from torch_engram.modules import Engram
from torch_engram.reference.layer import engram_module_reference


class StandInEngram(Engram):
    def forward(self, hidden, input_ids=None, rows=None, doc_start=None):
        return engram_module_reference(self, hidden, rows)


def standin_factory(cfg, layer_id, hidden_size, hc_mult):
    return StandInEngram(cfg, layer_id=layer_id, hidden_size=hidden_size, hc_mult=hc_mult)
