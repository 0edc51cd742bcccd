"""The shared evaluator's parts: threat models, the image subset, the row runner and the reports (eval.py runs them)."""
