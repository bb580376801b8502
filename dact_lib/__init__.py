"""dact_lib — fine-tune BERT-style text classifiers and make them cheaper with early exit (DACT).

The public surface is small; see docs/architecture.md for which file owns what.
"""
__version__ = "0.1.0"
