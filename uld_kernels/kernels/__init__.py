"""Triton kernels (private): see uld_rows.py for the math."""
