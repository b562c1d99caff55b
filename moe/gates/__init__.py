"""Gates over frozen experts: fusions (plain modules), the gated mixture and the ``GatedMoE`` LightningModule."""

from moe.gates.fusions import FUSIONS, build_gate, normalized_product
from moe.gates.mixture import GatedMixture, MoEOutput
from moe.gates.module import GatedMoE

__all__ = ["FUSIONS", "GatedMixture", "GatedMoE", "MoEOutput", "build_gate", "normalized_product"]
