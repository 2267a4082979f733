"""The publishing wing: `headwise export` (`export`, with where an export may go in `export_target`),
the model card (`model_card`) and `headwise push` to the Hugging Face Hub (`hub`)."""
