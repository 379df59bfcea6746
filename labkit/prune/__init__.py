"""Pruning: unstructured masks, structured surgery with Torch-Pruning, 2:4 sparsity and sensitivity scans."""

from labkit.prune.semi_structured import (
    apply_2_4,
    is_2_4,
    semi_structured_support,
    to_semi_structured,
    two_four_mask,
)
from labkit.prune.sensitivity import propose_ratios, scan, scan_channels
from labkit.prune.structured import (
    IMPORTANCES,
    PruneResult,
    heads_to_remove,
    load_pruned,
    macs,
    prune_attention_heads,
    prune_channels,
    prune_cnn,
    prune_llm_mlp,
    resize_to_state_dict,
    save_pruned,
)
from labkit.prune.unstructured import (
    check_sparsity,
    csr_breakeven_sparsity,
    csr_bytes,
    global_magnitude_masks,
    magnitude_prune,
    make_permanent,
    nonzero_weights,
    prunable_layers,
    sparsity_report,
)

__all__ = [
    "IMPORTANCES", "PruneResult", "apply_2_4", "check_sparsity", "csr_breakeven_sparsity", "csr_bytes",
    "global_magnitude_masks", "heads_to_remove", "is_2_4", "load_pruned", "macs", "magnitude_prune", "make_permanent", "nonzero_weights",
    "propose_ratios", "prunable_layers", "prune_attention_heads", "prune_channels", "prune_cnn", "prune_llm_mlp",
    "resize_to_state_dict", "save_pruned", "scan", "scan_channels", "semi_structured_support", "sparsity_report",
    "to_semi_structured", "two_four_mask",
]
