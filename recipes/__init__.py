"""Shipped YAML recipes (package data; `headwise recipe list`)."""
