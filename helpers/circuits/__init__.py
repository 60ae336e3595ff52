"""From the head sweep to a circuit: are the top heads the mechanism, and what do they look at?

    from helpers.circuits import analyse_circuit
    circuit = analyse_circuit(exp, hf_model)     # exp: an ExperimentResult; circuit.to_dict() goes into the JSON

Modules: ``types`` (cells, directions), ``cell_patching`` (sufficiency / necessity of sets of cells, batched, and
its one-forward-per-set reference), ``faithfulness`` (top-k curves against random sets), ``attention`` (attention
probabilities of the top heads, by role), ``analysis`` (the section of one experiment), ``figures``.
"""
from helpers.circuits.analysis import CircuitResult, analyse_circuit
from helpers.circuits.cell_patching import CellSetResult, patch_cell_sets, patch_cell_sets_reference
from helpers.circuits.faithfulness import FaithfulnessCurves, faithfulness_curves
from helpers.circuits.types import Cell

__all__ = ["analyse_circuit", "CircuitResult", "patch_cell_sets", "patch_cell_sets_reference", "CellSetResult",
           "faithfulness_curves", "FaithfulnessCurves", "Cell"]
