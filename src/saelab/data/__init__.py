"""Inputs of the pipeline: the base model (`fetch_model`), the corpus (`fetch_oscar`) and
the Llama-3.2 tokenizer both need."""
