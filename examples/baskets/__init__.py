"""Baskets: a user's own task on their own CSV files, with string SKU ids (see task.py and make_data.py)."""
