"""toyworld data layer: world spec, corpus generator, tokenizer, preference-data generators.

See issue 3. The model layer (training, evaluation, CLI, shipped checkpoint) lives in
``preflens.toyworld``.
"""
