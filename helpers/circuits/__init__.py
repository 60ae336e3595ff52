"""From the head sweep to a circuit: are the top heads the mechanism, and what do they look at?

    from helpers.circuits import analyse_circuit
    circuit = analyse_circuit(exp, hf_model)     # exp: an ExperimentResult; circuit.to_dict() goes into the JSON

Modules: ``types`` (cells, directions), ``cell_patching`` (sufficiency / necessity of sets of cells, batched, and
its one-forward-per-set reference), ``faithfulness`` (top-k curves against random sets), ``attention`` (attention
probabilities of the top heads, by role), ``path_patching`` (exact edge scores sender -> receiver q/k/v or logits,
batched, and its one-forward-per-edge reference), ``edge_attribution`` (EAP: the gradient estimate of the same edges),
``analysis`` (the section of one experiment), ``figures``.

    from helpers.circuits import Cell, all_edges
    from helpers.circuits.path_patching import path_patching      # (the functions are named like their modules)
    edges = all_edges([Cell(0, 1, 28)], receivers=[(1, 3)], answer_column=28)   # (28: the frame's last column)
    scores = path_patching(hf_model, exp.pairs, edges)                         # .to_dicts(): mean score per edge
"""
from helpers.circuits.analysis import CircuitResult, analyse_circuit, check_same_model
from helpers.circuits.attention import HeadAttention, head_attention
from helpers.circuits.cell_patching import CellSetResult, patch_cell_sets, patch_cell_sets_reference
from helpers.circuits.faithfulness import FaithfulnessCurves, faithfulness_curves
from helpers.circuits.path_patching import Edge, EdgeScores, all_edges, path_patching_reference
from helpers.circuits.types import Cell

__all__ = ["analyse_circuit", "CircuitResult", "check_same_model", "patch_cell_sets", "patch_cell_sets_reference",
           "CellSetResult", "faithfulness_curves", "FaithfulnessCurves", "head_attention", "HeadAttention",
           "path_patching_reference", "all_edges", "Edge", "EdgeScores", "Cell"]
# (path_patching and edge_attribution are not re-exported: the names are their modules', which stay reachable as
# helpers.circuits.path_patching / .edge_attribution)
