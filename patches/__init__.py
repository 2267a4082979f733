"""headwise.patches: one module per method; each registers its attention function and mask function
with the transformers attention registry under one neutral name (see DESIGN.md)."""
