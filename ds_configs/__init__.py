"""DeepSpeed JSON presets and accelerate configs that point at them (package data)."""
