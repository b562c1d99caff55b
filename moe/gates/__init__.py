"""Gates over frozen experts: fusions (plain modules) and the ``GatedMoE`` LightningModule."""

from moe.gates.fusions import FUSIONS, build_gate, normalized_product
from moe.gates.module import GatedMoE, MoEOutput

__all__ = ["FUSIONS", "GatedMoE", "MoEOutput", "build_gate", "normalized_product"]
