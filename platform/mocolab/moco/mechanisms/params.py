"""The MLflow params a pretraining run logs about its mechanism (``Mechanism.logged_params``); no torch."""

EFFECTIVE_K_PARAM = "effective_k"  # the dictionary size K as the paper's Figure 3 counts it
NEGATIVES_PARAM = "negatives"  # negatives per query: the logits' columns - 1 (the chance loss is ln(1 + negatives))
