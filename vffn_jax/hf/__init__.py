"""In and out of the Hugging Face ecosystem: Llama-family import, export of every variant, lm-evaluation-harness."""
