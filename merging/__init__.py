"""Merging experts: one new expert (kind ``merged``) from the weights of several ready experts of one kind.

A merged expert's weights are in the format of its parents' kind (a task vector, a PEFT LoRA adapter, or FFN
adapter weights), so ``config["base_kind"]`` says how to load it and ``config["kind"]`` is that kind too, which
lets the kind's loader load it unchanged (``registry.kinds.weights_kind``). Its lineage (parents, weights,
method, parameters) is in the catalogue. Which kinds merge, and how, is part of each kind's declaration.

A layer above ``trainers`` and ``inference``: choosing merge weights on held-out data (``tuning``) evaluates
candidates the way ``elmreg eval`` does, and composition merges the experts RoE votes for.
"""
