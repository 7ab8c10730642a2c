"""The model code: backbones and their per-process cache, tokenising for training and scoring, the sentence
embedder. Everything that needs torch, transformers or sentence-transformers below the experts lives here."""
