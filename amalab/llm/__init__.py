"""The LLM half of amalab: the shared mixers driving preference optimization of `transformers` causal LMs.

Needs the ``llm`` extra (torch, transformers, safetensors, peft). Importing this package imports no torch;
each module imports what it needs.
"""
