"""Where training and evaluation instances come from: dataset sources (BIG-bench, Hugging Face datasets,
promptsource), the sandboxed prompt templates, and the one dataset -> prompted examples path. No torch."""
