"""Hugging Face interop: export a nanoseek checkpoint as a transformers model folder (hf_export), import a
transformers causal LM into nanoseek (hf_import, reached through ``nanoseek.train.load.load_model("hf:DIR")``)."""
